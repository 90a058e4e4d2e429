"""basicAuth and apiKey through a real Envoy: allow/deny, layering, credentials hidden upstream."""

from __future__ import annotations

import base64
import hashlib

import pytest

from tests.support.http import request
from tests.support.policies import write_policies
from tests.support.processes import start_static_envoy


def sha(password: str) -> str:
    return "{SHA}" + base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()


def basic(user: str, password: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture(scope="module")
def ports(tmp_path_factory):
    from authplane.devtools.echo import EchoServer

    tmp = tmp_path_factory.mktemp("credentials")
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
            metadata: {{name: gateway-keys}}
            spec:
              targetRef: {{kind: Gateway, name: layered}}
              apiKey: {{file: gateway.keys, clientHeader: x-gateway-client}}
            """,
        "routes.yaml": """
            kind: Route
            metadata: {name: app}
            spec:
              gateway: edge
              rules:
                - {name: basic, match: {pathPrefix: /basic}, backend: echo}
                - {name: basic-forward, match: {pathPrefix: /basic-forward}, backend: echo}
                - {name: keys, match: {pathPrefix: /keys}, backend: echo}
                - {name: query, match: {pathPrefix: /query}, backend: echo}
                - {name: open, match: {pathPrefix: /open}, backend: echo}
            ---
            kind: AuthPolicy
            metadata: {name: basic}
            spec:
              targetRef: {kind: Route, name: app, rule: basic}
              basicAuth: {file: users.htpasswd, userHeader: x-user}
              authorization:
                default: allow
                rules: [{name: no-bob-writes, action: deny, when: {headers: {x-user: [bob]}, methods: [POST]}}]
            ---
            kind: AuthPolicy
            metadata: {name: basic-forward}
            spec:
              targetRef: {kind: Route, name: app, rule: basic-forward}
              basicAuth: {file: users.htpasswd, forward: true}
            ---
            kind: AuthPolicy
            metadata: {name: keys}
            spec:
              targetRef: {kind: Route, name: app, rule: keys}
              apiKey: {file: route.keys, clients: [ci], clientHeader: x-client}
            ---
            kind: AuthPolicy
            metadata: {name: query}
            spec:
              targetRef: {kind: Route, name: app, rule: query}
              apiKey: {file: route.keys, query: key}
            ---
            kind: Route
            metadata: {name: layered}
            spec:
              gateway: layered
              rules:
                - {name: keys, match: {pathPrefix: /keys}, backend: echo}
                - {name: basic, match: {pathPrefix: /basic}, backend: echo}
                - {name: gateway-only, match: {pathPrefix: /gateway-only}, backend: echo}
                - {name: health, match: {path: /healthz}, backend: echo}
            ---
            kind: AuthPolicy
            metadata: {name: layered-keys}
            spec:
              targetRef: {kind: Route, name: layered, rule: keys}
              apiKey: {file: route.keys, clientHeader: x-client}
            ---
            kind: AuthPolicy
            metadata: {name: layered-basic}
            spec:
              targetRef: {kind: Route, name: layered, rule: basic}
              basicAuth: {file: users.htpasswd}
            ---
            kind: AuthPolicy
            metadata: {name: health}
            spec:
              targetRef: {kind: Route, name: layered, rule: health}
              public: true
            """,
        "users.htpasswd": f"""
            # htpasswd -s
            alice:{sha("alice-pw")}
            bob:{sha("bob-pw")}
            """,
        "route.keys": """
            ci: ci-key
            ci: ci-key-next
            partner: partner-key
            """,
        "gateway.keys": """
            ci: ci-key
            mobile: mobile-key
            """,
    })
    envoy = start_static_envoy(d, "edge", str(tmp))
    yield envoy.listener_port("edge/http"), envoy.listener_port("layered/http")
    envoy.stop()
    echo.stop()


def test_basic_auth_missing_or_wrong_credentials_get_401(ports):
    port, _ = ports
    r = request(port, "/basic")
    assert r.status == 401
    assert r.headers["www-authenticate"].startswith("Basic realm=")
    assert request(port, "/basic", headers=basic("alice", "wrong")).status == 401
    assert request(port, "/basic", headers=basic("mallory", "alice-pw")).status == 401
    assert request(port, "/basic", headers={"authorization": "Bearer alice-pw"}).status == 401


def test_basic_auth_user_reaches_upstream_without_the_password(ports):
    port, _ = ports
    r = request(port, "/basic", headers={**basic("alice", "alice-pw"), "x-user": "root"})
    assert r.status == 200
    seen = r.json()["headers"]
    assert seen["x-user"] == "alice"  # the client's copy is replaced
    assert "authorization" not in seen


def test_basic_auth_forward_keeps_the_header(ports):
    port, _ = ports
    creds = basic("bob", "bob-pw")
    r = request(port, "/basic-forward", headers=creds)
    assert r.status == 200
    assert r.json()["headers"]["authorization"] == creds["authorization"]


def test_authorization_rules_see_the_verified_user(ports):
    port, _ = ports
    assert request(port, "/basic", method="POST", headers=basic("alice", "alice-pw")).status == 200
    assert request(port, "/basic", method="POST", headers=basic("bob", "bob-pw")).status == 403
    assert request(port, "/basic", method="POST",
                   headers={**basic("alice", "alice-pw"), "x-user": "bob"}).status == 200


def test_api_key_allow_deny_and_allowed_clients(ports):
    port, _ = ports
    assert request(port, "/keys").status == 401
    assert request(port, "/keys", headers={"x-api-key": "nope"}).status == 401
    assert request(port, "/keys", headers={"x-api-key": "partner-key"}).status == 403  # not in clients
    for key in ("ci-key", "ci-key-next"):
        r = request(port, "/keys", headers={"x-api-key": key, "x-client": "partner"})
        assert r.status == 200
        seen = r.json()["headers"]
        assert seen["x-client"] == "ci"
        assert "x-api-key" not in seen


def test_api_key_from_query_is_removed_from_the_upstream_path(ports):
    port, _ = ports
    assert request(port, "/query?a=1").status == 401
    r = request(port, "/query?a=1&key=partner-key")
    assert r.status == 200
    assert r.json()["path"] == "/query?a=1"


def test_route_without_policy_is_open_on_the_plain_gateway(ports):
    port, _ = ports
    assert request(port, "/open").status == 200


def test_gateway_and_route_keys_must_both_pass(ports):
    _, port = ports
    assert request(port, "/keys", headers={"x-api-key": "mobile-key"}).status == 401  # route file
    assert request(port, "/keys", headers={"x-api-key": "partner-key"}).status == 401  # gateway file
    r = request(port, "/keys", headers={"x-api-key": "ci-key"})
    assert r.status == 200
    seen = r.json()["headers"]
    assert (seen["x-gateway-client"], seen["x-client"]) == ("ci", "ci")
    assert "x-api-key" not in seen


def test_gateway_key_and_route_basic_auth_both_apply(ports):
    _, port = ports
    assert request(port, "/basic", headers=basic("alice", "alice-pw")).status == 401
    assert request(port, "/basic", headers={"x-api-key": "mobile-key"}).status == 401
    r = request(port, "/basic", headers={**basic("alice", "alice-pw"), "x-api-key": "mobile-key"})
    assert r.status == 200
    seen = r.json()["headers"]
    assert seen["x-gateway-client"] == "mobile"
    assert "x-api-key" not in seen and "authorization" not in seen


def test_gateway_key_alone_and_public_route(ports):
    _, port = ports
    assert request(port, "/gateway-only").status == 401
    r = request(port, "/gateway-only", headers={"x-api-key": "mobile-key"})
    assert r.status == 200
    assert "x-api-key" not in r.json()["headers"]
    assert request(port, "/healthz").status == 200
