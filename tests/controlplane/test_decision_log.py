"""``serve --decision-log``: a real Envoy reports each decided request over its xDS connection
(gRPC access-log service); the lines name policy, level, check, rule, verdict and identity, never a
credential; a writer that does not keep up makes entries drop (counted), never requests wait."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys

from tests.support.http import request
from tests.support.policies import backend, documents, gateway, write_policies
from tests.support.ports import free_port, wait_for
from tests.support.processes import ServeProcess, start_envoys

API_KEY = "k3y-0f-acme-s3cr3t"
PASSWORD = "p4ssw0rd-s3cr3t"


def _htpasswd(user: str, password: str) -> str:
    return f"{user}:{{SHA}}{base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()}\n"


def _policies(tmp_path, port: int, echo_port: int) -> str:
    return write_policies(str(tmp_path / "policies"), {
        "keys.txt": f"acme: {API_KEY}\n",
        "users.htpasswd": _htpasswd("carol", PASSWORD),
        "gateway.yaml": documents(gateway("edge", port), backend("echo", echo_port), """
            kind: Route
            metadata: {name: app}
            spec:
              gateway: edge
              rules:
                - {name: api, match: {pathPrefix: /api}, backend: echo}
                - {name: ro, match: {pathPrefix: /ro}, backend: echo}
                - {name: keys, match: {pathPrefix: /keys}, backend: echo}
                - {name: basic, match: {pathPrefix: /basic}, backend: echo}
                - {name: canary, match: {pathPrefix: /canary}, backend: echo}
                - {name: canary-keys, match: {pathPrefix: /canary-keys}, backend: echo}
                - {name: open, match: {pathPrefix: /open}, backend: echo}
            """),
        "policies.yaml": """
            kind: AuthPolicy
            metadata: {name: jwt-rbac}
            spec:
              targetRef: {kind: Route, name: app, rule: api}
              jwt:
                providers:
                  - {name: dev, issuer: "https://idp.authplane.test", audiences: [api], jwks: {file: jwks.json},
                     from: [{header: authorization, prefix: "Bearer "}, {query: access_token}]}
              authorization:
                rules: [{name: admins, action: allow, when: {claims: {groups: [admins]}}}]
            ---
            kind: AuthPolicy
            metadata: {name: read-only}
            spec:
              targetRef: {kind: Route, name: app, rule: ro}
              authorization:
                default: allow
                rules: [{name: no-deletes, action: deny, when: {methods: [DELETE]}}]
            ---
            kind: AuthPolicy
            metadata: {name: partners}
            spec:
              targetRef: {kind: Route, name: app, rule: keys}
              apiKey: {file: keys.txt, header: x-api-key, clientHeader: x-client}
            ---
            kind: AuthPolicy
            metadata: {name: staging}
            spec:
              targetRef: {kind: Route, name: app, rule: basic}
              basicAuth: {file: users.htpasswd, userHeader: x-user}
            ---
            kind: AuthPolicy
            metadata: {name: canary}
            spec:
              targetRef: {kind: Route, name: app, rule: canary}
              mode: shadow
              jwt:
                providers:
                  - {name: dev, issuer: "https://idp.authplane.test", audiences: [api], jwks: {file: jwks.json}}
              authorization:
                rules: [{name: admins, action: allow, when: {claims: {groups: [admins]}}}]
            ---
            kind: AuthPolicy
            metadata: {name: canary-keys}
            spec:
              targetRef: {kind: Route, name: app, rule: canary-keys}
              mode: shadow
              apiKey: {file: keys.txt, header: x-api-key, clientHeader: x-client}
            """,
    })


def _lines(path: str, count: int) -> list[dict]:
    def enough() -> bool:
        return os.path.exists(path) and len(open(path).read().splitlines()) >= count

    wait_for(enough, f"{count} decision log lines in {path}", 30)
    with open(path) as f:
        return [json.loads(line) for line in f.read().splitlines()]


def _expect(port: int, path: str, expected: int, method: str = "GET", headers: dict[str, str] | None = None) -> None:
    """Send until the answer is ``expected`` (the first ones may race the routes' arrival)."""
    def answered() -> bool:
        return request(port, path, method, headers).status == expected

    wait_for(answered, f"{method} {path} answers {expected}", 20)


def _serve(tmp_path, processes, echo, *extra: str) -> tuple[ServeProcess, int]:
    envoys, serves = processes
    port = free_port()
    serve = ServeProcess(_policies(tmp_path, port, echo.port), str(tmp_path), 0, *extra).wait_started()
    serves.append(serve)
    envoys += start_envoys(str(tmp_path), serve.xds, [("edge-1", "edge", True)])
    serve.wait_in_sync("edge-1")
    _expect(port, "/open", 200)  # routes are in place: every later request is answered once
    return serve, port


def _decisions(serve: ServeProcess) -> dict[tuple[str, str, str], float]:
    return {(dict(labels)["policy"], dict(labels)["rule"], dict(labels)["verdict"]): v
            for (name, labels), v in serve.metrics().items() if name == "authplane_decisions_total"}


def test_decisions_logged_with_policy_rule_identity_and_no_secret(tmp_path, processes, jwks_file, idp, echo):
    log_path = str(tmp_path / "decisions.jsonl")
    serve, port = _serve(tmp_path, processes, echo, "--decision-log", log_path)
    admin, bob = idp.mint(sub="alice", groups=["admins"]), idp.mint(sub="bob", groups=["staff"])
    basic = base64.b64encode(f"carol:{PASSWORD}".encode()).decode()
    wrong = base64.b64encode(b"carol:not-it").decode()
    secrets = [admin, bob, admin.rpartition(".")[2], API_KEY, PASSWORD, basic, wrong, "c00kie-s3cr3t"]
    sent = [("/api/x", 200, "GET", {"authorization": f"Bearer {admin}", "cookie": "session=c00kie-s3cr3t"}),
            (f"/api/q?access_token={admin}", 200, "GET", {}),
            ("/api/x", 403, "GET", {"authorization": f"Bearer {bob}"}),
            ("/api/x", 401, "GET", {}),
            ("/ro/x", 200, "GET", {}),
            ("/ro/x", 403, "DELETE", {}),
            ("/keys/x", 200, "GET", {"x-api-key": API_KEY}),
            ("/keys/x", 401, "GET", {"x-api-key": f"{API_KEY}-not", "x-client": "mallory"}),
            ("/basic/x", 200, "GET", {"authorization": f"Basic {basic}", "x-user": "mallory"}),
            ("/basic/x", 401, "GET", {"authorization": f"Basic {wrong}"})]
    for path, status, method, headers in sent:
        assert request(port, path, method, headers).status == status, (method, path)
    lines = _lines(log_path, len(sent))
    with open(log_path) as f:
        text = f.read()
    for secret in secrets:
        assert secret not in text
    assert "/open" not in text and "access_token" not in text  # unchecked routes and paths are not logged

    got = [(r["route"], r["status"], r["policy"], r["level"], r["check"], r["rule"], r["verdict"], r["identity"])
           for r in lines]
    assert got == [
        ("app/api", 200, "jwt-rbac", "route", None, None, "allow", {"sub": "alice"}),
        ("app/api", 200, "jwt-rbac", "route", None, None, "allow", {"sub": "alice"}),
        ("app/api", 403, "jwt-rbac", "route", "authorization", None, "deny", {"sub": "bob"}),
        ("app/api", 401, "jwt-rbac", "route", "jwt", None, "deny", {}),
        ("app/ro", 200, "read-only", "route", None, None, "allow", {}),
        ("app/ro", 403, "read-only", "route", "authorization", "no-deletes", "deny", {}),
        ("app/keys", 200, "partners", "route", None, None, "allow", {"client": "acme"}),
        ("app/keys", 401, "partners", "route", "apiKey", None, "deny", {}),
        ("app/basic", 200, "staging", "route", None, None, "allow", {"user": "carol"}),
        ("app/basic", 401, "staging", "route", "basicAuth", None, "deny", {}),
    ]
    for r in lines:
        assert (r["fleet"], r["node"]) == ("edge", "edge-1") and len(r["request_id"]) == 36
        assert r["time"].startswith(("20", "21")) and r["origin"].startswith(os.path.join(str(tmp_path), "policies"))
    assert lines[0]["origin"].endswith("policies.yaml:1") and lines[4]["origin"].endswith("policies.yaml:14")

    decisions = _decisions(serve)
    assert decisions[("jwt-rbac", "", "allow")] == 2 and decisions[("jwt-rbac", "", "deny")] == 2
    assert decisions[("read-only", "no-deletes", "deny")] == 1
    assert {p for p, _, _ in decisions} <= {"jwt-rbac", "read-only", "partners", "staging", "canary"}
    entries = {dict(labels)["result"]: v for (name, labels), v in serve.metrics().items()
               if name == "authplane_decision_log_entries_total"}
    assert entries == {"written": len(sent), "dropped": 0, "failed": 0}

    os.rename(log_path, log_path + ".1")  # rotation: move the file, then SIGHUP
    serve.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reopening" in serve.log(), "serve to see SIGHUP", 20)
    assert request(port, "/ro/x").status == 200
    assert [r["route"] for r in _lines(log_path, 1)] == ["app/ro"]
    assert len(_lines(log_path + ".1", len(sent))) == len(sent) and serve.proc.poll() is None


def test_shadow_would_denies_in_log_metrics_and_status(tmp_path, processes, jwks_file, idp, echo):
    log_path = str(tmp_path / "decisions.jsonl")
    serve, port = _serve(tmp_path, processes, echo, "--decision-log", log_path)
    admin, bob = idp.mint(sub="alice", groups=["admins"]), idp.mint(sub="bob", groups=["staff"])
    for token in (admin, bob, bob):
        assert request(port, "/canary/x", headers={"authorization": f"Bearer {token}"}).status == 200
    lines = _lines(log_path, 3)
    assert [(r["policy"], r["verdict"], r["identity"]) for r in lines] == [
        ("canary", "allow", {"sub": "alice"}), ("canary", "would-deny", {"sub": "bob"}),
        ("canary", "would-deny", {"sub": "bob"})]
    assert lines[1]["check"] == "authorization" and lines[1]["would_deny"][0]["policy"] == "canary"
    assert _decisions(serve)[("canary", "", "would-deny")] == 2
    for key in (API_KEY, "wrong-key"):  # the shadow key check never denies; the wrong key is recorded
        assert request(port, "/canary-keys/x", headers={"x-api-key": key, "x-client": "mallory"}).status == 200
    keys = _lines(log_path, 5)[3:]
    assert [(r["policy"], r["check"], r["verdict"], r["identity"]) for r in keys] == [
        ("canary-keys", None, "allow", {}), ("canary-keys", "apiKey", "would-deny", {})]
    assert API_KEY not in (tmp_path / "decisions.jsonl").read_text()
    shadow = serve.status()["shadow"]
    assert shadow == {"canary": {"decisions": 3, "would_deny": 2, "rate": round(2 / 3, 4),
                                 "top_identities": [{"identity": "sub:bob", "would_deny": 2}]},
                      "canary-keys": {"decisions": 2, "would_deny": 1, "rate": 0.5,
                                      "top_identities": [{"identity": "anonymous", "would_deny": 1}]}}
    out = subprocess.run([sys.executable, "-m", "authplane.cli", "status", "--admin", serve.address],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("canary"))
    assert row.split()[:4] == ["canary", "2", "3", "66.7%"] and "sub:bob (2)" in row


def test_slow_writer_drops_and_counts_without_blocking_requests(tmp_path, processes, jwks_file, echo):
    fifo = str(tmp_path / "decisions.fifo")
    os.mkfifo(fifo)  # nobody reads it: the writer blocks opening it
    serve, port = _serve(tmp_path, processes, echo, "--decision-log", fifo, "--decision-log-queue", "5")
    sent = 40
    for _ in range(sent):
        assert request(port, "/ro/x").status == 200

    def entries() -> dict[str, float]:
        return {dict(labels)["result"]: v for (name, labels), v in serve.metrics().items()
                if name == "authplane_decision_log_entries_total"}

    wait_for(lambda: _decisions(serve).get(("read-only", "", "allow")) == sent, "every entry counted", 30)
    assert entries()["dropped"] >= sent - 5  # at most 5 lines queued or in the stuck writer's hands
    assert entries()["written"] == 0
    assert request(port, "/ro/x").status == 200 and serve.status()["nodes"][0]["state"] == "in sync"
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # now the writer gets through
    try:
        data = b""

        def drained() -> bool:
            nonlocal data
            with contextlib.suppress(BlockingIOError):
                data += os.read(reader, 1 << 16)
            e = entries()
            return e["written"] + e["dropped"] == sent + 1 and data.count(b"\n") == e["written"]

        wait_for(drained, "the queued entries written once the FIFO is read", 30)
        assert all(json.loads(line)["policy"] == "read-only" for line in data.splitlines())
    finally:
        os.close(reader)
