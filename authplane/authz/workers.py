"""N decision processes sharing the gRPC and HTTP ports (SO_REUSEPORT: the kernel spreads
connections), fed rule tables by the parent over a pipe; metrics aggregated with
prometheus-client's multiprocess mode. A worker that exits is restarted with the current table on
the same ports, after a back-off that grows while it keeps dying young.

    pool = start_workers(2, "127.0.0.1:9001", "127.0.0.1:9002")
    pool.update(policies, version)   # compiled once here, sent to every worker
    pool.registry                    # every worker's metrics, for /metrics
    pool.restarts                    # workers restarted so far
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
from collections.abc import Callable, Iterator
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from authplane.authz.rules import RuleTable, compile_table
from authplane.policy.documents import PolicySet
from authplane.policy.tlsfiles import TlsFiles, load_pems

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


RESTART_BASE, RESTART_MAX = 0.5, 30.0
"""Back-off of successive restarts of a worker that keeps dying young (seconds)."""
STABLE_AFTER = 10.0
"""A worker that ran this long before it exited is restarted at once (its back-off resets)."""
POLL = 0.2
"""How often the supervisor looks for exited workers."""


def restart_delay(failures: int) -> float:
    """Wait before the ``failures``-th restart in a row of a worker that died young: none for the
    first, then ``RESTART_BASE`` doubling up to ``RESTART_MAX`` (a worker crashing at start does not spin)."""
    return 0.0 if failures <= 1 else min(RESTART_BASE * 2 ** (failures - 2), RESTART_MAX)


class RestartCollector(Collector):
    """``authplane_authz_worker_restarts_total``, read from a pool (the parent process's count:
    prometheus-client's multiprocess files hold only the workers' own metrics)."""

    def __init__(self, count: Callable[[], int]) -> None:
        self.count = count

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("authplane_authz_worker_restarts",
                                  "Decision worker processes restarted after they exited", value=self.count())


@dataclass
class _Slot:
    """One worker position: its current process and its run of early deaths."""

    proc: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)
    failures: int = 0
    due: float | None = None
    """When the exited process is restarted (None: not noticed yet)."""


class WorkerPool:
    def __init__(self, args: list[str], env: dict[str, str], grpc_addr: str | None,
                 http_addr: str | None, metrics_dir: str, start_timeout: float = 30.0) -> None:
        self.args, self.env, self.start_timeout = args, env, start_timeout
        self.grpc_addr, self.http_addr = grpc_addr, http_addr
        self.metrics_dir = metrics_dir
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=metrics_dir)
        self.restarts = 0
        self.registry.register(RestartCollector(lambda: self.restarts))
        self._slots: list[_Slot] = []
        self._data = pickle.dumps(RuleTable.empty(), protocol=pickle.HIGHEST_PROTOCOL)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._starting: subprocess.Popen[bytes] | None = None
        self._supervisor: threading.Thread | None = None

    @property
    def procs(self) -> list[subprocess.Popen[bytes]]:
        """The current worker processes (a restarted worker's new one replaces the old)."""
        return [s.proc for s in self._slots]

    def _spawn(self) -> subprocess.Popen[bytes]:
        """A new worker, handed the current table (under the lock, so no update is missed)."""
        p = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self.env)
        _send(p, self._data)
        return p

    def update(self, policies: PolicySet, version: str) -> None:
        self.update_table(compile_table(policies, version))

    def update_table(self, table: RuleTable, wait: bool = True) -> None:
        """Send ``table`` to every worker and, with ``wait``, return once each one decides with it
        (so that Envoys are sent a revision only after its rules are in place). A worker that has
        exited is skipped: it is restarted with this table."""
        data = pickle.dumps(table, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            self._data = data
            sent = [p for p in self.procs if _send(p, data)]
            if wait:
                for p in sent:
                    if not _expect(p, b"swapped", ACK_TIMEOUT):
                        log.warning("decision worker %d did not confirm rules %s", p.pid, table.version)

    def start(self, n: int, table: RuleTable) -> None:
        """Start ``n`` workers deciding with ``table``; return once all listen, then supervise them."""
        with self._lock:
            self._data = pickle.dumps(table, protocol=pickle.HIGHEST_PROTOCOL)
            for _ in range(n):  # each swaps its table in before it listens
                self._slots.append(_Slot(self._spawn()))
        for p in self.procs:
            if not _expect(p, b"ready", self.start_timeout):
                p.kill()
                raise RuntimeError(f"decision worker exited with {p.wait(self.start_timeout)}")
        self._supervisor = threading.Thread(target=self._supervise, name="authz-workers", daemon=True)
        self._supervisor.start()

    def _supervise(self) -> None:
        while not self._stopping.wait(POLL):
            for slot in self._slots:
                code = slot.proc.poll()
                if code is None or self._stopping.is_set():
                    continue
                now = time.monotonic()
                if slot.due is None:
                    slot.failures = 1 if now - slot.started >= STABLE_AFTER else slot.failures + 1
                    slot.due = now + restart_delay(slot.failures)
                    log.warning("decision worker %d exited with %s after %.1fs; restarting it in %.1fs",
                                slot.proc.pid, code, now - slot.started, slot.due - now)
                if now >= slot.due:
                    self._restart(slot)

    def _restart(self, slot: _Slot) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            old, sent = slot.proc, self._data
            try:
                new = self._starting = self._spawn()
            except OSError as e:  # no process to be had (out of memory, of file descriptors): back off
                log.error("cannot start a decision worker: %s", e)
                slot.started, slot.due = time.monotonic(), None
                return
        ready = _expect(new, b"ready", self.start_timeout)
        with self._lock:
            self._starting = None
            if self._stopping.is_set():
                _end(new, 0)
                return
            if ready and self._data is not sent:  # a table came while it started
                ready = _send(new, self._data) and _expect(new, b"swapped", ACK_TIMEOUT)
            if not ready:
                _end(new, 0)
            slot.proc, slot.started, slot.due = new, time.monotonic(), None
            self.restarts += 1
        for pipe in (old.stdin, old.stdout):
            if pipe is not None:
                with suppress(OSError):
                    pipe.close()
        if ready:
            log.warning("decision worker %d replaces %d (restart %d)", new.pid, old.pid, self.restarts)
        else:
            log.error("restarted decision worker %d did not start (exit %s)", new.pid, new.returncode)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        with self._lock:
            if self._starting is not None:
                self._starting.kill()  # its "ready" wait ends; the supervisor ends it
        if self._supervisor is not None:
            self._supervisor.join()
        for p in self.procs:
            if p.stdin is not None and not p.stdin.closed:
                with suppress(OSError):
                    p.stdin.close()  # EOF: the worker stops its servers and exits
        for p in self.procs:
            _end(p, timeout)
        shutil.rmtree(self.metrics_dir, ignore_errors=True)


def _send(p: subprocess.Popen[bytes], data: bytes) -> bool:
    """Write one length-prefixed table to a worker; False if it has exited."""
    assert p.stdin is not None
    try:
        p.stdin.write(_LEN.pack(len(data)) + data)
        p.stdin.flush()
    except (BrokenPipeError, ValueError):  # exited (or its pipe was closed by ``stop``)
        return False
    return True


def _end(p: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait up to ``timeout`` for ``p`` to exit, then kill it."""
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def start_workers(n: int, grpc_addr: str | None = "127.0.0.1:9001",
                  http_addr: str | None = "127.0.0.1:9002", table: RuleTable | None = None,
                  timeout: float = 30.0, metrics_dir: str | None = None, tls: TlsFiles | None = None) -> WorkerPool:
    """Start ``n`` worker processes listening on the same ports; returns once all listen, with
    the pool supervising them. ``metrics_dir``: prometheus-client's multiprocess directory
    (default: a new temporary one). ``tls``: every worker serves TLS with these files (each one
    watches them); OSError here, before any worker starts, if they are unusable."""
    if tls is not None:
        load_pems(tls, "decision service")
    metrics_dir = metrics_dir or tempfile.mkdtemp(prefix="authplane-authz-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    with ExitStack() as stack:
        grpc_addr = _reserve(grpc_addr, stack) if grpc_addr else None
        http_addr = _reserve(http_addr, stack) if http_addr else None
        args = [sys.executable, "-m", "authplane.authz.worker", grpc_addr or "", http_addr or "",
                *(tls.paths() if tls is not None else ())]
        pool = WorkerPool(args, env, grpc_addr, http_addr, metrics_dir, timeout)
        try:
            pool.start(n, table or RuleTable.empty())
        except BaseException:
            pool.stop()
            raise
    return pool
