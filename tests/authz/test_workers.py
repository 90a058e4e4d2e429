"""Supervised decision workers: a worker that dies is restarted on the same ports with the current
rules, counted in ``authplane_authz_worker_restarts_total``, and stopping stops every worker."""

from __future__ import annotations

import glob
import logging
import os
import signal
import subprocess
import sys

from prometheus_client import generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from authplane.authz.rules import compile_table
from authplane.authz.workers import RESTART_BASE, RESTART_MAX, restart_delay, start_workers
from authplane.policy.loader import load_dir
from tests.support.http import metric_samples, request
from tests.support.policies import app_gateway, app_policy, write_policies
from tests.support.ports import wait_for
from tests.support.processes import ServeProcess

ALLOW = "service: builtin\nrules: [{name: team, action: allow, when: {headers: {x-team: [blue]}}}]"
DENY = "service: builtin\nrules: [{name: nobody, action: deny, deny: {status: 403, body: nobody}}]"
RESTARTS = ("authplane_authz_worker_restarts_total", ())
DENIED = ("authplane_authz_decisions_total", (("policy", "p"), ("result", "deny"), ("rule", "nobody")))


def policy_dir(directory: str, ext: str) -> str:
    return write_policies(directory, {"p.yaml": app_gateway(9) + "---\n" + app_policy(ext, name="p")})


def http_port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def check(port: int) -> int:
    """One check on a new connection (the kernel picks the worker), its HTTP status."""
    return request(port, "/envoy/p/x", headers={"x-team": "blue"}).status


def gone(pid: int) -> bool:
    """Exited: no process, or a zombie whose threads have all exited (so its sockets are closed;
    a killed leader turns zombie while its other threads may still hold the files)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            zombie = f.read().rpartition(")")[2].split()[0] == "Z"
        return zombie and os.listdir(f"/proc/{pid}/task") == [str(pid)]
    except FileNotFoundError:
        return True


def children(pid: int) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()} - {p for p in map(int, out.split()) if gone(p)}


def decisions_of(metrics_dir: str, pid: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The decision counters of one worker process alone (its own multiprocess file)."""
    files = glob.glob(os.path.join(metrics_dir, f"counter_{pid}.db"))
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for m in MultiProcessCollector.merge(files) for s in m.samples}


def test_restart_back_off_is_bounded():
    delays = [restart_delay(n) for n in range(1, 12)]
    assert delays[0] == 0 and delays[1] == RESTART_BASE
    assert delays == sorted(delays) and max(delays) == RESTART_MAX


def test_a_worker_that_cannot_start_is_retried_with_growing_waits(caplog):
    caplog.set_level(logging.WARNING, "authplane.authz")
    pool = start_workers(1, None, "127.0.0.1:0")
    try:
        pool.args = [sys.executable, "-c", "raise SystemExit(3)"]  # from now on every start fails
        pool.procs[0].kill()
        wait_for(lambda: pool.restarts >= 3, "three restarts", 20)
    finally:
        pool.stop()
    waits = [r.getMessage().rpartition(" in ")[2] for r in caplog.records if "restarting it in" in r.getMessage()]
    assert waits[:3] == ["0.0s", "0.5s", "1.0s"]
    assert sum("did not start (exit 3)" in r.getMessage() for r in caplog.records) >= 2
    assert all(p.poll() is not None for p in pool.procs)


def test_a_killed_worker_is_restarted_with_the_current_rules(tmp_path):
    allow = compile_table(load_dir(policy_dir(str(tmp_path / "allow"), ALLOW)), "v1")
    deny = compile_table(load_dir(policy_dir(str(tmp_path / "deny"), DENY)), "v2")
    pool = start_workers(2, "127.0.0.1:0", "127.0.0.1:0", allow)
    try:
        port = http_port(pool.http_addr or "")
        victim, survivor = pool.procs
        victim.send_signal(signal.SIGKILL)
        wait_for(lambda: gone(victim.pid), "the killed worker to exit", 10)
        answers = [check(port) for _ in range(20)]  # the other worker answers meanwhile
        new = wait_for(lambda: next((p for p in pool.procs if p.pid not in (victim.pid, survivor.pid)), None),
                       "a new worker", 15)
        answers += [check(port) for _ in range(20)]
        assert set(answers) == {200}
        assert [p.pid for p in pool.procs] == [new.pid, survivor.pid] and new.poll() is None
        assert pool.restarts == 1
        assert metric_samples(generate_latest(pool.registry).decode())[RESTARTS] == 1

        pool.update_table(deny)  # reaches the new worker too: it answers with the new rule
        wait_for(lambda: check(port) == 403 and decisions_of(pool.metrics_dir, new.pid).get(DENIED),
                 "the new worker to deny with the new rules", 15)
        assert {check(port) for _ in range(20)} == {403}
    finally:
        pool.stop()
    assert all(p.returncode == 0 for p in pool.procs)
    assert gone(victim.pid) and gone(new.pid) and gone(survivor.pid)


def test_serve_restarts_a_killed_worker_and_stops_them_all(tmp_path, processes):
    _, serves = processes
    workers = 2
    d = policy_dir(str(tmp_path / "policies"), ALLOW)
    serves.append(serve := ServeProcess(d, str(tmp_path), 0, "--authz-workers", str(workers)).wait_started())
    port = http_port(serve.authz_http)
    assert check(port) == 200
    before = wait_for(lambda: len(found := children(serve.proc.pid)) == workers and found, "the workers", 10)
    assert serve.metrics()[RESTARTS] == 0

    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: gone(victim), "the killed worker to exit", 10)
    answers = [check(port) for _ in range(20)]
    wait_for(lambda: serve.metrics()[RESTARTS] == 1, "the worker to be back", 15)
    after = children(serve.proc.pid)
    answers += [check(port) for _ in range(20)]
    assert set(answers) == {200}
    assert len(after) == workers and victim not in after and len(after - before) == 1
    assert "decision worker" in serve.log() and "restart 1" in serve.log()

    policy_dir(d, DENY)  # a saved edit: every worker, the new one included, confirms it before serve goes on
    wait_for(lambda: check(port) == 403, "the edit to apply", 15)
    assert {check(port) for _ in range(40)} == {403}
    (new,) = after - before
    with open(f"/proc/{new}/environ", "rb") as f:
        env = dict(v.partition(b"=")[::2] for v in f.read().split(b"\0") if v)
    assert decisions_of(env[b"PROMETHEUS_MULTIPROC_DIR"].decode(), new).get(DENIED)  # the new worker denied
    assert serve.stop(signal.SIGTERM) == 0
    assert all(gone(pid) for pid in after | before)  # no orphan
