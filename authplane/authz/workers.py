"""N decision processes sharing the gRPC and HTTP ports (SO_REUSEPORT: the kernel spreads
connections), fed rule tables by the parent over a pipe; metrics aggregated with
prometheus-client's multiprocess mode.

    pool = start_workers(2, "127.0.0.1:9001", "127.0.0.1:9002")
    pool.update(policies, version)   # compiled once here, sent to every worker
    pool.registry                    # every worker's metrics, for /metrics
    pool.stop()
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, suppress

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from authplane.authz.rules import RuleTable, compile_table
from authplane.policy.documents import PolicySet

_LEN = struct.Struct("!I")
ACK_TIMEOUT = 5.0
"""How long ``update_table`` waits for every worker to say it decides with the new table."""
log = logging.getLogger("authplane.authz")


def _reserve(address: str, stack: ExitStack) -> str:
    """Resolve port 0 to a concrete port every worker can bind with SO_REUSEPORT. The reserving
    socket never listens, so it never receives connections."""
    from authplane.addresses import split_address

    host, port = split_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    return f"[{host}]:{s.getsockname()[1]}" if family == socket.AF_INET6 else f"{host}:{s.getsockname()[1]}"


def _expect(p: subprocess.Popen[bytes], word: bytes, timeout: float) -> bool:
    """Read one line of ``p``'s stdout; True if it is ``word``. Never blocks beyond ``timeout``
    (reads the pipe itself, byte by byte, so that no line waits in a buffer select cannot see)."""
    assert p.stdout is not None
    fd, line, deadline = p.stdout.fileno(), b"", time.monotonic() + timeout
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return False
        byte = os.read(fd, 1)
        if not byte:
            return False  # the worker exited
        line += byte
    return line.strip() == word


class WorkerPool:
    def __init__(self, procs: list[subprocess.Popen[bytes]], grpc_addr: str | None,
                 http_addr: str | None, metrics_dir: str) -> None:
        self.procs = procs
        self.grpc_addr, self.http_addr = grpc_addr, http_addr
        self.metrics_dir = metrics_dir
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=metrics_dir)
        self._lock = threading.Lock()

    def update(self, policies: PolicySet, version: str) -> None:
        self.update_table(compile_table(policies, version))

    def update_table(self, table: RuleTable, wait: bool = True) -> None:
        """Send ``table`` to every worker and, with ``wait``, return once each one decides with it
        (so that Envoys are sent a revision only after its rules are in place)."""
        data = pickle.dumps(table, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            for p in self.procs:
                assert p.stdin is not None
                p.stdin.write(_LEN.pack(len(data)) + data)
                p.stdin.flush()
            if wait:
                for p in self.procs:
                    if not _expect(p, b"swapped", ACK_TIMEOUT):
                        log.warning("decision worker %d did not confirm rules %s", p.pid, table.version)

    def stop(self, timeout: float = 5.0) -> None:
        for p in self.procs:
            if p.stdin is not None and not p.stdin.closed:
                with suppress(OSError):
                    p.stdin.close()  # EOF: the worker stops its servers and exits
        for p in self.procs:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)


def start_workers(n: int, grpc_addr: str | None = "127.0.0.1:9001",
                  http_addr: str | None = "127.0.0.1:9002", table: RuleTable | None = None,
                  timeout: float = 30.0, metrics_dir: str | None = None) -> WorkerPool:
    """Start ``n`` worker processes listening on the same ports; returns once all listen.
    ``metrics_dir``: prometheus-client's multiprocess directory (default: a new temporary one)."""
    metrics_dir = metrics_dir or tempfile.mkdtemp(prefix="authplane-authz-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    procs: list[subprocess.Popen[bytes]] = []
    with ExitStack() as stack:
        grpc_addr = _reserve(grpc_addr, stack) if grpc_addr else None
        http_addr = _reserve(http_addr, stack) if http_addr else None
        args = [sys.executable, "-m", "authplane.authz.worker", grpc_addr or "", http_addr or ""]
        pool = WorkerPool(procs, grpc_addr, http_addr, metrics_dir)
        try:
            for _ in range(n):
                procs.append(subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              env=env))
            pool.update_table(table or RuleTable.empty(), wait=False)  # swapped in before it listens
            for p in procs:
                if not _expect(p, b"ready", timeout):
                    p.kill()
                    raise RuntimeError(f"decision worker exited with {p.wait(timeout)}")
        except BaseException:
            pool.stop()
            raise
    return pool
