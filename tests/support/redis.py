"""A real Redis (Debian ``redis-server``) on loopback for the session store tests: a free port, no
persistence (``--save '' --appendonly no``), started and stopped by PID."""

from __future__ import annotations

import shutil
import socket
import subprocess
from dataclasses import dataclass

from tests.support.ports import free_port, wait_for

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def missing() -> str | None:
    return None if shutil.which("redis-server") or shutil.which(REDIS_SERVER) else \
        "redis-server is not installed (Debian: redis-server)"


def _ping(port: int, password: str | None) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        if password:
            s.sendall(f"AUTH {password}\r\n".encode())
            if not s.recv(64).startswith(b"+OK"):
                return False
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")


@dataclass
class RedisServer:
    port: int
    password: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start (or restart, on the same port) and wait until it answers PING."""
        args = [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                "--protected-mode", "no", "--daemonize", "no", "--loglevel", "warning"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: self.proc is not None and self.proc.poll() is None and _ping(self.port, self.password),
                 f"redis-server on port {self.port}")
        return self

    def keys(self) -> int:
        """How many keys the server holds (DBSIZE)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            if self.password:
                s.sendall(f"AUTH {self.password}\r\n".encode())
                s.recv(64)
            s.sendall(b"DBSIZE\r\n")
            return int(s.recv(64).strip().lstrip(b":"))

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None


def start_redis(password: str | None = None) -> RedisServer:
    return RedisServer(free_port(), password).start()
