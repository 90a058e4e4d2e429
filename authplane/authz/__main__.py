"""Standalone decision service, for tests and benchmarks (``authplane serve`` embeds it):

    python -m authplane.authz POLICY_DIR [--grpc H:P] [--http H:P] [--workers N]
                              [--tls-cert PEM --tls-key PEM [--client-ca PEM]]

Prints ``listening grpc=H:P http=H:P`` once ready; SIGHUP reloads the policy directory;
SIGINT/SIGTERM stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import signal
import sys

from authplane.authz.rules import compile_table
from authplane.authz.service import AuthzService
from authplane.authz.workers import start_workers
from authplane.errors import PolicyError
from authplane.policy.files import policy_files, read_file
from authplane.policy.loader import load_dir
from authplane.policy.tlsfiles import TlsFiles


def _load(directory: str):  # -> RuleTable
    h = hashlib.sha256()
    policies = load_dir(directory)  # refuses what cannot be read safely (FIFOs, devices, huge files)
    for path in policy_files(directory):
        h.update(path.encode() + b"\0" + read_file(path))
    return compile_table(policies, h.hexdigest()[:16])


async def run(args: argparse.Namespace) -> None:
    table = _load(args.dir)
    tls = TlsFiles(args.tls_cert, args.tls_key, args.client_ca) if args.tls_cert else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if args.workers > 1:
        pool = start_workers(args.workers, args.grpc or None, args.http or None, table, tls=tls)
        target, addrs = pool.update_table, (pool.grpc_addr, pool.http_addr)
    else:
        svc = AuthzService()
        svc.update_table(table)
        await svc.start(args.grpc or None, args.http or None, tls=tls)
        target, addrs = svc.update_table, (svc.grpc_address, svc.http_address)

    def reload() -> None:
        try:
            target(_load(args.dir))
        except PolicyError as e:
            logging.error("reload rejected, keeping the previous rules:\n%s", e)

    loop.add_signal_handler(signal.SIGHUP, reload)
    print(f"listening grpc={addrs[0]} http={addrs[1]}", flush=True)
    await stop.wait()
    if args.workers > 1:
        pool.stop()
    else:
        await svc.stop()


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m authplane.authz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir")
    p.add_argument("--grpc", default="127.0.0.1:9001", help="gRPC address ('' turns it off)")
    p.add_argument("--http", default="127.0.0.1:9002", help="HTTP address ('' turns it off)")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the ports")
    p.add_argument("--tls-cert", metavar="PEM", help="serve both ports over TLS with this chain (re-read on change)")
    p.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    p.add_argument("--client-ca", metavar="PEM", help="require client certificates signed by this CA")
    args = p.parse_args()
    if (args.tls_cert is None) != (args.tls_key is None) or (args.client_ca and not args.tls_cert):
        p.error("--tls-cert and --tls-key go together (and --client-ca needs them)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        asyncio.run(run(args))
    except PolicyError as e:
        print(e, file=sys.stderr)
        return 1
    except OSError as e:
        print(f"python -m authplane.authz: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
