"""Richer conditions (``not``, prefix/regex/presence values, path regexes, scopes): one table of
requests answered by a real Envoy running the native rules and by the builtin engine given the
same conditions; both must agree with the table."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import yaml

from authplane.authz.evaluate import Request, matches
from authplane.authz.rules import Matcher
from authplane.devtools.echo import EchoServer
from authplane.devtools.idp import DevIdentityProvider
from authplane.policy.model import Authorization, ExtAuthConditions
from tests.support.http import request
from tests.support.policies import write_policies
from tests.support.processes import start_static_envoy

GROUPS: dict[str, dict[str, Any]] = {
    "prefix": {"rules": [{"name": "r", "action": "allow", "when": {"headers": {"x-tenant": [{"prefix": "team-"}]}}}]},
    "regex": {"rules": [{"name": "r", "action": "allow", "when": {
        "headers": {"x-tenant": [{"regex": "ops-[0-9]+"}]}, "paths": [{"regex": "/regex/v[0-9]+(/.*)?"}]}}]},
    "present": {"rules": [{"name": "r", "action": "allow", "when": {"headers": {"x-trace": [{"present": True}]}}}]},
    "claims": {"rules": [{"name": "r", "action": "allow", "when": {"claims": {
        "email": [{"regex": ".*@example\\.com"}], "tenant.id": [{"prefix": "t-"}, "root"]}}}]},
    "claimset": {"rules": [{"name": "r", "action": "allow", "when": {"claims": {"org": [{"present": True}]}}}]},
    "scopes": {"rules": [{"name": "r", "action": "allow", "when": {"scopes": ["write", "api:admin"]}}]},
    "breakglass": {"rules": [{"name": "r", "action": "allow", "when": {
        "methods": ["GET", "DELETE"],
        "not": {"methods": ["DELETE"], "not": {"headers": {"x-break-glass": ["yes"]}}}}}]},
    "exempt": {"default": "allow", "rules": [{"name": "r", "action": "deny", "when": {
        "paths": ["/exempt/private/*"], "not": {"headers": {"x-internal": [{"present": True}]}}}}]},
    "unbanned": {"rules": [{"name": "r", "action": "allow", "when": {
        "not": {"claims": {"banned": [{"present": True}]}}}}]},
}

# (group, method, path, headers, claims (None: no token), allowed)
CASES: list[tuple[str, str, str, dict[str, str], dict[str, Any] | None, bool]] = [
    ("prefix", "GET", "/prefix", {"x-tenant": "team-a"}, None, True),
    ("prefix", "GET", "/prefix", {"x-tenant": "teams"}, None, False),
    ("prefix", "GET", "/prefix", {"x-tenant": "xteam-a"}, None, False),
    ("prefix", "GET", "/prefix", {}, None, False),
    ("regex", "GET", "/regex/v1/x", {"x-tenant": "ops-12"}, None, True),
    ("regex", "GET", "/regex/v2", {"x-tenant": "ops-1"}, None, True),
    ("regex", "GET", "/regex/v1/x", {"x-tenant": "ops-12x"}, None, False),  # the whole value
    ("regex", "GET", "/regex/vx", {"x-tenant": "ops-12"}, None, False),
    ("regex", "GET", "/regex/v1?q=/regex/vx", {"x-tenant": "ops-12"}, None, True),  # not the query
    ("present", "GET", "/present", {"x-trace": "abc"}, None, True),
    ("present", "GET", "/present", {"x-trace": ""}, None, True),
    ("present", "GET", "/present", {"x-other": "abc"}, None, False),
    ("claims", "GET", "/claims", {}, {"email": "a@example.com", "tenant": {"id": "t-1"}}, True),
    ("claims", "GET", "/claims", {}, {"email": ["x@y.org", "b@example.com"], "tenant": {"id": "root"}}, True),
    ("claims", "GET", "/claims", {}, {"email": "a@example.com.evil", "tenant": {"id": "t-1"}}, False),
    ("claims", "GET", "/claims", {}, {"email": "a@example.com", "tenant": {"id": "x-1"}}, False),
    ("claims", "GET", "/claims", {}, {"email": "a@example.com", "tenant": "t-1"}, False),
    ("claims", "GET", "/claims", {}, None, False),
    ("claimset", "GET", "/claimset", {}, {"org": "acme"}, True),
    ("claimset", "GET", "/claimset", {}, {"org": ["acme"]}, True),
    ("claimset", "GET", "/claimset", {}, {"org": 0}, True),
    ("claimset", "GET", "/claimset", {}, {"org": False}, True),
    ("claimset", "GET", "/claimset", {}, {"org": {"id": 1}}, True),
    ("claimset", "GET", "/claimset", {}, {"org": None}, True),
    ("claimset", "GET", "/claimset", {}, {"orgs": "acme"}, False),
    ("claimset", "GET", "/claimset", {}, None, False),
    ("scopes", "GET", "/scopes", {}, {"scope": "read write api:admin"}, True),
    ("scopes", "GET", "/scopes", {}, {"scope": "api:admin write"}, True),
    ("scopes", "GET", "/scopes", {}, {"scp": ["write", "api:admin"]}, True),
    ("scopes", "GET", "/scopes", {}, {"scp": "write api:admin"}, True),
    ("scopes", "GET", "/scopes", {}, {"scope": "write"}, False),
    ("scopes", "GET", "/scopes", {}, {"scope": "writer api:admin"}, False),
    ("scopes", "GET", "/scopes", {}, {"scope": "write api:admin2"}, False),
    ("scopes", "GET", "/scopes", {}, {"scp": ["write api:admin"]}, False),
    ("scopes", "GET", "/scopes", {}, {"scope": "write", "scp": ["api:admin"]}, True),
    ("scopes", "GET", "/scopes", {}, None, False),
    ("breakglass", "GET", "/breakglass", {}, None, True),
    ("breakglass", "DELETE", "/breakglass", {}, None, False),
    ("breakglass", "DELETE", "/breakglass", {"x-break-glass": "yes"}, None, True),
    ("breakglass", "DELETE", "/breakglass", {"x-break-glass": "no"}, None, False),
    ("breakglass", "POST", "/breakglass", {"x-break-glass": "yes"}, None, False),
    ("exempt", "GET", "/exempt/private/x", {}, None, False),
    ("exempt", "GET", "/exempt/private", {"x-internal": "1"}, None, True),
    ("exempt", "GET", "/exempt/public", {}, None, True),
    ("unbanned", "GET", "/unbanned", {}, None, True),
    ("unbanned", "GET", "/unbanned", {}, {"groups": ["dev"]}, True),
    ("unbanned", "GET", "/unbanned", {}, {"banned": True}, False),
]


def _ids() -> list[str]:
    return [f"{g}-{m}-{p}-{json.dumps(h)}-{json.dumps(c)}" for g, m, p, h, c, _ in CASES]


@pytest.fixture(scope="module")
def envoy(tmp_path_factory, echo_module, idp_module):
    tmp = tmp_path_factory.mktemp("conditions")
    rules = [{"name": g, "match": {"pathPrefix": f"/{g}"}, "backend": "echo"} for g in GROUPS]
    policies = [yaml.safe_dump({"kind": "AuthPolicy", "metadata": {"name": g},
                                "spec": {"targetRef": {"kind": "Route", "name": "app", "rule": g},
                                         "authorization": authz}}, sort_keys=False)
                for g, authz in GROUPS.items()]
    d = write_policies(str(tmp / "policies"), {
        "jwks.json": json.dumps(idp_module.jwks()),
        "gateway.yaml": f"""
            kind: Gateway
            metadata: {{name: edge}}
            spec: {{fleet: edge, listeners: [{{name: http, port: 8080}}]}}
            ---
            kind: Backend
            metadata: {{name: echo}}
            spec: {{endpoints: ["127.0.0.1:{echo_module.port}"]}}
            ---
            kind: AuthPolicy
            metadata: {{name: edge-jwt}}
            spec:
              targetRef: {{kind: Gateway, name: edge}}
              jwt:
                required: false
                providers: [{{name: dev, issuer: https://idp.authplane.test, jwks: {{file: jwks.json}}}}]
            """,
        "routes.yaml": yaml.safe_dump({"kind": "Route", "metadata": {"name": "app"},
                                       "spec": {"gateway": "edge", "rules": rules}}, sort_keys=False),
        "policies.yaml": "---\n".join(policies),
    })
    proc = start_static_envoy(d, "edge", str(tmp))
    yield proc.listener_port("edge/http")
    proc.stop()


@pytest.fixture(scope="module")
def echo_module():
    """The conftest's ``echo`` and ``idp``, once for the whole table."""
    server = EchoServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def idp_module():
    return DevIdentityProvider(issuer="https://idp.authplane.test")


def builtin(authz: Authorization, req: Request) -> bool:
    """The native rules' meaning (deny rules win, then allow rules, then the default), each
    condition decided by the builtin engine."""
    def hit(when: Any) -> bool:
        return matches(Matcher.build(ExtAuthConditions.model_validate(when.model_dump(by_alias=True))), req, None)
    if any(hit(r.when) for r in authz.rules if r.action == "deny"):
        return False
    return authz.default == "allow" or any(hit(r.when) for r in authz.rules if r.action == "allow")


@pytest.mark.parametrize(("group", "method", "path", "headers", "claims", "allowed"), CASES, ids=_ids())
def test_envoy_and_builtin_agree(envoy, idp_module, group, method, path, headers, claims, allowed):
    sent = dict(headers)
    if claims is not None:
        sent["authorization"] = f"Bearer {idp_module.mint(**claims)}"
    r = request(envoy, path, method=method, headers=sent)
    assert r.status == (200 if allowed else 403), r.body
    payload = None
    if claims is not None:
        payload = {"iss": "https://idp.authplane.test", "sub": "alice", "aud": "api", **claims}
    req = Request(method=method, path=path, headers=headers, host="localhost", claims=payload)
    assert builtin(Authorization.model_validate(GROUPS[group]), req) is allowed


def test_bad_regex_is_reported_at_its_line(tmp_path):
    write_policies(str(tmp_path), {"p.yaml": """
        kind: AuthPolicy
        metadata: {name: p}
        spec:
          targetRef: {kind: Gateway, name: edge}
          authorization:
            rules:
              - name: r
                action: allow
                when:
                  headers: {x-tenant: [{regex: "ops-(?=1)"}]}
                  not: {paths: [{regex: "/a{2,1}"}]}
        """})
    r = subprocess.run([sys.executable, "-m", "authplane.cli", "validate", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    path = tmp_path / "p.yaml"
    assert (f"{path}:11:40: spec.authorization.rules[0].when.headers.x-tenant[0].regex: invalid regex "
            "'ops-(?=1)': lookaround and backreferences are not supported by RE2") in lines
    assert (f"{path}:12:33: spec.authorization.rules[0].when.not.paths[0].regex: invalid regex "
            "'/a{2,1}': min repeat greater than max repeat at position 3") in lines
