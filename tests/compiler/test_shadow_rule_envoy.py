"""``mode: shadow`` on single builtin ``extAuth`` rules of enforcing policies, through a real Envoy
and the decision service both in-process and as worker processes: enforcement skips the shadow
rules, a would-deny by one of them reaches Envoy's dynamic metadata with the rule named (where
``authplane/contract.py`` says), and a shadow allow rule allows nothing yet."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from authplane.authz.rules import compile_table
from authplane.authz.workers import start_workers
from authplane.compiler.ir import CompileOptions
from authplane.contract import (
    RBAC_DENIED,
    SHADOW_POLICY_KEY,
    SHADOW_RULE_KEY,
    SHADOW_VERDICT_KEY,
    WOULD_DENY,
)
from authplane.policy.loader import load_dir
from tests.compiler.test_shadow_envoy import LOG_FIELDS, Shadow, shadow_result
from tests.support.policies import write_policies
from tests.support.processes import ServiceThread, start_static_envoy

POLICIES = """
    kind: Gateway
    metadata: {{name: edge}}
    spec: {{fleet: edge, listeners: [{{name: http, port: 8080}}]}}
    ---
    kind: Backend
    metadata: {{name: echo}}
    spec: {{endpoints: ["127.0.0.1:{echo}"]}}
    ---
    kind: Route
    metadata: {{name: app}}
    spec:
      gateway: edge
      rules:
        - {{name: http, match: {{pathPrefix: /http}}, backend: echo}}
        - {{name: grpc, match: {{pathPrefix: /grpc}}, backend: echo}}
    ---
    kind: AuthPolicy
    metadata: {{name: http}}
    spec:
      targetRef: {{kind: Route, name: app, rule: http}}
      extAuth:
        service: builtin
        rules:
          - {{name: no-red, action: deny, when: {{headers: {{x-team: [red]}}}}}}
          - {{name: auditors, action: allow, mode: shadow, when: {{headers: {{x-role: [auditor]}}}}}}
          - {{name: no-writes, action: deny, mode: shadow, when: {{methods: [POST]}}}}
          - {{name: blue, action: allow, upstreamHeaders: {{x-checked: "yes"}}, when: {{headers: {{x-team: [blue]}}}}}}
    ---
    kind: AuthPolicy
    metadata: {{name: grpc}}
    spec:
      targetRef: {{kind: Route, name: app, rule: grpc}}
      extAuth:
        service: builtin
        protocol: grpc
        rules:
          - {{name: no-red, action: deny, when: {{headers: {{x-team: [red]}}}}}}
          - {{name: auditors, action: allow, mode: shadow, when: {{headers: {{x-role: [auditor]}}}}}}
          - {{name: no-writes, action: deny, mode: shadow, when: {{methods: [POST]}}}}
          - {{name: blue, action: allow, upstreamHeaders: {{x-checked: "yes"}}, when: {{headers: {{x-team: [blue]}}}}}}
"""


class Edge(Shadow):
    """``Shadow.send`` on this module's one listener."""

    def __init__(self, envoy: Any, log: str) -> None:
        self.envoy, self.log = envoy, log
        self.port = envoy.listener_port("edge/http")


@pytest.fixture(scope="module", params=["in-process", "workers"])
def edge(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    from authplane.devtools.echo import EchoServer

    tmp = tmp_path_factory.mktemp("shadow-rule")
    echo = EchoServer().start()
    d = write_policies(str(tmp / "policies"), {"policies.yaml": POLICIES.format(echo=echo.port)})
    svc, pool = None, None
    if request.param == "workers":
        pool = start_workers(1, "127.0.0.1:0", "127.0.0.1:0", compile_table(load_dir(d), "v1"))
        opts = CompileOptions(authz_grpc=pool.grpc_addr, authz_http=pool.http_addr)
    else:
        svc = ServiceThread(d)
        opts = svc.opts
    log = str(tmp / "access.log")
    envoy = start_static_envoy(d, "edge", str(tmp), opts, access_log=(log, LOG_FIELDS))
    try:
        yield Edge(envoy, log)
    finally:
        envoy.stop()
        if pool is not None:
            pool.stop()
        if svc is not None:
            svc.close()
        echo.stop()


def recorded(entry: dict[str, Any], policy: str) -> str | None:
    return shadow_result(entry, "extAuth", "route", policy)[0]


@pytest.mark.parametrize("policy", ["http", "grpc"])
def test_a_shadow_deny_rule_lets_the_request_pass_with_the_enforced_allow_and_reports_itself(edge, policy):
    r, entry = edge.send(f"/{policy}", {"x-team": "blue"}, method="POST")
    assert r.status == 200
    assert r.json()["headers"].get("x-checked") == "yes"  # the enforced allow rule's headers
    assert SHADOW_VERDICT_KEY not in r.json()["headers"]  # the report never reaches the upstream
    report = entry["ext_authz"]
    assert (report[SHADOW_VERDICT_KEY], report[SHADOW_POLICY_KEY], report[SHADOW_RULE_KEY]) == (
        WOULD_DENY, policy, "no-writes")
    assert recorded(entry, policy) == RBAC_DENIED


@pytest.mark.parametrize("policy", ["http", "grpc"])
def test_the_enforced_rules_deny_as_if_the_shadow_rules_were_not_there(edge, policy):
    r, _ = edge.send(f"/{policy}", {"x-team": "red"}, method="POST")
    assert r.status == 403
    # A shadow allow rule allows nothing yet: the auditor without the blue team matches no
    # enforced rule.
    r, _ = edge.send(f"/{policy}", {"x-role": "auditor"})
    assert r.status == 403
    r, entry = edge.send(f"/{policy}", {"x-team": "blue"})
    assert r.status == 200
    assert SHADOW_VERDICT_KEY not in (entry["ext_authz"] or {})
    assert recorded(entry, policy) == "allowed"


@pytest.mark.parametrize("policy", ["http", "grpc"])
def test_a_shadow_allow_rule_matching_first_leaves_no_would_deny(edge, policy):
    """First match wins over the whole list: the shadow allow before the shadow deny decides it."""
    r, entry = edge.send(f"/{policy}", {"x-team": "blue", "x-role": "auditor"}, method="POST")
    assert r.status == 200
    assert SHADOW_VERDICT_KEY not in (entry["ext_authz"] or {})
    assert recorded(entry, policy) == "allowed"
