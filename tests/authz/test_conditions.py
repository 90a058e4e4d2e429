"""Builtin rules with richer conditions: ``not``, prefix/regex/presence values, path regexes and
scopes, through ``compile_table`` and ``decide`` (what the decision service runs)."""

from __future__ import annotations

import pickle

import pytest

from authplane.authz.evaluate import Request, decide
from authplane.authz.rules import compile_table
from authplane.errors import PolicyError
from authplane.policy.loader import load_dir
from tests.support.policies import DEV_JWT, app_gateway, app_policy, write_policies

RULES = """
    service: builtin
    apiKeys: {file: keys.txt}
    rules:
      - name: bots
        action: allow
        when:
          apiKeys: ["*"]
          not: {apiKeys: [legacy]}
      - name: partners
        action: allow
        when:
          headers: {x-partner: [{regex: "[a-z]+-[0-9]+"}, {prefix: "vip-"}]}
          scopes: [read]
          not: {headers: {x-blocked: [{present: true}]}, sourceCIDRs: [10.0.0.0/8]}
      - name: api
        action: allow
        when: {paths: [{regex: "/api/v[0-9]+/.*"}], claims: {email: [{regex: ".*@example\\\\.com"}]}}
      - name: rest
        action: deny
        deny: {status: 401}
"""


@pytest.fixture
def policy(tmp_path, jwks_file):
    d = write_policies(str(tmp_path / "policies"), {
        "p.yaml": app_gateway(9) + "---\n" + app_policy(RULES, jwt=DEV_JWT, name="p"),
        "keys.txt": "acme: key-1\nlegacy: key-2\n"})
    table = compile_table(load_dir(d), "v1")
    return pickle.loads(pickle.dumps(table)).policies["p"]  # as the worker processes get it


def _decide(policy, path="/x", headers=None, claims=None, source="192.0.2.1") -> str:
    d = decide(policy, Request("GET", path, headers or {}, source=source, claims=claims))
    return d.rule if d.allow else f"denied:{d.rule}"


def test_not_exempts_an_api_key_client(policy):
    assert _decide(policy, headers={"x-api-key": "key-1"}) == "bots"
    assert _decide(policy, headers={"x-api-key": "key-2"}) == "denied:rest"


@pytest.mark.parametrize(("headers", "claims", "source", "rule"), [
    ({"x-partner": "acme-1"}, {"scope": "read write"}, "192.0.2.1", "partners"),
    ({"x-partner": "vip-x"}, {"scp": ["read"]}, "192.0.2.1", "partners"),
    ({"x-partner": "acme-1x"}, {"scope": "read"}, "192.0.2.1", "denied:rest"),  # the whole value
    ({"x-partner": "acme-1"}, {"scope": "reader"}, "192.0.2.1", "denied:rest"),
    ({"x-partner": "acme-1"}, None, "192.0.2.1", "denied:rest"),
    # `not` holds two kinds: both must match for the exemption to deny
    ({"x-partner": "acme-1", "x-blocked": ""}, {"scope": "read"}, "192.0.2.1", "partners"),
    ({"x-partner": "acme-1"}, {"scope": "read"}, "10.1.2.3", "partners"),
    ({"x-partner": "acme-1", "x-blocked": "1"}, {"scope": "read"}, "10.1.2.3", "denied:rest"),
])
def test_header_values_scopes_and_not(policy, headers, claims, source, rule):
    assert _decide(policy, headers=headers, claims=claims, source=source) == rule


def test_path_regex_and_claim_regex(policy):
    claims = {"email": "a@example.com"}
    assert _decide(policy, "/api/v2/users?x=1", claims=claims) == "api"
    assert _decide(policy, "/api/vx/users", claims=claims) == "denied:rest"
    assert _decide(policy, "/api/v2/users", claims={"email": "a@example.com.evil"}) == "denied:rest"
    assert _decide(policy, "/api/v2/users", claims={"email": ["b@x.org", "a@example.com"]}) == "api"


def test_headers_and_source_read_under_not_are_in_the_cache_key(policy):
    assert "x-blocked" in policy.key_headers
    assert policy.uses_source


def test_case_insensitive_gateway_path_regex(tmp_path):
    rules = """
        service: builtin
        rules:
          - {name: api, action: allow, when: {paths: [{regex: "/api/[a-z]+"}]}}
          - {name: rest, action: deny}
    """
    gw = app_gateway(9).replace("spec: {fleet: edge,", "spec: {pathMatching: {caseSensitive: false}, fleet: edge,")
    d = write_policies(str(tmp_path / "p"), {"p.yaml": gw + "---\n" + app_policy(rules, name="p")})
    pol = compile_table(load_dir(d), "v1").policies["p"]
    assert _decide(pol, "/API/Users") == "api"
    assert _decide(pol, "/api/users/1") == "denied:rest"


@pytest.mark.parametrize(("rules", "message"), [
    ("[{name: k, action: allow, when: {scopes: [read]}}]", "scopes conditions need a jwt section"),
    ("[{name: k, action: allow, when: {not: {claims: {sub: [a]}}}}]", "claims conditions need a jwt section"),
    ("[{name: k, action: allow, when: {not: {apiKeys: [acme]}}}]", "apiKeys conditions need extAuth.apiKeys"),
    ("[{name: k, action: allow, when: {not: {headers: {x-authplane-client-ip: [{present: true}]}}}}]",
     "when.not.headers: x-authplane-client-ip is set by Envoy"),
    ("[{name: k, action: allow, when: {not: {}}}]", "not needs a condition"),
    ("[{name: k, action: allow, when: {headers: {x-a: [{regex: 'a(?<=b)'}]}}}]",
     "when.headers.x-a[0].regex: invalid regex"),
    ("[{name: k, action: allow, when: {paths: [{regex: '/a\\Z'}]}}]",  # Python's re would take it
     "when.paths[0].regex: invalid regex '/a\\\\Z': invalid escape sequence: \\Z"),
])
def test_validation_errors(tmp_path, rules, message):
    ext = f"service: builtin\nrules: {rules}"
    d = write_policies(str(tmp_path / "p"), {"p.yaml": app_gateway(9) + "---\n" + app_policy(ext, name="p")})
    with pytest.raises(PolicyError) as e:
        load_dir(d)
    assert message in str(e.value)


def test_native_rules_need_jwt_for_scopes(tmp_path):
    doc = (app_gateway(9) + "---\nkind: AuthPolicy\nmetadata: {name: p}\nspec:\n  targetRef: {kind: Route, name: app}\n"
           "  authorization: {rules: [{name: r, action: allow, when: {scopes: [read]}}]}\n")
    d = write_policies(str(tmp_path / "p"), {"p.yaml": doc})
    with pytest.raises(PolicyError) as e:
        load_dir(d)
    assert "scopes conditions need a jwt or oidc section" in str(e.value)
