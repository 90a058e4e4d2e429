"""One worker process of ``workers.start_workers``: args GRPC_ADDR HTTP_ADDR (empty: off);
rule tables arrive on stdin (length-prefixed pickles from the parent); EOF stops it."""

from __future__ import annotations

import asyncio
import pickle
import sys
import threading

from authplane.authz.service import AuthzService


def _reader(loop: asyncio.AbstractEventLoop, svc: AuthzService, done: asyncio.Event) -> None:
    stream = sys.stdin.buffer
    while True:
        head = stream.read(4)
        if len(head) < 4:
            break
        data = stream.read(int.from_bytes(head, "big"))
        loop.call_soon_threadsafe(svc.update_table, pickle.loads(data))
    loop.call_soon_threadsafe(done.set)


async def main(grpc_addr: str, http_addr: str) -> None:
    svc = AuthzService()
    await svc.start(grpc_addr or None, http_addr or None, reuse_port=True)
    done = asyncio.Event()
    threading.Thread(target=_reader, args=(asyncio.get_running_loop(), svc, done), daemon=True).start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await done.wait()
    await svc.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
