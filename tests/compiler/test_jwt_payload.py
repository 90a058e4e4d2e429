"""Which JWT providers write the verified payload to Envoy's dynamic metadata: only those of a
policy whose routes have a check reading it (its cost, bench/datapath.py); all with the decision log."""

from __future__ import annotations

from typing import Any

from authplane.compiler.ir import CompileOptions
from authplane.compiler.render import to_dict
from authplane.compiler.resources import LISTENER
from authplane.compiler.snapshot import compile_policies
from authplane.policy.loader import load_texts
from tests.support.policies import HEAD

JWKS = '{"keys": [{"kty": "oct", "kid": "k", "alg": "HS256", "k": "c2VjcmV0LWZvci10ZXN0cy1vbmx5LTAxMjM0NTY3"}]}'
JWT = f"jwt: {{providers: [{{name: dev, issuer: https://idp.test, jwks: {{inline: {JWKS}}}}}]}}"
DOCS = [
    "kind: Gateway\nmetadata: {name: edge}\nspec: {fleet: edge, listeners: [{name: http, port: 8080}]}",
    "kind: Backend\nmetadata: {name: app}\nspec: {endpoints: ['127.0.0.1:9000']}",
    "kind: Route\nmetadata: {name: r}\nspec:\n  gateway: edge\n  rules:\n"
    "    - {name: claims, match: {pathPrefix: /claims}, backend: app}\n"
    "    - {name: plain, match: {pathPrefix: /plain}, backend: app}\n"
    "    - {name: ext, match: {pathPrefix: /ext}, backend: app}\n"
    "    - {name: cel, match: {pathPrefix: /cel}, backend: app}",
]


def policy(name: str, target: str, body: str) -> str:
    return (f"kind: AuthPolicy\nmetadata: {{name: {name}}}\nspec:\n"
            f"  targetRef: {{kind: {target}}}\n" + "".join(f"  {line}\n" for line in body.splitlines()))


def providers(docs: list[str], opts: CompileOptions | None = None) -> dict[str, Any]:
    text = "---\n".join(HEAD + d + "\n" for d in DOCS + docs)
    snap = compile_policies(load_texts({"p.yaml": text}), opts)["edge"]
    (lst,) = snap.resources[LISTENER].values()
    manager = to_dict(lst)["filter_chains"][0]["filters"][0]["typed_config"]
    jwt = next(f for f in manager["http_filters"] if f["name"] == "envoy.filters.http.jwt_authn")
    return jwt["typed_config"]["providers"]


def with_payload(found: dict[str, Any]) -> set[str]:
    return {name for name, p in found.items() if p.get("payload_in_metadata") == "jwt_payload"}


ROUTE_POLICIES = [
    policy("plain", "Route, name: r, rule: plain", JWT),
    policy("claims", "Route, name: r, rule: claims",
           JWT + "\nauthorization: {rules: [{name: g, action: allow, when: {claims: {groups: [a]}}}]}"),
    policy("scopes", "Route, name: r, rule: ext",
           JWT + "\nauthorization: {rules: [{name: s, action: allow, when: {not: {scopes: [admin]}}}]}"),
    policy("cel", "Route, name: r, rule: cel",
           JWT + "\nauthorization: {rules: [{name: c, action: allow, when: {cel: \"'a' in claims.groups\"}}]}"),
]


def test_only_policies_whose_checks_read_claims_write_the_payload():
    found = providers(ROUTE_POLICIES)
    assert set(found) == {"plain/dev", "claims/dev", "scopes/dev", "cel/dev"}
    assert with_payload(found) == {"claims/dev", "scopes/dev", "cel/dev"}  # claims, scopes under not, CEL


def test_a_gateway_token_read_by_a_route_rule_keeps_its_payload():
    gateway = policy("gw", "Gateway, name: edge", JWT)
    claims_only = policy("route-claims", "Route, name: r, rule: claims",
                         "authorization: {rules: [{name: g, action: allow, when: {claims: {groups: [a]}}}]}")
    assert with_payload(providers([gateway, claims_only])) == {"gw/dev"}
    assert with_payload(providers([gateway])) == set()


def test_shadow_mode_and_the_decision_log_keep_every_payload():
    shadow = policy("plain", "Route, name: r, rule: plain", JWT + "\nmode: shadow")
    assert with_payload(providers([shadow])) == {"plain/dev"}  # its recorder reads the payload
    logged = providers(ROUTE_POLICIES, CompileOptions(decision_log_cluster="authplane_xds"))
    assert with_payload(logged) == set(logged)
