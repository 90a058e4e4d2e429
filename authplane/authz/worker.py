"""One worker process of ``workers.start_workers``: args GRPC_ADDR HTTP_ADDR (empty: off), then
optionally CERT KEY [CLIENT_CA] (both ports over TLS, the files watched for rotation);
rule tables arrive on stdin (length-prefixed pickles from the parent), each acknowledged with a
``swapped`` line once it decides checks; EOF stops it. The first table is swapped in before the
worker listens, so no check is ever answered without rules ("unknown policy")."""

from __future__ import annotations

import asyncio
import logging
import pickle
import sys
import threading
from typing import BinaryIO

from authplane.authz.rules import RuleTable
from authplane.authz.service import AuthzService
from authplane.policy.tlsfiles import TlsFiles


def read_table(stream: BinaryIO) -> RuleTable | None:
    """The next table from the parent, or None at EOF."""
    head = stream.read(4)
    if len(head) < 4:
        return None
    table = pickle.loads(stream.read(int.from_bytes(head, "big")))
    assert isinstance(table, RuleTable)
    return table


def _acknowledge() -> None:
    sys.stdout.write("swapped\n")
    sys.stdout.flush()


def _reader(loop: asyncio.AbstractEventLoop, svc: AuthzService, done: asyncio.Event) -> None:
    def swap(table: RuleTable) -> None:
        svc.update_table(table)
        _acknowledge()

    while (table := read_table(sys.stdin.buffer)) is not None:
        loop.call_soon_threadsafe(swap, table)
    loop.call_soon_threadsafe(done.set)


async def main(grpc_addr: str, http_addr: str, tls: TlsFiles | None = None) -> None:
    svc = AuthzService()
    first = read_table(sys.stdin.buffer)
    if first is None:
        return
    svc.update_table(first)
    await svc.start(grpc_addr or None, http_addr or None, reuse_port=True, tls=tls)
    done = asyncio.Event()
    threading.Thread(target=_reader, args=(asyncio.get_running_loop(), svc, done), daemon=True).start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await done.wait()
    await svc.stop()


if __name__ == "__main__":
    # stderr is the server's: what a worker logs (a rotated certificate, one it cannot use) shows there
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    files = sys.argv[3:]
    asyncio.run(main(sys.argv[1], sys.argv[2], TlsFiles(*files) if files else None))
