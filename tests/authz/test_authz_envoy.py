"""The builtin decision service through a real Envoy, over HTTP (the default) and gRPC."""

from __future__ import annotations

import http.client
import os
import shutil
import time

import pytest

from tests.support import ROOT
from tests.support.http import request
from tests.support.policies import DEV_JWT, app_gateway, app_policy, write_policies
from tests.support.processes import ServiceThread, SlowService, Unreachable, start_static_envoy

SAMPLE_BODY = "denied by ext_authz for not found header `x-ext-authz: allow` in the request"
PROTOCOLS = ["http", "grpc"]


@pytest.fixture
def stack(tmp_path, echo):
    """start(policies, ...) → (Envoy listener port, decision service); all stopped afterwards."""
    started: list = []

    def start(*docs: str, service=None, files: dict[str, str] | None = None):
        d = write_policies(str(tmp_path / "policies"), {
            "gateway.yaml": app_gateway(echo.port), "policy.yaml": "\n---\n".join(docs), **(files or {})})
        svc = service or ServiceThread(d)
        started.append(svc.close)
        envoy = start_static_envoy(d, "edge", str(tmp_path), svc.opts)
        started.append(envoy.stop)
        return envoy.listener_port("edge/http"), svc

    yield start
    for stop in reversed(started):
        stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_seed_scenario_from_policies_builtin(tmp_path, echo, protocol):
    d = tmp_path / "policies"
    shutil.copytree(os.path.join(ROOT, "policies"), d)
    for path in d.rglob("*.yaml"):
        text = path.read_text().replace("127.0.0.1:9080", f"127.0.0.1:{echo.port}")
        if protocol == "grpc":
            text = text.replace("    service: builtin\n", "    service: builtin\n    protocol: grpc\n")
        path.write_text(text)
    svc = ServiceThread(str(d))
    envoy = start_static_envoy(str(d), "edge", str(tmp_path), svc.opts)
    try:
        port = envoy.listener_port("edge/http")
        r = request(port, "/sample/x")
        assert r.status == 403
        assert r.body == SAMPLE_BODY
        assert r.headers["x-ext-authz-check-result"] == "denied"
        r = request(port, "/sample/x", headers={"x-ext-authz": "allow"})
        assert r.status == 200
        assert r.json()["headers"]["x-ext-authz-check-result"] == "allowed"
        assert request(port, "/open/x").status == 200  # no policy there
        assert request(port, "/sample/x", headers={"x-ext-authz": "deny"}).status == 403
    finally:
        envoy.stop()
        svc.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_claims_rule_with_a_jwt_verified_by_envoy(stack, idp, jwks_file, protocol):
    port, _ = stack(app_policy(jwt=DEV_JWT, ext=f"""
        service: builtin
        protocol: {protocol}
        rules:
          - {{name: admins, action: allow, when: {{claims: {{groups: [admins]}}}},
             upstreamHeaders: {{x-role: admin}}, responseHeaders: {{x-decided-by: authplane}},
             removeHeaders: [x-debug]}}
          - {{name: others, action: deny, deny: {{status: 403, body: not an admin}}}}
        """))
    admin = idp.mint(sub="alice", email="alice@example.com", groups=["dev", "admins"])
    r = request(port, "/x", headers={"authorization": f"Bearer {admin}",
                                     "x-auth-request-user": "mallory", "x-debug": "1"})
    assert r.status == 200
    assert r.headers["x-decided-by"] == "authplane"
    seen = r.json()["headers"]
    assert seen["x-role"] == "admin"
    assert "x-debug" not in seen
    assert seen["x-auth-request-user"] == "alice"  # the client's copy was replaced
    assert seen["x-auth-request-email"] == "alice@example.com"
    assert seen["x-auth-request-groups"] == "dev,admins"
    r = request(port, "/x", headers={"authorization": f"Bearer {idp.mint(groups=['dev'])}"})
    assert (r.status, r.body) == (403, "not an admin")
    forged = {"x-authplane-jwt-payload": '{"groups": ["admins"]}', "x-auth-request-user": "mallory"}
    r = request(port, "/x", headers=forged)  # no token: a forged payload header must not count
    assert (r.status, r.body) == (403, "not an admin")
    assert request(port, "/x", headers={"authorization": "Bearer bad.token.here"}).status == 401


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_no_cached_decision_crosses_users(stack, idp, jwks_file, protocol):
    port, _ = stack(app_policy(jwt=DEV_JWT, ext=f"""
        service: builtin
        protocol: {protocol}
        cache: {{allowTtl: 60s, denyTtl: 60s}}
        rules: [{{name: alice, action: allow, when: {{claims: {{sub: [alice]}}}}}}]
        """))
    alice = {"authorization": f"Bearer {idp.mint(sub='alice')}"}
    bob = {"authorization": f"Bearer {idp.mint(sub='bob')}"}
    for _ in range(3):  # rounds 2 and 3 are answered from the cache
        r = request(port, "/same/path", headers=alice)
        assert (r.status, r.json()["headers"]["x-auth-request-user"]) == (200, "alice")
        assert request(port, "/same/path", headers=bob).status == 403


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_api_keys_allow_deny_client_header_and_key_removed(stack, protocol):
    port, _ = stack(app_policy(f"""
        service: builtin
        protocol: {protocol}
        apiKeys: {{file: keys.txt, clientHeader: x-api-client}}
        rules:
          - {{name: partners, action: allow, when: {{apiKeys: [acme, globex]}}}}
          - {{name: no-key, action: deny, deny: {{status: 401, body: "API key required"}}}}
        """), files={"keys.txt": "# client: key\nacme: k-acme-123\nglobex: sha256:"
                     "d5d6f4e0bd8e4b3c1c5b7f1f6e0c5f2c6d4d0b7c4e5a3a2f1e0d9c8b7a6f5e4d\n"})
    r = request(port, "/x", headers={"x-api-key": "k-acme-123", "x-api-client": "forged"})
    assert r.status == 200
    seen = r.json()["headers"]
    assert seen["x-api-client"] == "acme"
    assert seen["x-auth-request-user"] == "acme"
    assert "x-api-key" not in seen
    r = request(port, "/x", headers={"x-api-key": "k-acme-12"})
    assert (r.status, r.body) == (401, "API key required")
    assert r.headers["www-authenticate"] == 'Bearer realm="app"'
    assert request(port, "/x").status == 401


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_browsers_are_redirected_to_sign_in_api_clients_get_401(stack, idp, jwks_file, protocol):
    port, _ = stack(app_policy(jwt=DEV_JWT, ext=f"""
        service: builtin
        protocol: {protocol}
        rules:
          - name: sign-in
            action: deny
            when: {{authenticated: false}}
            deny: {{status: 401, signIn: "https://login.example.com/start"}}
          - {{name: users, action: allow}}
        """))
    r = request(port, "/app/page?x=1", host="app.example.com",
                headers={"accept": "text/html,application/xhtml+xml"})
    assert r.status == 302
    assert r.headers["location"] == ("https://login.example.com/start?rd="
                                     "http%3A%2F%2Fapp.example.com%2Fapp%2Fpage%3Fx%3D1")
    r = request(port, "/app/page", headers={"accept": "application/json"})
    assert r.status == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = request(port, "/app/page", headers={"accept": "text/html", "cookie": f"session={idp.mint()}"})
    assert r.status == 200


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_source_cidrs_methods_and_paths(stack, protocol):
    port, _ = stack(app_policy(f"""
        service: builtin
        protocol: {protocol}
        rules:
          - {{name: no-admin-writes, action: deny, when: {{paths: [/admin/*], methods: [POST]}}}}
          - {{name: elsewhere, action: deny, when: {{sourceCIDRs: [10.0.0.0/8]}}}}
          - {{name: local, action: allow, when: {{sourceCIDRs: [127.0.0.0/8, "::1/128"]}}}}
        """))
    assert request(port, "/admin/x").status == 200
    assert request(port, "/admin/x", method="POST").status == 403
    assert request(port, "/admin", method="POST").status == 403  # /admin/* covers /admin too (issue 9)
    assert request(port, "/adminx", method="POST").status == 200
    assert request(port, "/admin/x", headers={"x-forwarded-for": "10.1.2.3"}).status == 200


ALLOW_ALL = "rules: [{name: all, action: allow}]"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_service_down_fails_closed_503_or_open(stack, protocol):
    port, _ = stack(
        "kind: Route\nmetadata: {name: open}\n"
        "spec: {gateway: edge, rules: [{name: main, match: {pathPrefix: /open}, backend: app}]}",
        app_policy(f"service: builtin\nprotocol: {protocol}\n{ALLOW_ALL}"),
        app_policy(f"service: builtin\nprotocol: {protocol}\nfailOpen: true\n{ALLOW_ALL}",
                   name="open", route="open"),
        service=Unreachable())
    assert request(port, "/x").status == 503
    r = request(port, "/open/x")
    assert r.status == 200
    assert r.json()["headers"]["x-envoy-auth-failure-mode-allowed"] == "true"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_service_slower_than_the_timeout(stack, protocol):
    port, _ = stack(app_policy(
        f"service: builtin\nprotocol: {protocol}\ntimeout: 300ms\nstatusOnError: 504\n{ALLOW_ALL}"),
        service=SlowService(delay=2.0))
    start = time.monotonic()
    assert request(port, "/x").status == 504
    assert time.monotonic() - start < 1.5


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_rule_change_applies_without_restart(stack, tmp_path, protocol):
    def policy(team: str) -> str:
        return app_policy(f"service: builtin\nprotocol: {protocol}\n"
                          f"rules: [{{name: team, action: allow, when: {{headers: {{x-team: [{team}]}}}}}}]")

    port, svc = stack(policy("blue"))
    blue = {"x-team": "blue"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # kept alive across the change
    assert request(port, "/x", headers=blue, conn=conn).status == 200
    write_policies(str(tmp_path / "policies"), {"policy.yaml": policy("red")})
    svc.reload(str(tmp_path / "policies"), "v2")
    assert request(port, "/x", headers=blue, conn=conn).status == 403  # cached allow dropped too
    assert request(port, "/x", headers={"x-team": "red"}, conn=conn).status == 200
    conn.close()
