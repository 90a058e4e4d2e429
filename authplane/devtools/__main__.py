"""Run one development server in the foreground: ``python -m authplane.devtools echo|idp|sample-authz``.

Used by docker-compose.yml; ``authplane demo`` runs the same servers in-process.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m authplane.devtools")
    ap.add_argument("server", choices=("echo", "idp", "sample-authz", "sample-authz-http"))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--issuer", default="http://127.0.0.1:9400", help="idp: the iss claim")
    args = ap.parse_args(argv)
    server: object
    if args.server == "echo":
        from authplane.devtools.echo import EchoServer

        server = EchoServer(args.host, args.port).start()
    elif args.server == "idp":
        from authplane.devtools.idp_server import IdpServer, dev_provider

        server = IdpServer(dev_provider(args.issuer), args.host, args.port).start()
    elif args.server == "sample-authz":
        from authplane.devtools.sample_authz import SampleAuthzGrpc

        server = SampleAuthzGrpc(args.host, args.port).start()
    else:
        from authplane.devtools.sample_authz import SampleAuthzHttp

        server = SampleAuthzHttp(args.host, args.port).start()
    print(f"{args.server} listening on {args.host}:{args.port}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
