"""What the compiled configuration enforces, through a real Envoy (static bootstrap of a fleet)."""

from __future__ import annotations

import socket

import pytest

from tests.support.http import request
from tests.support.policies import write_policies
from tests.support.processes import start_static_envoy


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jwt_stack(tmp_path, jwks_file, echo, sample_authz):
    down = _closed_port()
    d = write_policies(str(tmp_path / "policies"), {
        "gateway.yaml": f"""
            kind: Gateway
            metadata: {{name: edge}}
            spec: {{fleet: edge, listeners: [{{name: http, port: 8080}}]}}
            ---
            kind: Backend
            metadata: {{name: echo}}
            spec: {{endpoints: ["127.0.0.1:{echo.port}"]}}
            ---
            kind: Backend
            metadata: {{name: sample-authz}}
            spec: {{endpoints: ["127.0.0.1:{sample_authz.port}"], protocol: http2}}
            ---
            kind: Backend
            metadata: {{name: down}}
            spec: {{endpoints: ["127.0.0.1:{down}"], protocol: http2}}
            ---
            kind: AuthPolicy
            metadata: {{name: edge-jwt}}
            spec:
              targetRef: {{kind: Gateway, name: edge}}
              jwt:
                providers:
                  - name: dev
                    issuer: https://idp.authplane.test
                    audiences: [api]
                    jwks: {{file: jwks.json}}
                    claimsToHeaders: {{sub: x-user-id}}
            """,
        "routes.yaml": """
            kind: Route
            metadata: {name: app}
            spec:
              gateway: edge
              rules:
                - {name: api, match: {pathPrefix: /api}, backend: echo}
                - {name: admin, match: {pathPrefix: /admin}, backend: echo}
                - {name: health, match: {path: /healthz}, backend: echo}
                - {name: byo, match: {pathPrefix: /byo}, backend: echo}
                - {name: down, match: {pathPrefix: /down}, backend: echo}
                - {name: open, match: {pathPrefix: /open}, backend: echo}
            ---
            kind: AuthPolicy
            metadata: {name: admin-only}
            spec:
              targetRef: {kind: Route, name: app, rule: admin}
              authorization:
                rules:
                  - {name: admins, action: allow, when: {claims: {groups: [admins]}}}
                  - {name: no-delete, action: deny, when: {methods: [DELETE]}}
            ---
            kind: AuthPolicy
            metadata: {name: health}
            spec:
              targetRef: {kind: Route, name: app, rule: health}
              public: true
            ---
            kind: AuthPolicy
            metadata: {name: byo}
            spec:
              targetRef: {kind: Route, name: app, rule: byo}
              extAuth: {service: sample-authz}
            ---
            kind: AuthPolicy
            metadata: {name: down-closed}
            spec:
              targetRef: {kind: Route, name: app, rule: down}
              extAuth: {service: down, timeout: 500ms}
            ---
            kind: AuthPolicy
            metadata: {name: down-open}
            spec:
              targetRef: {kind: Route, name: app, rule: open}
              extAuth: {service: down, timeout: 500ms, failOpen: true}
            """,
    })
    envoy = start_static_envoy(d, "edge", str(tmp_path))
    yield envoy.listener_port("edge/http")
    envoy.stop()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_jwt_missing_invalid_expired_and_wrong_audience(jwt_stack, idp):
    port = jwt_stack
    r = request(port, "/api/x")
    assert r.status == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert request(port, "/api/x", headers=bearer("not.a.jwt")).status == 401
    assert request(port, "/api/x", headers=bearer(idp.mint(ttl=-600))).status == 401
    assert request(port, "/api/x", headers=bearer(idp.mint(audience="other"))).status == 403


def test_jwt_valid_token_reaches_upstream_with_claim_header_and_without_token(jwt_stack, idp):
    r = request(jwt_stack, "/api/x", headers=bearer(idp.mint(sub="alice")))
    assert r.status == 200
    seen = r.json()["headers"]
    assert seen["x-user-id"] == "alice"
    assert "authorization" not in seen


def test_route_rules_layer_on_gateway_jwt(jwt_stack, idp):
    port = jwt_stack
    assert request(port, "/admin").status == 401  # gateway JWT still applies
    assert request(port, "/admin", headers=bearer(idp.mint(groups=["dev"]))).status == 403
    assert request(port, "/admin", headers=bearer(idp.mint(groups=["dev", "admins"]))).status == 200
    assert request(port, "/admin", headers=bearer(idp.mint(groups="admins"))).status == 200
    r = request(port, "/admin", method="DELETE", headers=bearer(idp.mint(groups=["admins"])))
    assert r.status == 403  # deny wins over allow


def test_public_route_skips_every_check(jwt_stack):
    assert request(jwt_stack, "/healthz").status == 200


def test_byo_ext_authz_after_gateway_jwt(jwt_stack, idp):
    port = jwt_stack
    token = bearer(idp.mint())
    assert request(port, "/byo").status == 401
    r = request(port, "/byo", headers=token)
    assert r.status == 403
    assert r.body == "denied by ext_authz for not found header `x-ext-authz: allow` in the request"
    assert r.headers["x-ext-authz-check-result"] == "denied"
    r = request(port, "/byo", headers={**token, "x-ext-authz": "allow"})
    assert r.status == 200
    assert r.json()["headers"]["x-ext-authz-check-result"] == "allowed"


def test_ext_authz_unreachable_fails_closed_or_open(jwt_stack, idp):
    token = bearer(idp.mint())
    assert request(jwt_stack, "/down", headers=token).status == 503
    r = request(jwt_stack, "/open", headers=token)
    assert r.status == 200
    assert r.json()["headers"]["x-envoy-auth-failure-mode-allowed"] == "true"
