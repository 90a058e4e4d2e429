"""``serve --decision-log``: a real Envoy reports each decided request over its xDS connection
(gRPC access-log service, or with ``--decision-log-transport native`` authplane's module in
batches over the xDS cluster: the tests taking ``transport`` run both ways); the lines name
policy, level, check, rule, verdict and identity, never a credential; a writer that does not keep
up makes entries drop (counted), never requests wait."""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.support.http import request
from tests.support.native import search_path
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


@pytest.fixture(params=["grpc", "native"])
def transport(request) -> Iterator[tuple[str, ...]]:
    """The serve flags of each way out of Envoy; for ``native`` Envoy finds the module meanwhile."""
    if request.param == "grpc":
        yield ()
        return
    with search_path(request.getfixturevalue("native_module")):
        yield ("--decision-log-transport", "native")


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


def _serve(tmp_path, processes, echo, *extra: str, transport: tuple[str, ...] = ()) -> tuple[ServeProcess, int]:
    envoys, serves = processes
    port = free_port()
    serve = ServeProcess(_policies(tmp_path, port, echo.port), str(tmp_path), 0, *extra, *transport).wait_started()
    serves.append(serve)
    envoys += start_envoys(str(tmp_path), serve.xds, [("edge-1", "edge", True)], native_log=bool(transport))
    serve.wait_in_sync("edge-1")
    _expect(port, "/open", 200)  # routes are in place: every later request is answered once
    return serve, port


def _decisions(serve: ServeProcess) -> dict[tuple[str, str, str], float]:
    return {(dict(labels)["policy"], dict(labels)["rule"], dict(labels)["verdict"]): v
            for (name, labels), v in serve.metrics().items() if name == "authplane_decisions_total"}


def test_decisions_logged_with_policy_rule_identity_and_no_secret(tmp_path, processes, jwks_file, idp, echo, transport):
    log_path = str(tmp_path / "decisions.jsonl")
    serve, port = _serve(tmp_path, processes, echo, "--decision-log", log_path, transport=transport)
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
        assert r["origin"].startswith(os.path.join(str(tmp_path), "policies"))
        when = datetime.datetime.strptime(r["time"], "%Y-%m-%dT%H:%M:%S.%f%z")  # the same text both ways
        assert len(r["time"]) == 29 and abs(time.time() - when.timestamp()) < 60
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


def test_shadow_would_denies_in_log_metrics_and_status(tmp_path, processes, jwks_file, idp, echo, transport):
    log_path = str(tmp_path / "decisions.jsonl")
    serve, port = _serve(tmp_path, processes, echo, "--decision-log", log_path, transport=transport)
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


ATTRIBUTION = """
    kind: Route
    metadata: {name: app}
    spec:
      gateway: edge
      rules:
        - {name: api, match: {pathPrefix: /api}, backend: echo}
        - {name: ext, match: {pathPrefix: /ext}, backend: echo}
        - {name: open, match: {pathPrefix: /open}, backend: echo}
    ---
    kind: AuthPolicy
    metadata: {name: members}
    spec:
      targetRef: {kind: Gateway, name: edge}
      authorization:
        rules:
          - {name: members, action: allow, when: {headers: {x-member: ["yes"]}}}
          - {name: no-red, action: deny, when: {headers: {x-team: [red]}}}
    ---
    kind: AuthPolicy
    metadata: {name: admins}
    spec:
      targetRef: {kind: Route, name: app, rule: api}
      authorization:
        rules:
          - {name: admins, action: allow, when: {headers: {x-role: [admin]}}}
          - {name: no-deletes, action: deny, when: {methods: [DELETE]}}
    ---
    kind: AuthPolicy
    metadata: {name: ext}
    spec:
      targetRef: {kind: Route, name: app, rule: ext}
      extAuth:
        service: builtin
        rules:
          - {name: no-blue, action: deny, when: {headers: {x-team: [blue]}}}
          - {name: no-writes, action: deny, mode: shadow, when: {methods: [POST]}}
          - {name: rest, action: allow}
    ---
    kind: AuthPolicy
    metadata: {name: open}
    spec: {targetRef: {kind: Route, name: app, rule: open}, public: true}
"""


def _serve_attribution(tmp_path, processes, echo, log_path: str, *extra: str,
                       transport: tuple[str, ...] = ()) -> tuple[ServeProcess, int]:
    envoys, serves = processes
    port = free_port()
    d = write_policies(str(tmp_path / "policies"), {
        "policies.yaml": documents(gateway("edge", port), backend("echo", echo.port), ATTRIBUTION)})
    grpc_port, http_port = free_port(), free_port()  # Envoy's clusters of the builtin decision service
    serve = ServeProcess(d, str(tmp_path), 0, "--decision-log", log_path,
                         "--authz-grpc", f"127.0.0.1:{grpc_port}", "--authz-grpc-listen", f"127.0.0.1:{grpc_port}",
                         "--authz-http", f"127.0.0.1:{http_port}", "--authz-http-listen", f"127.0.0.1:{http_port}",
                         *extra, *transport).wait_started()
    serves.append(serve)
    envoys += start_envoys(str(tmp_path), serve.xds, [("edge-1", "edge", True)], native_log=bool(transport))
    serve.wait_in_sync("edge-1")
    _expect(port, "/open", 200)  # public: not logged
    return serve, port


def test_rbac_denials_name_the_level_that_denied_and_the_deny_rule_that_excluded(tmp_path, processes, echo, transport):
    """Both levels ``default: deny``: Envoy's ``matched_policy[none]`` alone cannot tell which
    level denied, nor which deny rule excluded the request; the per-policy enforced result and
    the ``deny_prefix`` shadow rules can (``contract.py``)."""
    log_path = str(tmp_path / "decisions.jsonl")
    serve, port = _serve_attribution(tmp_path, processes, echo, log_path, transport=transport)
    member = {"x-member": "yes"}
    sent = [("GET", {**member, "x-role": "admin"}, 200),
            ("GET", {"x-role": "admin"}, 403),  # no gateway allow rule matched
            ("GET", {**member, "x-role": "admin", "x-team": "red"}, 403),  # the gateway's deny rule
            ("DELETE", {**member, "x-role": "admin"}, 403),  # the route's deny rule
            ("GET", member, 403)]  # no route allow rule matched
    for method, headers, status in sent:
        assert request(port, "/api/x", method, headers).status == status, (method, headers)
    got = [(r["status"], r["policy"], r["level"], r["check"], r["rule"], r["verdict"])
           for r in _lines(log_path, len(sent))]
    assert got == [
        (200, "admins", "route", None, None, "allow"),
        (403, "members", "gateway", "authorization", None, "deny"),
        (403, "members", "gateway", "authorization", "no-red", "deny"),
        (403, "admins", "route", "authorization", "no-deletes", "deny"),
        (403, "admins", "route", "authorization", None, "deny"),
    ]
    decisions = _decisions(serve)
    assert decisions[("members", "no-red", "deny")] == 1 and decisions[("admins", "no-deletes", "deny")] == 1


def test_a_shadow_builtin_rule_is_logged_counted_and_in_status_by_name(tmp_path, processes, echo, transport):
    log_path = str(tmp_path / "decisions.jsonl")
    serve, port = _serve_attribution(tmp_path, processes, echo, log_path, transport=transport)
    member = {"x-member": "yes"}
    for method, headers, status in [("POST", member, 200), ("GET", member, 200),
                                    ("POST", {**member, "x-team": "blue"}, 403)]:
        assert request(port, "/ext/x", method, headers).status == status, (method, headers)
    lines = _lines(log_path, 3)
    got = [(r["status"], r["policy"], r["check"], r["rule"], r["verdict"], r.get("would_deny")) for r in lines]
    shadow_rule = [{"policy": "ext", "level": "route", "check": "extAuth", "rule": "no-writes",
                    "origin": lines[0]["origin"]}]  # one would-deny: the recorder's is the same one
    assert got == [
        (200, "ext", "extAuth", "no-writes", "would-deny", shadow_rule),
        (200, "ext", None, None, "allow", None),
        (403, "ext", "extAuth", "no-blue", "deny", None),  # the enforced rule; the shadow one adds nothing
    ]
    assert _decisions(serve)[("ext", "no-writes", "would-deny")] == 1
    status = serve.status()["shadow"]
    assert set(status) == {"ext"}
    assert (status["ext"]["decisions"], status["ext"]["would_deny"]) == (3, 1)


def _filtered(port: int) -> None:
    """Allows, a deny and a would-deny (by the shadow builtin rule), allows last."""
    member = {"x-member": "yes"}
    sent = [("GET", "/api/x", {**member, "x-role": "admin"}, 200)] * 10 + [
        ("GET", "/api/x", member, 403), ("POST", "/ext/x", member, 200)] + [("GET", "/ext/x", member, 200)] * 10
    for method, path, headers, status in sent:
        assert request(port, path, method, headers).status == status, (method, path, headers)


def test_envoy_reports_only_the_verdicts_asked_for(tmp_path, processes, echo, transport):
    """``--decision-log-verdicts deny,would-deny``: Envoy's access-log filter tells the verdicts
    apart, so the allows never leave Envoy (nothing to write, count or drop)."""
    log_path = str(tmp_path / "decisions.jsonl")
    serve, port = _serve_attribution(tmp_path, processes, echo, log_path, "--decision-log-verdicts", "deny,would-deny",
                                     transport=transport)
    _filtered(port)
    assert request(port, "/api/x", "DELETE", {"x-member": "yes", "x-role": "admin"}).status == 403  # the last line
    lines = _lines(log_path, 3)
    assert [(r["policy"], r["rule"], r["verdict"]) for r in lines] == [
        ("admins", None, "deny"), ("ext", "no-writes", "would-deny"), ("admins", "no-deletes", "deny")]
    decisions = _decisions(serve)
    assert decisions.get(("admins", "", "allow"), 0) == 0 and decisions.get(("ext", "", "allow"), 0) == 0


def test_a_sample_of_the_allows_is_reported_and_every_denial(tmp_path, processes, echo, transport):
    """``--decision-log-sample 0.000001``: one allow in a million is reported (by request id: the
    20 allows here are all left out but with a probability of 2e-5), every deny and would-deny is."""
    log_path = str(tmp_path / "decisions.jsonl")
    serve, port = _serve_attribution(tmp_path, processes, echo, log_path, "--decision-log-sample", "0.000001",
                                     transport=transport)
    _filtered(port)
    assert request(port, "/api/x", "DELETE", {"x-member": "yes", "x-role": "admin"}).status == 403
    lines = _lines(log_path, 3)
    assert [(r["policy"], r["verdict"]) for r in lines] == [("admins", "deny"), ("ext", "would-deny"),
                                                            ("admins", "deny")]
    assert serve.status()["shadow"]["ext"]["would_deny"] == 1


def test_lines_are_json_whatever_the_strings_envoy_sends(tmp_path):
    """Lines are written as text from pre-encoded parts, not ``json.dumps`` of a dict: quotes,
    backslashes, control and non-ASCII characters in what Envoy sends still make valid JSON."""
    from envoy.data.accesslog.v3 import accesslog_pb2
    from prometheus_client import CollectorRegistry

    from authplane.controlplane.decisions import DecisionLog
    from authplane.controlplane.metrics import DecisionMetrics
    from authplane.controlplane.store import Revision
    from authplane.policy.loader import load_dir

    d = write_policies(str(tmp_path / "policies"), {"policies.yaml": documents(
        gateway("edge", 8080), backend("echo", 9000), ATTRIBUTION)})
    log = DecisionLog(os.devnull, DecisionMetrics(CollectorRegistry()))
    log.on_revision(Revision({}, load_dir(d)))
    lines: list[str] = []
    log.writer.offer = lambda batch: lines.extend(batch) or 0  # type: ignore[method-assign]
    odd = 'a"b\\c\u00e9\u2028\x01'
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.common_properties.route_name = "app/api"
    entry.common_properties.start_time.seconds = 1_800_000_000
    entry.common_properties.start_time.nanos = 123_999_999
    entry.common_properties.metadata.filter_metadata["envoy.filters.http.jwt_authn"].update(
        {"jwt_payload": {"sub": odd}})
    entry.request.request_id = odd
    entry.response.response_code.value = 403
    entry.response.response_code_details = f"rbac_access_denied_matched_policy[{odd}]"
    log.entries("edge", odd, [entry])
    assert len(lines) == 1 and lines[0].endswith("}\n") and lines[0].isascii()
    record = json.loads(lines[0])
    assert record == {
        "time": "2027-01-15T08:00:00.123+00:00", "fleet": "edge", "node": odd, "request_id": odd,
        "route": "app/api", "policy": "admins", "level": "route", "check": "authorization", "rule": None,
        "verdict": "deny", "status": 403, "details": entry.response.response_code_details,
        "identity": {"sub": odd}, "origin": record["origin"]}
    text = (tmp_path / "policies" / "policies.yaml").read_text().splitlines()
    start = text.index("metadata: {name: admins}") - 1  # 1-based: the document's first line, two above
    assert record["origin"] == f"{d}/policies.yaml:{start}"
