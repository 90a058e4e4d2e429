"""``mode: shadow`` through a real Envoy: the request a check would deny passes, and the would-deny
is in Envoy's per-request state where ``authplane/contract.py`` says (read back from a JSON file
access log of the test's own bootstrap); a shadow route policy under an enforcing gateway policy
still gets the gateway's denials."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import uuid
from typing import Any

import pytest

from authplane.contract import (
    EXT_AUTHZ_FILTER,
    JWT_FAILURE_KEY,
    JWT_FILTER,
    RBAC_DENIED,
    RBAC_FILTER,
    RBAC_SHADOW_RESULT,
    RBAC_SHADOW_RULE,
    SHADOW_POLICY_KEY,
    SHADOW_RULE_KEY,
    SHADOW_VERDICT_KEY,
    WOULD_DENY,
    shadow_prefix,
)
from tests.support.http import Response, request
from tests.support.policies import backend, documents, gateway, write_policies
from tests.support.ports import free_port, wait_for
from tests.support.processes import ServeProcess, ServiceThread, start_envoys, start_static_envoy

LOG_FIELDS = {
    "id": "%REQ(X-TEST-ID)%",
    "status": "%RESPONSE_CODE%",
    "rbac": f"%DYNAMIC_METADATA({RBAC_FILTER})%",
    "jwt_failure": f"%DYNAMIC_METADATA({JWT_FILTER}:{JWT_FAILURE_KEY})%",
    "ext_authz": f"%DYNAMIC_METADATA({EXT_AUTHZ_FILTER})%",
}


def sha(password: str) -> str:
    return "{SHA}" + base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()


def basic(user: str, password: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


POLICIES = """
    kind: Gateway
    metadata: {{name: edge}}
    spec: {{fleet: edge, listeners: [{{name: http, port: 8080}}]}}
    ---
    kind: Gateway
    metadata: {{name: layered}}
    spec: {{fleet: edge, listeners: [{{name: http, port: 8081}}]}}
    ---
    kind: Gateway
    metadata: {{name: trial}}
    spec: {{fleet: edge, listeners: [{{name: http, port: 8082}}]}}
    ---
    kind: Route
    metadata: {{name: trial}}
    spec: {{gateway: trial, rules: [{{name: all, backend: echo}}]}}
    ---
    kind: AuthPolicy
    metadata: {{name: trial}}
    spec:
      targetRef: {{kind: Gateway, name: trial}}
      mode: shadow
      jwt:
        providers: [{{name: dev, issuer: "https://idp.authplane.test", jwks: {{file: jwks.json}}}}]
      apiKey: {{file: route.keys}}
      authorization:
        rules: [{{name: admins, action: allow, when: {{claims: {{groups: [admins]}}}}}}]
    ---
    kind: Backend
    metadata: {{name: echo}}
    spec: {{endpoints: ["127.0.0.1:{echo}"]}}
    ---
    kind: Backend
    metadata: {{name: byo}}
    spec: {{endpoints: ["127.0.0.1:{byo}"]}}
    ---
    kind: Route
    metadata: {{name: app}}
    spec:
      gateway: edge
      rules:
        - {{name: rbac-policy, match: {{pathPrefix: /rbac-policy}}, backend: echo}}
        - {{name: rbac-rule, match: {{pathPrefix: /rbac-rule}}, backend: echo}}
        - {{name: jwt, match: {{pathPrefix: /jwt}}, backend: echo}}
        - {{name: basic, match: {{pathPrefix: /basic}}, backend: echo}}
        - {{name: keys, match: {{pathPrefix: /keys}}, backend: echo}}
        - {{name: query, match: {{pathPrefix: /query}}, backend: echo}}
        - {{name: builtin, match: {{pathPrefix: /builtin}}, backend: echo}}
        - {{name: grpc, match: {{pathPrefix: /grpc}}, backend: echo}}
        - {{name: byo, match: {{pathPrefix: /byo}}, backend: echo}}
    ---
    kind: AuthPolicy
    metadata: {{name: rbac-policy}}
    spec:
      targetRef: {{kind: Route, name: app, rule: rbac-policy}}
      mode: shadow
      authorization:
        rules: [{{name: blue-team, action: allow, when: {{headers: {{x-team: [blue]}}}}}}]
    ---
    kind: AuthPolicy
    metadata: {{name: rbac-rule}}
    spec:
      targetRef: {{kind: Route, name: app, rule: rbac-rule}}
      authorization:
        default: allow
        rules:
          - {{name: no-red, action: deny, when: {{headers: {{x-team: [red]}}}}}}
          - {{name: no-green, action: deny, mode: shadow, when: {{headers: {{x-team: [green]}}}}}}
    ---
    kind: AuthPolicy
    metadata: {{name: jwt}}
    spec:
      targetRef: {{kind: Route, name: app, rule: jwt}}
      mode: shadow
      jwt:
        providers: [{{name: dev, issuer: "https://idp.authplane.test", jwks: {{file: jwks.json}}}}]
    ---
    kind: AuthPolicy
    metadata: {{name: basic}}
    spec:
      targetRef: {{kind: Route, name: app, rule: basic}}
      mode: shadow
      basicAuth: {{file: users.htpasswd}}
    ---
    kind: AuthPolicy
    metadata: {{name: keys}}
    spec:
      targetRef: {{kind: Route, name: app, rule: keys}}
      mode: shadow
      apiKey: {{file: route.keys, clients: [ci]}}
    ---
    kind: AuthPolicy
    metadata: {{name: query}}
    spec:
      targetRef: {{kind: Route, name: app, rule: query}}
      mode: shadow
      apiKey: {{file: route.keys, query: key}}
    ---
    kind: AuthPolicy
    metadata: {{name: builtin}}
    spec:
      targetRef: {{kind: Route, name: app, rule: builtin}}
      mode: shadow
      extAuth:
        service: builtin
        rules: [{{name: blue-only, action: allow, when: {{headers: {{x-team: [blue]}}}}}}]
    ---
    kind: AuthPolicy
    metadata: {{name: grpc}}
    spec:
      targetRef: {{kind: Route, name: app, rule: grpc}}
      mode: shadow
      extAuth:
        service: builtin
        protocol: grpc
        rules:
          - {{name: no-red, action: deny, when: {{headers: {{x-team: [red]}}}}}}
          - {{name: rest, action: allow}}
    ---
    kind: AuthPolicy
    metadata: {{name: byo}}
    spec:
      targetRef: {{kind: Route, name: app, rule: byo}}
      mode: shadow
      extAuth: {{service: byo, protocol: http}}
    ---
    kind: AuthPolicy
    metadata: {{name: gateway-enforced}}
    spec:
      targetRef: {{kind: Gateway, name: layered}}
      apiKey: {{file: route.keys}}
      authorization:
        default: allow
        rules: [{{name: no-red, action: deny, when: {{headers: {{x-team: [red]}}}}}}]
    ---
    kind: Route
    metadata: {{name: layered}}
    spec:
      gateway: layered
      rules: [{{name: all, backend: echo}}]
    ---
    kind: AuthPolicy
    metadata: {{name: route-shadow}}
    spec:
      targetRef: {{kind: Route, name: layered}}
      mode: shadow
      apiKey: {{file: gateway.keys}}
      authorization:
        rules: [{{name: nobody, action: allow, when: {{headers: {{x-never: ["1"]}}}}}}]
"""


class Shadow:
    """The Envoy under test and its access log, one JSON line per request."""

    def __init__(self, envoy: Any, log: str) -> None:
        self.envoy, self.log = envoy, log
        self.port = envoy.listener_port("edge/http")
        self.layered = envoy.listener_port("layered/http")
        self.trial = envoy.listener_port("trial/http")

    def send(self, path: str, headers: dict[str, str] | None = None, port: int | None = None,
             method: str = "GET") -> tuple[Response, dict[str, Any]]:
        """The response and the request's access-log entry."""
        rid = uuid.uuid4().hex
        r = request(port or self.port, path, method=method, headers={"x-test-id": rid, **(headers or {})})

        def entry() -> dict[str, Any] | None:
            if not os.path.exists(self.log):
                return None
            with open(self.log) as f:
                for line in f:
                    if rid in line:
                        found: dict[str, Any] = json.loads(line)
                        return found
            return None

        return r, wait_for(entry, f"the access log entry of {path}")


def shadow_result(entry: dict[str, Any], check: str, level: str, policy: str) -> tuple[str | None, str | None]:
    """(engine result, rule) of one check's shadow record, as the contract names them."""
    rbac = entry.get("rbac") or {}
    prefix = shadow_prefix(check, level, policy)
    return rbac.get(prefix + RBAC_SHADOW_RESULT), rbac.get(prefix + RBAC_SHADOW_RULE)


@pytest.fixture(scope="module")
def shadow(tmp_path_factory, idp):
    from authplane.devtools.echo import EchoServer
    from authplane.devtools.sample_authz import SampleAuthzHttp

    tmp = tmp_path_factory.mktemp("shadow")
    echo = EchoServer().start()
    byo = SampleAuthzHttp().start()
    d = write_policies(str(tmp / "policies"), {
        "policies.yaml": POLICIES.format(echo=echo.port, byo=byo.port),
        "jwks.json": json.dumps(idp.jwks()),
        "users.htpasswd": f"alice:{sha('alice-pw')}\nbob:{sha('bob-pw')}\n",
        "route.keys": "ci: ci-key\npartner: partner-key\n",
        "gateway.keys": "mobile: mobile-key\n",
    })
    svc = ServiceThread(d)
    log = str(tmp / "access.log")
    envoy = start_static_envoy(d, "edge", str(tmp), svc.opts, access_log=(log, LOG_FIELDS))
    yield Shadow(envoy, log)
    envoy.stop()
    svc.close()
    byo.stop()
    echo.stop()


def test_rbac_policy_in_shadow_lets_the_denied_request_pass_and_records_it(shadow):
    r, entry = shadow.send("/rbac-policy")
    assert r.status == 200
    assert shadow_result(entry, "authorization", "route", "rbac-policy")[0] == RBAC_DENIED
    r, entry = shadow.send("/rbac-policy", {"x-team": "blue"})
    assert r.status == 200
    assert shadow_result(entry, "authorization", "route", "rbac-policy") == ("allowed", "blue-team")


def test_a_shadow_rule_never_denies_while_the_enforced_rules_do(shadow):
    r, entry = shadow.send("/rbac-rule", {"x-team": "green"})
    assert r.status == 200
    assert shadow_result(entry, "authorization", "route", "rbac-rule") == (RBAC_DENIED, "no-green")
    r, entry = shadow.send("/rbac-rule", {"x-team": "red"})
    assert r.status == 403
    r, entry = shadow.send("/rbac-rule", {"x-team": "blue"})
    assert r.status == 200
    assert shadow_result(entry, "authorization", "route", "rbac-rule")[0] == "allowed"


def test_jwt_in_shadow_lets_missing_and_failed_tokens_pass_and_records_them(shadow, idp):
    r, entry = shadow.send("/jwt")
    assert r.status == 200
    assert shadow_result(entry, "jwt", "route", "jwt")[0] == RBAC_DENIED
    r, entry = shadow.send("/jwt", {"authorization": f"Bearer {idp.mint(ttl=-600)}"})
    assert r.status == 200
    assert shadow_result(entry, "jwt", "route", "jwt")[0] == RBAC_DENIED
    assert entry["jwt_failure"]["message"] == "Jwt is expired"
    r, entry = shadow.send("/jwt", {"authorization": f"Bearer {idp.mint()}"})
    assert r.status == 200
    assert shadow_result(entry, "jwt", "route", "jwt")[0] == "allowed"
    assert not entry["jwt_failure"]


def test_basic_auth_in_shadow_records_missing_and_unknown_users(shadow):
    for headers in ({}, basic("mallory", "x"), {"authorization": "Bearer alice-pw"}):
        r, entry = shadow.send("/basic", headers)
        assert r.status == 200
        assert shadow_result(entry, "basicAuth", "route", "basic")[0] == RBAC_DENIED, headers
    for user in ("alice", "bob"):
        r, entry = shadow.send("/basic", basic(user, f"{user}-pw"))
        assert r.status == 200
        assert shadow_result(entry, "basicAuth", "route", "basic")[0] == "allowed"
    # The documented cost: the password is not verified in shadow.
    _, entry = shadow.send("/basic", basic("alice", "wrong"))
    assert shadow_result(entry, "basicAuth", "route", "basic")[0] == "allowed"


def test_api_key_in_shadow_records_missing_unknown_and_disallowed_keys(shadow):
    for headers in ({}, {"x-api-key": "nope"}, {"x-api-key": "partner-key"}):  # partner: not in clients
        r, entry = shadow.send("/keys", headers)
        assert r.status == 200
        assert shadow_result(entry, "apiKey", "route", "keys")[0] == RBAC_DENIED, headers
    r, entry = shadow.send("/keys", {"x-api-key": "ci-key"})
    assert r.status == 200
    assert shadow_result(entry, "apiKey", "route", "keys")[0] == "allowed"
    _, entry = shadow.send("/query?a=1")
    assert shadow_result(entry, "apiKey", "route", "query")[0] == RBAC_DENIED
    _, entry = shadow.send("/query?a=1&key=partner-key&b=2")
    assert shadow_result(entry, "apiKey", "route", "query")[0] == "allowed"


@pytest.mark.parametrize(("path", "denied", "allowed", "rule"), [
    ("/builtin", {"x-team": "red"}, {"x-team": "blue"}, ""),
    ("/grpc", {"x-team": "red"}, {"x-team": "blue"}, "no-red"),
])
def test_builtin_ext_authz_in_shadow_answers_allow_and_reports_the_would_deny(shadow, path, denied, allowed, rule):
    policy = path.strip("/")
    r, entry = shadow.send(path, denied)
    assert r.status == 200
    report = entry["ext_authz"]
    assert report[SHADOW_VERDICT_KEY] == WOULD_DENY
    assert report[SHADOW_POLICY_KEY] == policy
    assert report[SHADOW_RULE_KEY] == rule
    assert shadow_result(entry, "extAuth", "route", policy)[0] == RBAC_DENIED
    assert SHADOW_VERDICT_KEY not in r.json()["headers"]  # the report never reaches the upstream
    r, entry = shadow.send(path, allowed)
    assert r.status == 200
    assert SHADOW_VERDICT_KEY not in (entry["ext_authz"] or {})
    assert shadow_result(entry, "extAuth", "route", policy)[0] == "allowed"


def test_byo_http_ext_authz_in_shadow_is_called_by_lua_and_its_denial_recorded(shadow):
    from authplane.devtools.sample_authz import HEADER, RESULT

    r, entry = shadow.send("/byo")
    assert r.status == 200
    assert entry["ext_authz"][SHADOW_VERDICT_KEY] == WOULD_DENY
    assert entry["ext_authz"][SHADOW_POLICY_KEY] == "byo"
    assert shadow_result(entry, "extAuth", "route", "byo")[0] == RBAC_DENIED
    assert RESULT not in r.json()["headers"]  # the service's answer never reaches the upstream
    r, entry = shadow.send("/byo", {HEADER: "allow"})
    assert r.status == 200
    assert shadow_result(entry, "extAuth", "route", "byo")[0] == "allowed"


def test_shadow_is_refused_where_nothing_can_record_it():
    from authplane.errors import PolicyError
    from authplane.policy.loader import load_texts

    doc = """apiVersion: authplane.dev/v1alpha1
kind: AuthPolicy
metadata: {name: p}
spec:
  targetRef: {kind: Gateway, name: edge}
  mode: shadow
  extAuth: {service: byo}
"""
    with pytest.raises(PolicyError, match="gRPC"):
        load_texts({"p.yaml": doc})


def test_a_shadow_route_policy_never_weakens_the_enforcing_gateway_policy(shadow):
    port = shadow.layered
    r, entry = shadow.send("/x", port=port)
    assert r.status == 401  # the gateway's API key check still enforces
    r, entry = shadow.send("/x", {"x-api-key": "ci-key", "x-team": "red"}, port=port)
    assert r.status == 403  # and so do its rules
    r, entry = shadow.send("/x", {"x-api-key": "ci-key"}, port=port)
    assert r.status == 200
    # the route policy's checks, in shadow, would have denied: a key of the other file, no rule
    assert shadow_result(entry, "apiKey", "route", "route-shadow")[0] == RBAC_DENIED
    assert shadow_result(entry, "authorization", "route", "route-shadow")[0] == RBAC_DENIED


def flip_policy(mode: str) -> str:
    return f"""
        kind: AuthPolicy
        metadata: {{name: rollout}}
        spec:
          targetRef: {{kind: Route, name: app}}
          mode: {mode}
          authorization:
            rules: [{{name: blue-team, action: allow, when: {{headers: {{x-team: [blue]}}}}}}]
          extAuth:
            service: builtin
            rules: [{{name: blue-only, action: allow, when: {{headers: {{x-team: [blue]}}}}}}]
        """


def test_flipping_mode_is_a_live_edit_through_serve(tmp_path, processes, echo):
    envoys, serves = processes
    port = free_port()
    d = write_policies(str(tmp_path / "policies"), {
        "gateway.yaml": documents(gateway("edge", port), backend("echo", echo.port),
                                  "kind: Route\nmetadata: {name: app}\n"
                                  "spec: {gateway: edge, rules: [{name: all, backend: echo}]}"),
        "rollout.yaml": flip_policy("enforce")})
    grpc_port, http_port = free_port(), free_port()  # the decision service, as Envoy reaches it
    serves.append(serve := ServeProcess(
        d, str(tmp_path), 0, "--authz-grpc", f"127.0.0.1:{grpc_port}", "--authz-http", f"127.0.0.1:{http_port}",
        "--authz-grpc-listen", f"127.0.0.1:{grpc_port}", "--authz-http-listen", f"127.0.0.1:{http_port}",
    ).wait_started())
    envoys += start_envoys(str(tmp_path), serve.xds, [("edge-1", "edge", True)])
    serve.wait_in_sync("edge-1")
    assert request(port, "/x").status == 403
    assert request(port, "/x", headers={"x-team": "blue"}).status == 200

    write_policies(d, {"rollout.yaml": flip_policy("shadow")})
    wait_for(lambda: request(port, "/x").status == 200, "the shadow mode to apply")
    assert request(port, "/x", headers={"x-team": "red"}).status == 200  # RBAC and ext_authz both pass

    write_policies(d, {"rollout.yaml": flip_policy("enforce")})
    wait_for(lambda: request(port, "/x").status == 403, "enforcement to come back")
    assert request(port, "/x", headers={"x-team": "blue"}).status == 200


def test_a_gateway_policy_in_shadow_records_every_check_on_every_route(shadow, idp):
    r, entry = shadow.send("/anything", port=shadow.trial)
    assert r.status == 200
    for check in ("jwt", "apiKey", "authorization"):
        assert shadow_result(entry, check, "gateway", "trial")[0] == RBAC_DENIED, check
    token = idp.mint(groups=["admins"])
    r, entry = shadow.send("/anything", {"authorization": f"Bearer {token}", "x-api-key": "ci-key"},
                           port=shadow.trial)
    assert r.status == 200
    for check in ("jwt", "apiKey", "authorization"):
        assert shadow_result(entry, check, "gateway", "trial")[0] == "allowed", check
