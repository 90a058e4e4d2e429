"""Browser SSO through a real Envoy against a real OpenID provider (oidc-provider-mock).

Two apps under one parent domain (``app1.localtest``, ``app2.localtest``, sent as Host headers to
Envoy on 127.0.0.1) share one login; app2 also requires the ``admins`` group.
"""

from __future__ import annotations

import base64
import json
import urllib.parse

import pytest

from tests.support.http import request
from tests.support.oidc import Browser, Cookie, oidc_provider, set_user
from tests.support.policies import write_policies
from tests.support.processes import start_static_envoy


@pytest.fixture(scope="module")
def sso(tmp_path_factory):
    from authplane.devtools.echo import EchoServer

    tmp = tmp_path_factory.mktemp("sso")
    echo = EchoServer().start()
    with oidc_provider() as issuer:
        set_user(issuer, "alice", {"email": "alice@example.com", "groups": ["admins", "dev"]})
        set_user(issuer, "bob", {"email": "bob@example.com", "groups": ["dev"]})
        d = write_policies(str(tmp / "policies"), {
            "sso.yaml": f"""
                kind: Gateway
                metadata: {{name: sso}}
                spec: {{fleet: sso, listeners: [{{name: http, port: 8080}}]}}
                ---
                kind: Backend
                metadata: {{name: echo}}
                spec: {{endpoints: ["127.0.0.1:{echo.port}"]}}
                ---
                kind: AuthPolicy
                metadata: {{name: sso}}
                spec:
                  targetRef: {{kind: Gateway, name: sso}}
                  oidc:
                    issuer: {issuer}
                    clientId: apps
                    clientSecret: {{file: client-secret.txt}}
                    cookie: {{domain: .localtest}}
                    passThroughPaths: [/public/*]
                    idTokenHeader: x-id-token
                ---
                kind: Route
                metadata: {{name: app1}}
                spec:
                  gateway: sso
                  hostnames: [app1.localtest]
                  rules: [{{name: all, backend: echo}}]
                ---
                kind: Route
                metadata: {{name: app2}}
                spec:
                  gateway: sso
                  hostnames: [app2.localtest]
                  rules: [{{name: all, backend: echo}}]
                ---
                kind: AuthPolicy
                metadata: {{name: app2-admins}}
                spec:
                  targetRef: {{kind: Route, name: app2}}
                  authorization:
                    rules: [{{name: admins, action: allow, when: {{claims: {{groups: [admins]}}}}}}]
                """,
            "client-secret.txt": "development-only-client-secret\n",
        })
        envoy = start_static_envoy(d, "sso", str(tmp))
        try:
            yield issuer, envoy.listener_port("sso/http")
        finally:
            envoy.stop()
            echo.stop()


def groups(headers: dict[str, str]) -> list[str]:
    """Envoy sends an array claim as the base64 of its JSON."""
    return json.loads(base64.b64decode(headers["x-auth-request-groups"]))


def jwt_claims(token: str) -> dict[str, object]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def sign_in(browser: Browser, url: str, sub: str):
    """Navigate to ``url``, get sent to the provider, sign in as ``sub``; the final response."""
    page = browser.get(url)
    login_url = browser.history[-1][0]
    assert page.status == 200 and "Authorize" in page.body, browser.history
    return browser.submit_login(page, login_url, sub)


def test_browser_without_session_is_sent_to_the_provider(sso):
    issuer, port = sso
    r = Browser(port).get("http://app1.localtest/dashboards?orgId=1", follow=False)
    assert r.status == 302
    target = urllib.parse.urlsplit(r.headers["location"])
    assert f"{target.scheme}://{target.netloc}" == issuer
    query = urllib.parse.parse_qs(target.query)
    assert query["client_id"] == ["apps"]
    assert query["redirect_uri"] == ["http://app1.localtest/oauth2/callback"]
    assert set(query["scope"][0].split()) == {"openid", "email", "profile"}


def test_api_clients_get_401_instead_of_a_redirect(sso):
    _, port = sso
    for headers in ({"accept": "application/json"}, {"x-requested-with": "XMLHttpRequest", "accept": "text/html"},
                    {}):
        assert request(port, "/api", host="app1.localtest", headers=headers).status == 401, headers


def test_sign_in_serves_the_original_url_with_identity_headers(sso):
    _, port = sso
    browser = Browser(port)
    r = sign_in(browser, "http://app1.localtest/dashboards?orgId=1", "alice")
    assert r.status == 200, browser.history
    seen = r.json()
    assert seen["path"] == "/dashboards?orgId=1"
    assert seen["headers"]["x-auth-request-user"] == "alice"
    assert seen["headers"]["x-auth-request-email"] == "alice@example.com"
    assert groups(seen["headers"]) == ["admins", "dev"]
    assert "authorization" not in seen["headers"]
    assert jwt_claims(seen["headers"]["x-id-token"])["sub"] == "alice"
    assert "authplane_" not in seen["headers"].get("cookie", "")  # no session cookie upstream


def test_one_login_serves_every_app_under_the_parent_domain(sso):
    _, port = sso
    browser = Browser(port)
    assert sign_in(browser, "http://app1.localtest/", "alice").status == 200
    before = len(browser.history)
    r = browser.get("http://app2.localtest/reports")
    assert r.status == 200
    assert len(browser.history) == before + 1  # no trip to the provider
    assert r.json()["headers"]["x-auth-request-user"] == "alice"


def test_user_without_the_group_gets_403(sso):
    _, port = sso
    browser = Browser(port)
    assert sign_in(browser, "http://app1.localtest/", "bob").status == 200
    assert browser.get("http://app2.localtest/").status == 403


def test_identity_headers_and_cookies_reaching_the_app(sso):
    _, port = sso
    browser = Browser(port)
    assert sign_in(browser, "http://app1.localtest/", "bob").status == 200
    browser.cookies["app1.localtest", "theme"] = Cookie("theme", "dark", "app1.localtest", host_only=True)
    r = browser.get("http://app1.localtest/", headers={"x-auth-request-user": "alice",
                                                        "x-auth-request-groups": "admins"})
    assert r.json()["headers"]["x-auth-request-user"] == "bob"
    assert r.json()["headers"]["cookie"] == "theme=dark"  # the app's own cookies pass, the session's not
    assert groups(r.json()["headers"]) == ["dev"]


def test_pass_through_paths_need_no_session(sso):
    _, port = sso
    r = request(port, "/public/logo.png", host="app1.localtest",
                headers={"accept": "text/html", "x-id-token": "forged", "cookie": "theme=dark"})
    assert r.status == 200
    seen = r.json()["headers"]
    assert "x-auth-request-user" not in seen and "x-id-token" not in seen
    assert seen["cookie"] == "theme=dark"


def test_logout_clears_the_session(sso):
    issuer, port = sso
    browser = Browser(port)
    assert sign_in(browser, "http://app1.localtest/", "alice").status == 200
    r = browser.get("http://app1.localtest/oauth2/sign_out", follow=False)
    assert r.status == 302
    assert r.headers["location"].startswith(f"{issuer}/oauth2/end_session?id_token_hint=")  # provider logout
    assert not browser.cookies  # every session cookie deleted (on the parent domain)
    r = browser.get("http://app2.localtest/", follow=False)
    assert r.status == 302 and r.headers["location"].startswith(f"{issuer}/oauth2/authorize")
