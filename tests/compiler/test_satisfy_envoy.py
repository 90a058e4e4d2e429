"""``satisfy: any`` through a real Envoy: one valid credential among JWT, API key and HTTP Basic.

Port 1: a route-level ``any`` policy (JWT, key, Basic, with a method header and an authorization
rule on the key's client). Port 2: a gateway-level ``any`` (JWT or key) layered with a route
adding HTTP Basic, a route with its own ``any`` (JWT or Basic), a public route, an open route.
"""

from __future__ import annotations

import http.client
import json

import pytest

from tests.compiler.test_credentials_envoy import basic, sha
from tests.compiler.test_enforcement import bearer
from tests.support.http import request
from tests.support.policies import write_policies
from tests.support.processes import start_static_envoy


def challenges(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Status and every ``WWW-Authenticate`` value (the shared helper keeps one per name)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"host": "localhost", **(headers or {})})
        r = conn.getresponse()
        r.read()
        return r.status, [v for k, v in r.getheaders() if k.lower() == "www-authenticate"]
    finally:
        conn.close()


PROVIDER = "{name: dev, issuer: https://idp.authplane.test, audiences: [api], jwks: {file: jwks.json}, " \
           "claimsToHeaders: {sub: x-sub}}"
FORWARDED = PROVIDER[:-1] + ", forward: true}"
"""The gateway's provider keeps the token for the route's provider: with two levels' JWT checks on
one header, the first to verify it removes it (Envoy ``requires_all``; layering as before)."""


@pytest.fixture(scope="module")
def ports(tmp_path_factory, idp):
    from authplane.devtools.echo import EchoServer

    tmp = tmp_path_factory.mktemp("satisfy")
    echo = EchoServer().start()
    d = write_policies(str(tmp / "policies"), {
        "gateways.yaml": f"""
            kind: Gateway
            metadata: {{name: edge}}
            spec: {{fleet: edge, listeners: [{{name: http, port: 8080}}]}}
            ---
            kind: Gateway
            metadata: {{name: layered}}
            spec: {{fleet: edge, listeners: [{{name: http, port: 8081}}]}}
            ---
            kind: Backend
            metadata: {{name: echo}}
            spec: {{endpoints: ["127.0.0.1:{echo.port}"]}}
            ---
            kind: AuthPolicy
            metadata: {{name: edge-any}}
            spec:
              targetRef: {{kind: Gateway, name: layered}}
              satisfy: {{mode: any, methodHeader: x-auth-method}}
              jwt: {{providers: [{FORWARDED}]}}
              apiKey: {{file: keys, clientHeader: x-gateway-client}}
            """,
        "routes.yaml": f"""
            kind: Route
            metadata: {{name: app}}
            spec:
              gateway: edge
              rules:
                - {{name: api, match: {{pathPrefix: /api}}, backend: echo}}
            ---
            kind: AuthPolicy
            metadata: {{name: api-any}}
            spec:
              targetRef: {{kind: Route, name: app, rule: api}}
              satisfy: {{mode: any, methodHeader: x-auth-method}}
              jwt: {{providers: [{PROVIDER}]}}
              apiKey: {{file: keys, clientHeader: x-client}}
              basicAuth: {{file: users.htpasswd, userHeader: x-user}}
              authorization:
                default: allow
                rules:
                  - name: no-partner-writes
                    action: deny
                    when: {{headers: {{x-client: [partner]}}, methods: [POST]}}
                  - {{name: no-spoofed-method, action: deny, when: {{headers: {{x-auth-method: [spoofed]}}}}}}
            ---
            kind: Route
            metadata: {{name: layered}}
            spec:
              gateway: layered
              rules:
                - {{name: basic, match: {{pathPrefix: /basic}}, backend: echo}}
                - {{name: either, match: {{pathPrefix: /either}}, backend: echo}}
                - {{name: health, match: {{path: /healthz}}, backend: echo}}
                - {{name: open, match: {{pathPrefix: /open}}, backend: echo}}
            ---
            kind: AuthPolicy
            metadata: {{name: layered-basic}}
            spec:
              targetRef: {{kind: Route, name: layered, rule: basic}}
              basicAuth: {{file: users.htpasswd, userHeader: x-user}}
            ---
            kind: AuthPolicy
            metadata: {{name: either}}
            spec:
              targetRef: {{kind: Route, name: layered, rule: either}}
              satisfy: {{mode: any, methodHeader: x-route-method}}
              jwt: {{providers: [{PROVIDER}]}}
              basicAuth: {{file: users.htpasswd}}
            ---
            kind: AuthPolicy
            metadata: {{name: health}}
            spec:
              targetRef: {{kind: Route, name: layered, rule: health}}
              public: true
            """,
        "users.htpasswd": f"alice:{sha('alice-pw')}\n",
        "keys": "ci: ci-key\npartner: partner-key\n",
        "jwks.json": json.dumps(idp.jwks()),
    })
    envoy = start_static_envoy(d, "edge", str(tmp))
    yield envoy.listener_port("edge/http"), envoy.listener_port("layered/http")
    envoy.stop()
    echo.stop()


def test_each_credential_alone_passes_and_names_its_method(ports, idp):
    port, _ = ports
    for creds, method, who in (
        ({"x-api-key": "ci-key"}, "apiKey", ("x-client", "ci")),
        (bearer(idp.mint(sub="bot")), "jwt", ("x-sub", "bot")),
        (basic("alice", "alice-pw"), "basicAuth", ("x-user", "alice")),
    ):
        r = request(port, "/api/x", headers={**creds, "x-auth-method": "spoofed"})
        assert r.status == 200, (method, r.body)
        seen = r.json()["headers"]
        assert seen["x-auth-method"] == method  # the client's copy is replaced before the rules
        assert seen[who[0]] == who[1]
        assert "x-api-key" not in seen and "authorization" not in seen


def test_a_jwt_in_the_default_query_parameter_passes(ports, idp):
    port, _ = ports
    r = request(port, f"/api/x?access_token={idp.mint()}")
    assert r.status == 200
    assert r.json()["headers"]["x-auth-method"] == "jwt"


def test_no_credential_gets_401_with_a_challenge_per_scheme(ports):
    port, _ = ports
    status, found = challenges(port, "/api/x", {"x-auth-method": "jwt"})
    assert status == 401
    assert [c.split()[0] for c in found] == ["Bearer", "Basic", "ApiKey"]
    assert 'header="x-api-key"' in found[2]


def test_a_wrong_credential_is_401_even_next_to_a_valid_one(ports, idp):
    port, _ = ports
    assert request(port, "/api/x", headers={"x-api-key": "nope"}).status == 401
    assert request(port, "/api/x", headers=bearer("not-a-jwt")).status == 401
    assert request(port, "/api/x", headers=bearer(idp.mint(ttl=-600))).status == 401
    assert request(port, "/api/x", headers=basic("alice", "wrong")).status == 401
    # Every presented credential is verified: a wrong key does not fall back to a valid JWT, nor a
    # bad JWT to a valid key, nor a wrong password to a valid key.
    assert request(port, "/api/x", headers={"x-api-key": "nope", **bearer(idp.mint())}).status == 401
    assert request(port, "/api/x", headers={"x-api-key": "ci-key", **bearer("not-a-jwt")}).status == 401
    assert request(port, "/api/x", headers={"x-api-key": "ci-key", **basic("alice", "wrong")}).status == 401


def test_two_valid_credentials_name_both_methods(ports):
    port, _ = ports
    r = request(port, "/api/x", headers={"x-api-key": "ci-key", **basic("alice", "alice-pw")})
    assert r.status == 200
    assert r.json()["headers"]["x-auth-method"] == "apiKey,basicAuth"


def test_authorization_rules_still_apply(ports, idp):
    port, _ = ports
    assert request(port, "/api/x", method="POST", headers={"x-api-key": "partner-key"}).status == 403
    assert request(port, "/api/x", method="POST", headers={"x-api-key": "ci-key"}).status == 200
    # x-client is only set by the key check: a JWT caller's copy is not believed for authorization
    r = request(port, "/api/x", method="POST", headers={**bearer(idp.mint()), "x-client": "ci"})
    assert r.status == 200


def test_gateway_any_passes_with_a_key_or_a_jwt(ports, idp):
    _, port = ports
    assert request(port, "/open").status == 401
    r = request(port, "/open", headers={"x-api-key": "partner-key", "x-auth-method": "jwt"})
    assert r.status == 200
    seen = r.json()["headers"]
    assert (seen["x-auth-method"], seen["x-gateway-client"]) == ("apiKey", "partner")
    r = request(port, "/open", headers=bearer(idp.mint()))
    assert r.status == 200
    assert r.json()["headers"]["x-auth-method"] == "jwt"


def test_gateway_any_and_a_route_check_must_both_pass(ports, idp):
    _, port = ports
    # the route's Basic check alone is not enough: the gateway needs its key or JWT
    status, found = challenges(port, "/basic", basic("alice", "alice-pw"))
    assert status == 401
    assert [c.split()[0] for c in found] == ["Bearer", "ApiKey"]
    # the gateway's key alone is not enough: the route needs Basic
    r = request(port, "/basic", headers={"x-api-key": "ci-key"})
    assert r.status == 401
    assert r.headers["www-authenticate"].startswith("Basic realm=")
    r = request(port, "/basic", headers={"x-api-key": "ci-key", **basic("alice", "alice-pw")})
    assert r.status == 200
    seen = r.json()["headers"]
    assert (seen["x-user"], seen["x-auth-method"]) == ("alice", "apiKey")


def test_gateway_any_and_route_any_each_satisfied_on_their_own(ports, idp):
    _, port = ports
    # a JWT satisfies both levels
    r = request(port, "/either", headers=bearer(idp.mint()))
    assert r.status == 200
    seen = r.json()["headers"]
    assert (seen["x-auth-method"], seen["x-route-method"]) == ("jwt", "jwt")
    # a key for the gateway, Basic for the route
    r = request(port, "/either", headers={"x-api-key": "ci-key", **basic("alice", "alice-pw")})
    assert r.status == 200
    seen = r.json()["headers"]
    assert (seen["x-auth-method"], seen["x-route-method"]) == ("apiKey", "basicAuth")
    # a key alone leaves the route without a credential
    status, found = challenges(port, "/either", {"x-api-key": "ci-key"})
    assert status == 401
    assert [c.split()[0] for c in found] == ["Bearer", "Basic"]
    # Basic alone leaves the gateway without one
    assert request(port, "/either", headers=basic("alice", "alice-pw")).status == 401


def test_public_route_drops_a_client_sent_method_header(ports):
    _, port = ports
    r = request(port, "/healthz", headers={"x-auth-method": "jwt"})
    assert r.status == 200
    assert "x-auth-method" not in r.json()["headers"]
