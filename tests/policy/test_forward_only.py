"""Forward-auth-only policy sets (a Route without ``gateway``: no Gateway, no Backend) and CEL
``claims`` with no JWT at any level: what loads, and each mistake at its ``path:line:col``."""

from __future__ import annotations

import os

import pytest

from authplane.cli import main
from authplane.compiler.snapshot import compile_policies
from authplane.errors import PolicyError
from authplane.policy.loader import load_dir
from tests.support.policies import write_policies

GATEWAY = """kind: Gateway
metadata: {name: edge}
spec: {fleet: edge, listeners: [{name: http, port: 8080}]}
---
kind: Backend
metadata: {name: app}
spec: {endpoints: ["127.0.0.1:9"]}"""

APP_ROUTE = """kind: Route
metadata: {name: app}
spec: {gateway: edge, rules: [{name: all, backend: app}]}"""


FORWARD_ONLY = """kind: Route
metadata: {name: team}
spec: {hostnames: [team.example.com]}
---
kind: AuthPolicy
metadata: {name: team}
spec:
  targetRef: {kind: Route, name: team}
  extAuth:
    service: builtin
    rules: [{name: admins, action: allow, when: {headers: {x-team: [admins]}}}]"""

JWKS = "{providers: [{name: dev, jwks: {inline: {keys: [{kty: oct, k: c2VjcmV0c2VjcmV0, kid: k1}]}}}]}"


def _write(tmp_path, *docs: str) -> str:
    return write_policies(str(tmp_path / "p"), {"p.yaml": "\n---\n".join(docs)})


def problems(tmp_path, *docs: str) -> list[str]:
    d = _write(tmp_path, *docs)
    with pytest.raises(PolicyError) as e:
        load_dir(d)
    return [str(p).removeprefix(d + os.sep) for p in e.value.problems]


def test_a_set_with_no_gateway_loads_validates_and_renders_nothing(tmp_path, capsys):
    d = _write(tmp_path, FORWARD_ONLY)
    p = load_dir(d)
    assert (list(p.gateways), list(p.backends), list(p.routes)) == ([], [], ["team"])
    assert p.routes["team"].resource.spec.rules[0].match.path_prefix == "/"  # every path by default
    assert p.warnings == []  # no "use native rules" advice: no Envoy runs this route
    assert compile_policies(p) == {}
    assert main(["validate", d]) == 0
    assert "0 gateways, 1 routes, 0 backends, 1 policies; fleets: none" in capsys.readouterr().out
    assert main(["render", d, "--fleet", "edge"]) == 1
    err = capsys.readouterr().err
    assert err == (f"authplane render: no fleet in {d}: it has no Gateway, so no Envoy gets configuration "
                   "(routes without a gateway are for forward auth only)\n")


def test_forward_only_routes_never_reach_envoy(tmp_path):
    with_it = compile_policies(load_dir(_write(tmp_path / "a", GATEWAY, APP_ROUTE, FORWARD_ONLY)))
    without = compile_policies(load_dir(_write(tmp_path / "b", GATEWAY, APP_ROUTE)))
    assert with_it["edge"].version == without["edge"].version


def test_what_needs_a_gateway(tmp_path):
    got = problems(tmp_path, GATEWAY, """kind: Route
metadata: {name: a}
spec: {rules: [{name: x, backend: app}]}
---
kind: Route
metadata: {name: b}
spec: {listeners: [http]}
---
kind: Route
metadata: {name: c}
spec: {gateway: edge}
---
kind: Route
metadata: {name: d}
spec: {gateway: edge, rules: [{name: x}]}
---
kind: Route
metadata: {name: e}
spec: {rules: [{name: x, timeout: 5s}]}
---
kind: AuthPolicy
metadata: {name: e}
spec: {targetRef: {kind: Route, name: e}, extAuth: {service: builtin, rules: [{name: all, action: allow}]}}""")
    assert got == [
        "p.yaml:16:7: spec.gateway: missing required field",
        "p.yaml:22:7: spec.gateway: missing required field",
        "p.yaml:28:7: spec.rules: missing required field",
        "p.yaml:34:31: spec.rules[0].backend: missing required field",
        "p.yaml:40:35: spec.rules[0].timeout: a route without a gateway (forward auth only) has no upstream "
        "timeout: its ingress sends the requests",
    ]


def test_a_forward_only_policy_must_be_one_the_decision_service_runs(tmp_path):
    route = "kind: Route\nmetadata: {{name: {0}}}\nspec: {{hostnames: [{0}.example.com]}}"
    got = problems(tmp_path, GATEWAY, route.format("a"), route.format("b"), route.format("c"), """kind: AuthPolicy
metadata: {name: a}
spec: {targetRef: {kind: Route, name: a}, public: true}
---
kind: AuthPolicy
metadata: {name: b}
spec:
  targetRef: {kind: Route, name: b}
  apiKey: {file: keys.txt}
  authorization: {default: allow}
---
kind: AuthPolicy
metadata: {name: c}
spec: {targetRef: {kind: Route, name: c}, extAuth: {service: app, protocol: http}}""")
    what = "has no gateway (forward auth only)"
    assert [g for g in got if "keys.txt" not in g] == [
        f"p.yaml:34:51: spec.public: Route 'a' {what}: forward auth answers only with extAuth "
        "service: builtin, never public",
        f"p.yaml:41:3: spec: Route 'b' {what}: the decision service answers for it, which needs extAuth "
        "with service: builtin",
        f"p.yaml:42:11: spec.apiKey: Route 'b' {what}: only Envoy runs apiKey; use extAuth rules "
        "(service: builtin)",
        f"p.yaml:43:18: spec.authorization: Route 'b' {what}: only Envoy runs authorization; use extAuth "
        "rules (service: builtin)",
        f"p.yaml:49:62: spec.extAuth.service: Route 'c' {what}: the decision service answers for it, which "
        "needs extAuth with service: builtin",
    ]


def test_a_forward_only_route_without_a_policy_is_a_warning(tmp_path):
    p = load_dir(_write(tmp_path, "kind: Route\nmetadata: {name: lonely}\nspec: {hostnames: ['*']}"))
    assert [str(w).rsplit(os.sep, 1)[1] for w in p.warnings] == [
        "p.yaml:3:18: metadata.name: route 'lonely' has no gateway and no AuthPolicy: forward auth denies "
        "every request it matches"]


def _cel_policy(cel: str, jwt: bool, target: str = "{kind: Route, name: app}", name: str = "p") -> str:
    section = f"  jwt: {JWKS}\n" if jwt else ""
    return f"""kind: AuthPolicy
metadata: {{name: {name}}}
spec:
  targetRef: {target}
{section}  authorization:
    rules:
      - name: r
        action: allow
        when: {{cel: "{cel}"}}"""


def test_cel_claims_without_a_jwt_at_any_level_is_an_error(tmp_path):
    got = problems(tmp_path, GATEWAY, APP_ROUTE, _cel_policy("'admins' in claims.groups", jwt=False))
    assert got == ["p.yaml:28:21: spec.authorization.rules[0].when.cel: claims (the verified JWT payload) "
                   "needs a jwt or oidc section in this policy or on the gateway; without one the "
                   "expression never sees claims"]
    got = problems(tmp_path / "gw", GATEWAY, APP_ROUTE,
                   _cel_policy("has(claims.sub)", jwt=False, target="{kind: Gateway, name: edge}"))
    assert got == ["p.yaml:28:21: spec.authorization.rules[0].when.cel: claims (the verified JWT payload) "
                   "needs a jwt or oidc section in this policy or on the gateway; without one the "
                   "expression never sees claims"]


@pytest.mark.parametrize("cel, own_jwt, gateway_jwt", [
    ("'admins' in claims.groups", True, False),
    ("'admins' in claims.groups", False, True),  # layering: the gateway's JWT reaches the route's rules
    ("request.method == 'GET'", False, False),
    ("[1, 2].exists(claims, claims == 2)", False, False),  # a comprehension variable, not the payload
])
def test_cel_without_claims_or_with_a_jwt_somewhere_loads(tmp_path, cel, own_jwt, gateway_jwt):
    docs = [GATEWAY, APP_ROUTE, _cel_policy(cel, jwt=own_jwt)]
    if gateway_jwt:
        docs.append(f"kind: AuthPolicy\nmetadata: {{name: gw}}\nspec:\n  targetRef: {{kind: Gateway, name: edge}}\n"
                    f"  jwt: {JWKS}")
    assert "p" in load_dir(_write(tmp_path, *docs)).auth_policies


def test_forward_only_claims_rules_need_the_policys_own_jwt(tmp_path):
    """No gateway, so no gateway-level JWT: the policy verifies the token itself or has no claims."""
    rules = "extAuth: {service: builtin, rules: [{name: admins, action: allow, when: {claims: {groups: [a]}}}]}"
    docs = ["kind: Route\nmetadata: {name: r}\nspec: {hostnames: [a.example.com]}",
            f"kind: AuthPolicy\nmetadata: {{name: r}}\nspec:\n  targetRef: {{kind: Route, name: r}}\n  {rules}"]
    assert problems(tmp_path, *docs) == [
        "p.yaml:12:38: spec.extAuth.rules: claims conditions need a jwt section in this policy or on the gateway"]
    docs[1] += f"\n  jwt: {JWKS}"
    assert "r" in load_dir(_write(tmp_path / "ok", *docs)).auth_policies
