"""``authplane demo`` as a newcomer runs it: start it, paste the printed walk-through into a shell,
get what each ``# expect`` comment says, stop it with SIGTERM, and find nothing left running.

The demo listens on the fixed ports of the example policies (10000, 10001, 9080, 9400, 9500) and
the control-plane defaults; no other test uses those (they all ask the OS for ports).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from authplane.demo import Ports, busy_ports
from tests.test_cli import ROOT

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
def demo(tmp_path):
    busy = busy_ports(Ports().all())
    assert not busy, f"the demo's ports must be free for this test: {busy}"
    shutil.copytree(os.path.join(ROOT, "policies"), tmp_path / "policies")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    proc = subprocess.Popen([sys.executable, "-m", "authplane.cli", "demo"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
    assert not (cwd / "policies" / "demo-protect-open.yaml").exists()

    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    assert rest.rstrip().endswith("Stopped.") and "Traceback" not in rest
    assert busy_ports(Ports().all()) == []  # every server and Envoy it started is gone
    leftovers = subprocess.run(["pgrep", "-f", "authplane-demo-"], capture_output=True, text=True).stdout
    assert leftovers == "", f"processes left running: {leftovers}"


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
