"""Browser SSO through a real Envoy against a certified OpenID provider written by others (npm
``oidc-provider``, default conforming claim behaviour: scope-requested claims only from userinfo,
which Envoy never calls). The policy's claims reach the ID token through the OpenID ``claims``
request parameter authplane adds to the sign-in URL."""

from __future__ import annotations

import json
import urllib.parse

import pytest
from envoy.extensions.filters.http.oauth2.v3 import oauth_pb2 as oauth
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)

from authplane.compiler.render import static_bootstrap
from authplane.compiler.snapshot import compile_policies
from authplane.policy.loader import load_dir
from tests.compiler.test_oidc_envoy import groups, jwt_claims
from tests.support.certified_oidc import Client, certified_provider, missing, sign_in
from tests.support.http import request
from tests.support.oidc import Browser
from tests.support.policies import write_policies
from tests.support.processes import start_static_envoy

pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")

ACCOUNTS = {"alice": {"email": "alice@example.com", "email_verified": True, "groups": ["admins", "dev"]},
            "bob": {"email": "bob@example.com", "email_verified": True, "groups": ["dev"]}}
SECRET = "development-only-client-secret"


def _policies(issuer: str, echo: int, client: str, auth: str) -> dict[str, str]:
    return {"sso.yaml": f"""
        kind: Gateway
        metadata: {{name: sso}}
        spec: {{fleet: sso, listeners: [{{name: http, port: 8080}}]}}
        ---
        kind: Backend
        metadata: {{name: echo}}
        spec: {{endpoints: ["127.0.0.1:{echo}"]}}
        ---
        kind: AuthPolicy
        metadata: {{name: sso}}
        spec:
          targetRef: {{kind: Gateway, name: sso}}
          oidc:
            issuer: {issuer}
            clientId: {client}
            clientSecret: {{file: client-secret.txt}}
            tokenEndpointAuth: {auth}
            cookie: {{domain: .localtest}}
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
        """, "client-secret.txt": SECRET + "\n"}


def _client(client_id: str, auth: str) -> Client:
    return Client(client_id, SECRET, [f"http://{h}.localtest/oauth2/callback" for h in ("app1", "app2")],
                  [f"http://{h}.localtest/" for h in ("app1", "app2")], auth)


@pytest.fixture(scope="module")
def certified():
    with certified_provider([_client("apps", "client_secret_basic")], ACCOUNTS) as issuer:
        yield issuer


@pytest.fixture(scope="module", params=["client_secret_post", "client_secret_basic"])
def sso(request, tmp_path_factory):
    """Envoy in front of the echo upstream, and a provider that takes the client secret only the
    way the parameter (and the policy's ``tokenEndpointAuth``) says."""
    from authplane.devtools.echo import EchoServer

    auth = request.param
    tmp = tmp_path_factory.mktemp(auth)
    echo = EchoServer().start()
    try:
        with certified_provider([_client("apps", auth)], ACCOUNTS, require_token_auth=auth) as issuer:
            d = write_policies(str(tmp / "policies"), _policies(issuer, echo.port, "apps", auth))
            envoy = start_static_envoy(d, "sso", str(tmp))
            try:
                yield issuer, envoy.listener_port("sso/http")
            finally:
                envoy.stop()
    finally:
        echo.stop()


def test_sign_in_asks_for_the_claims_in_the_id_token(sso):
    issuer, port = sso
    r = Browser(port).get("http://app1.localtest/", follow=False)
    assert r.status == 302 and r.headers["location"].startswith(f"{issuer}/auth?")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(r.headers["location"]).query)
    assert json.loads(query["claims"][0]) == {"id_token": {"email": None, "groups": None}}
    assert set(query["scope"][0].split()) == {"openid", "email", "profile"}


def test_sign_in_then_the_second_app_without_a_new_login(sso):
    _, port = sso
    browser = Browser(port)
    r = sign_in(browser, "http://app1.localtest/dashboards?orgId=1", "alice")
    assert r.status == 200, browser.history
    seen = r.json()
    assert seen["path"] == "/dashboards?orgId=1"
    assert seen["headers"]["x-auth-request-user"] == "alice"
    assert seen["headers"]["x-auth-request-email"] == "alice@example.com"
    assert groups(seen["headers"]) == ["admins", "dev"]
    before = len(browser.history)
    r = browser.get("http://app2.localtest/reports")  # the group rule admits a member of the group
    assert r.status == 200 and len(browser.history) == before + 1  # no trip to the provider
    assert r.json()["headers"]["x-auth-request-user"] == "alice"


def test_the_id_token_carries_the_requested_claims(sso):
    _, port = sso
    browser = Browser(port)
    r = sign_in(browser, "http://app1.localtest/", "bob")
    assert r.status == 200
    claims = jwt_claims(r.json()["headers"]["x-id-token"])
    assert (claims["sub"], claims["email"], claims["groups"]) == ("bob", "bob@example.com", ["dev"])


def test_user_without_the_group_gets_403(sso):
    _, port = sso
    browser = Browser(port)
    assert sign_in(browser, "http://app1.localtest/", "bob").status == 200
    assert browser.get("http://app2.localtest/").status == 403


def test_xhr_gets_401_with_and_without_html(sso):
    _, port = sso
    for headers in ({"accept": "application/json"}, {"x-requested-with": "XMLHttpRequest", "accept": "text/html"}):
        assert request(port, "/api", host="app1.localtest", headers=headers).status == 401, headers


def test_logout_sends_the_registered_post_logout_uri(sso):
    issuer, port = sso
    browser = Browser(port)
    assert sign_in(browser, "http://app1.localtest/", "alice").status == 200
    r = browser.get("http://app1.localtest/oauth2/sign_out", follow=False)
    assert r.status == 302 and r.headers["location"].startswith(f"{issuer}/session/end?")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(r.headers["location"]).query)
    assert query["post_logout_redirect_uri"] == ["http://app1.localtest/"]  # registered: the provider accepts
    assert not browser.cookies.get(("localtest", "authplane_id"))
    page = browser.get(r.headers["location"])
    assert page.status == 200, (page.status, page.body[:300])  # its logout confirmation, not a 400


def _oauth2_configs(policy_dir: str) -> list[oauth.OAuth2Config]:
    """Every oauth2 filter configuration of the sso fleet's listener (per-route ones included)."""
    boot = static_bootstrap(compile_policies(load_dir(policy_dir))["sso"])
    found = []
    for lst in boot.static_resources.listeners:
        for chain in lst.filter_chains:
            for f in chain.filters:
                cfg = hcm.HttpConnectionManager()
                f.typed_config.Unpack(cfg)
                for h in cfg.http_filters:
                    if h.name.startswith("envoy.filters.http.oauth2"):
                        c = oauth.OAuth2()
                        h.typed_config.Unpack(c)
                        found.append(c.config)
    assert found
    return found


def _variant(tmp, issuer: str, oidc_extra: str) -> str:
    """The sso policies at ``issuer`` (client_secret_basic), ``oidc_extra`` replacing idTokenHeader."""
    files = _policies(issuer, 9, "apps", "client_secret_basic")
    header = "idTokenHeader: x-id-token"
    files["sso.yaml"] = files["sso.yaml"].replace(header, oidc_extra or header)
    return write_policies(str(tmp), files)


def test_compiled_claims_parameter_auth_type_and_validate_warning(tmp_path, certified):
    from tests.support.oidc import oidc_provider

    d = _variant(tmp_path / "certified", certified, "claimsToHeaders: {sub: x-user}")
    cfg = _oauth2_configs(d)[0]
    assert cfg.auth_type == oauth.OAuth2Config.BASIC_AUTH
    # Only the sso policy's own needs count: claimsToHeaders here names sub alone, and the group
    # rule is another policy's (list such claims in idTokenClaims).
    assert "claims=" not in cfg.authorization_endpoint
    assert not [w for w in load_dir(d).warnings if "claims_parameter_supported" in w.message]

    d = _variant(tmp_path / "listed", certified, "idTokenClaims: [groups, department]")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(_oauth2_configs(d)[0].authorization_endpoint).query)
    assert json.loads(query["claims"][0]) == {"id_token": {"department": None, "groups": None}}

    with oidc_provider() as mock:  # its discovery lists no claims_parameter_supported
        d = _variant(tmp_path / "mock", mock, "")
        warnings = [w.message for w in load_dir(d).warnings if "claims_parameter_supported" in w.message]
        assert len(warnings) == 1 and "email, groups" in warnings[0]
        d = _variant(tmp_path / "mock-none", mock, "idTokenClaims: []")
        assert "claims=" not in _oauth2_configs(d)[0].authorization_endpoint
        assert not [w for w in load_dir(d).warnings if "claims_parameter_supported" in w.message]
