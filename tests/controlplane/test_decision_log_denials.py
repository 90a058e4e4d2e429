"""``serve --decision-log``: an enforced denial by a builtin ``extAuth`` rule names its rule in the
log line and ``authplane_decisions_total`` for both protocols, with the decision service in
process and in worker processes; the client's answer carries no rule name (``contract.DENIED``)."""

from __future__ import annotations

import pytest

from tests.controlplane.test_decision_log import _decisions, _lines
from tests.support.http import request
from tests.support.policies import backend, documents, gateway, write_policies
from tests.support.ports import free_port, wait_for
from tests.support.processes import ServeProcess, start_envoys

POLICIES = """\
kind: Route
metadata: {name: app}
spec:
  gateway: edge
  rules:
    - {name: http, match: {pathPrefix: /http}, backend: echo}
    - {name: grpc, match: {pathPrefix: /grpc}, backend: echo}
---
kind: AuthPolicy
metadata: {name: ext-http}
spec:
  targetRef: {kind: Route, name: app, rule: http}
  extAuth:
    service: builtin
    protocol: http
    rules:
      - {name: no-blue, action: deny, when: {headers: {x-team: [blue]}},
         deny: {status: 403, body: "not for you", headers: {x-reason: team}}}
      - {name: members, action: allow, when: {headers: {x-member: ["yes"]}}}
---
kind: AuthPolicy
metadata: {name: ext-grpc}
spec:
  targetRef: {kind: Route, name: app, rule: grpc}
  extAuth:
    service: builtin
    protocol: grpc
    rules:
      - {name: no-green, action: deny, when: {headers: {x-team: [green]}},
         deny: {status: 403, body: "not for you", headers: {x-reason: team}}}
      - {name: members, action: allow, when: {headers: {x-member: ["yes"]}}}
"""
RULES = ("no-blue", "no-green", "members")


@pytest.mark.parametrize("workers", ["0", "1"])
def test_an_enforced_builtin_denial_names_its_rule_for_http_and_grpc(tmp_path, processes, echo, workers):
    envoys, serves = processes
    port, grpc_port, http_port = free_port(), free_port(), free_port()
    d = write_policies(str(tmp_path / "policies"), {
        "policies.yaml": documents(gateway("edge", port), backend("echo", echo.port), POLICIES)})
    log_path = str(tmp_path / "decisions.jsonl")
    serve = ServeProcess(d, str(tmp_path), 0, "--decision-log", log_path, "--authz-workers", workers,
                         "--authz-grpc", f"127.0.0.1:{grpc_port}", "--authz-grpc-listen", f"127.0.0.1:{grpc_port}",
                         "--authz-http", f"127.0.0.1:{http_port}", "--authz-http-listen", f"127.0.0.1:{http_port}",
                         ).wait_started()
    serves.append(serve)
    envoys += start_envoys(str(tmp_path), serve.xds, [("edge-1", "edge", True)])
    serve.wait_in_sync("edge-1")
    member = {"x-member": "yes"}
    wait_for(lambda: all(request(port, f"/{p}/x", headers=member).status == 200 for p in ("http", "grpc")),
             "both routes allow a member", 20)
    count = len(_lines(log_path, 2))  # the allows while the routes arrived

    sent = [("/http/x", "blue"), ("/grpc/x", "green"), ("/http/x", "red"), ("/grpc/x", "red")]
    answers = [request(port, path, headers={**member, "x-team": team} if team != "red" else {"x-team": team})
               for path, team in sent]
    assert [a.status for a in answers] == [403, 403, 403, 403]
    for answer in answers[:2]:  # the rule's own answer, and nothing of the report
        assert answer.body == "not for you" and answer.headers["x-reason"] == "team"
        assert not any("authplane" in k or any(r in v for r in RULES) for k, v in answer.headers.items())
        assert not any(r in answer.body for r in RULES)

    got = [(r["policy"], r["check"], r["rule"], r["verdict"], r["status"])
           for r in _lines(log_path, count + len(sent))[count:]]
    assert got == [
        ("ext-http", "extAuth", "no-blue", "deny", 403),
        ("ext-grpc", "extAuth", "no-green", "deny", 403),
        ("ext-http", "extAuth", None, "deny", 403),  # no rule matched: no rule to name
        ("ext-grpc", "extAuth", None, "deny", 403),
    ]
    decisions = _decisions(serve)
    assert decisions[("ext-http", "no-blue", "deny")] == 1
    assert decisions[("ext-grpc", "no-green", "deny")] == 1
