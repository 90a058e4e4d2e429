"""The decision service's sign-in with its sessions in a real Redis (``oidc.session.store: redis``)
and renewed with refresh tokens from a real provider (oidc-provider-mock): the cookie is only a
ticket, sign-out ends the session everywhere, Redis down answers 503 and never allows, an
expired token is renewed silently, a revoked refresh token ends the session."""

from __future__ import annotations

import http.client
import json
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis

from authplane.errors import PolicyError
from authplane.policy.loader import load_dir
from tests.authz.test_signin_flow import (
    ADMINS,
    NGINX,
    NGINX_CONFIG,
    Setup,
    _check,
    _policies,
    _session_cookies,
    _sign_in,
)
from tests.support.http import request
from tests.support.oidc import Browser, oidc_provider, set_user
from tests.support.policies import write_policies
from tests.support.ports import closed_port, wait_for
from tests.support.processes import ServiceThread
from tests.support.redis import RedisServer, missing, start_redis

GROUPS = [f"team-{i:04d}-with-a-long-name" for i in range(200)] + ["admins"]
PASSWORD = "redis-test-password-not-a-secret"


def _files(issuer: str, port: int, session: str, oidc: str = "") -> dict[str, str]:
    """The sign-in policies of test_signin_flow with this ``session`` (and more ``oidc`` fields)."""
    files = _policies(issuer, port, ["k1"])
    more = f"\n            session: {session}" + (f"\n            {oidc}" if oidc else "")
    files["p.yaml"] = files["p.yaml"].replace("sessionKeys: [{file: k1}]", "sessionKeys: [{file: k1}]" + more)
    files["redis-password.txt"] = PASSWORD + "\n"
    return files


def _redis() -> RedisServer:
    if missing() is not None:
        pytest.skip(missing() or "")
    return start_redis(PASSWORD)


@pytest.fixture
def store() -> Iterator[RedisServer]:
    server = _redis()
    try:
        yield server
    finally:
        server.stop()


def _setup(tmp_path, issuer: str, echo_port: int, session: str, oidc: str = "") -> Setup:
    d = write_policies(str(tmp_path / "policies"), _files(issuer, echo_port, session, oidc))
    svc = ServiceThread(d)
    return Setup(issuer, svc, d, svc.svc.http_port)


def _redis_session(store: RedisServer) -> str:
    return f"{{store: redis, url: '{store.url}', password: {{file: redis-password.txt}}}}"


@pytest.fixture
def provider() -> Iterator[str]:
    with oidc_provider() as issuer:
        yield issuer


def _auth(b: Browser, s: Setup, host: str = "app") -> Any:
    """``/oauth2/auth`` as nginx's auth_request calls it."""
    return b.request(s.url(host, "/oauth2/auth"), headers={"x-original-url": s.url(host, "/page")})


def test_the_cookie_is_a_ticket_and_sign_out_ends_the_session_everywhere(tmp_path, provider, echo, store):
    set_user(provider, "alice", {"email": "alice@example.com", "groups": GROUPS})
    s = _setup(tmp_path, provider, echo.port, _redis_session(store))
    try:
        b = Browser(s.port)
        _sign_in(b, s, s.url("app", "/oauth2/start?rd=/"))
        assert _session_cookies(b) == ["authplane_session"]  # no chunks: only the ticket
        ticket = next(c for c in b.cookies.values() if c.name == "authplane_session")
        assert len(ticket.value) < 300
        client = redis.Redis(port=store.port, password=PASSWORD)
        try:
            (key,) = client.keys("authplane:session:*")
            stored = client.get(key)
            assert isinstance(stored, bytes) and len(stored) > 4096  # the 200 groups are in Redis
            assert b"alice" not in stored and b"team-0001" not in stored  # encrypted with the ticket's secret
        finally:
            client.close()
        for host in ("app", "grafana"):
            r = _check(b, s, host)
            assert r.status == 200, r.body
            assert r.headers["x-auth-request-groups"].split(",") == GROUPS
        assert _auth(b, s).status == 202
        stolen = Browser(s.port, cookies=dict(b.cookies))  # the same cookie, replayed elsewhere
        assert _check(stolen, s, "grafana").status == 200

        r = b.get(s.url("auth", "/oauth2/sign_out?rd=/"), follow=False)
        assert r.status == 302 and not _session_cookies(b)
        assert store.keys() == 0
        # the replayed cookie is no session any more, though its allow was cached moments ago
        assert _check(stolen, s, "grafana", xhr=True).status == 401
        assert _auth(stolen, s).status == 401
    finally:
        s.svc.close()


@pytest.mark.parametrize(("extra", "status"), [("", 503), (", unavailableStatus: 500", 500)])
def test_redis_down_answers_503_and_never_allows(tmp_path, provider, echo, store, extra, status):
    set_user(provider, "alice", ADMINS)
    s = _setup(tmp_path, provider, echo.port, _redis_session(store)[:-1] + extra + "}")
    try:
        b = Browser(s.port)
        _sign_in(b, s, s.url("app", "/oauth2/start?rd=/"))
        assert _check(b, s, "app").status == 200
        store.stop()
        for r in (_check(b, s, "app"), _check(b, s, "app", xhr=True), _auth(b, s)):
            assert r.status == status, (r.status, r.body)
            assert "cannot be reached" in r.body and "x-auth-request-user" not in r.headers
        second = Browser(s.port)  # a sign-in cannot complete without its store
        start = second.get(s.url("app", "/oauth2/start?rd=/"))
        done = second.submit_login(start, second.history[-1][0], "alice")
        assert done.status == status
        store.start()  # back, empty (no persistence): the old session is gone, sign in again
        assert _check(b, s, "app", xhr=True).status == 401
        assert _check(b, s, "app").status == 302
    finally:
        s.svc.close()


def _revoke(issuer: str, sub: str) -> None:
    """The provider forgets every token of ``sub`` (its refresh tokens too)."""
    parts = urllib.parse.urlsplit(issuer)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("POST", f"/users/{sub}/revoke-tokens")
        assert conn.getresponse().status == 204
    finally:
        conn.close()


STORES = ["cookie", "redis"]
BASIC = "tokenEndpointAuth: client_secret_basic"
"""oidc-provider-mock takes refresh grants with HTTP Basic client authentication only."""


def _session(kind: str, store: RedisServer | None, extra: str = "") -> str:
    if kind == "cookie":
        return f"{{store: cookie{extra}}}"
    assert store is not None
    return _redis_session(store)[:-1] + extra + "}"


@pytest.fixture
def redis_or_none(request) -> Iterator[RedisServer | None]:
    if request.param == "cookie":
        yield None
        return
    server = _redis()
    try:
        yield server
    finally:
        server.stop()


def _wait_past(seconds: float) -> None:
    """Let the provider's tokens (or the refresh interval) run out: a wait, no timing assertion."""
    time.sleep(seconds)


@pytest.mark.parametrize("redis_or_none", STORES, indirect=True)
def test_an_expired_token_is_renewed_silently_with_new_claims(tmp_path, echo, redis_or_none):
    kind = "redis" if redis_or_none else "cookie"
    with oidc_provider(access_token_max_age=timedelta(seconds=2)) as issuer:
        set_user(issuer, "alice", ADMINS)
        s = _setup(tmp_path, issuer, echo.port, _session(kind, redis_or_none), BASIC)
        try:
            b = Browser(s.port)
            _sign_in(b, s, s.url("app", "/oauth2/start?rd=/"))
            before = {c.name: c.value for c in b.cookies.values()}
            assert _check(b, s, "app").status == 200
            set_user(issuer, "alice", {"email": "alice@example.com", "groups": ["dev"]})
            _wait_past(2.5)  # the ID and access tokens have expired
            r = _check(b, s, "app")  # renewed with the refresh token: userinfo says dev, not admins
            assert r.status == 403, r.body
            after = {c.name: c.value for c in b.cookies.values()}
            assert (after != before) == (kind == "cookie")  # a cookie session is rewritten; a ticket stays
            assert _session_cookies(b) == ["authplane_session"]
        finally:
            s.svc.close()


@pytest.mark.parametrize("redis_or_none", STORES, indirect=True)
def test_a_revoked_refresh_token_ends_the_session(tmp_path, provider, echo, redis_or_none):
    kind = "redis" if redis_or_none else "cookie"
    set_user(provider, "alice", ADMINS)
    s = _setup(tmp_path, provider, echo.port, _session(kind, redis_or_none, ", refreshInterval: 1s"), BASIC)
    try:
        b = Browser(s.port)
        _sign_in(b, s, s.url("app", "/oauth2/start?rd=/"))
        assert _check(b, s, "app").status == 200
        _wait_past(1.2)
        assert _check(b, s, "app").status == 200  # renewed: the provider still honours the grant
        _revoke(provider, "alice")
        _wait_past(1.2)
        r = _check(b, s, "app", xhr=True)
        assert r.status == 401, r.body
        assert not _session_cookies(b)  # the ended session's cookies are cleared
        if redis_or_none is not None:
            assert redis_or_none.keys() == 0
    finally:
        s.svc.close()


@pytest.mark.parametrize(("session", "error"), [
    ("{store: redis}", "store: redis needs url"),
    ("{url: 'redis://127.0.0.1:6379'}", "url and password are for store: redis"),
    ("{store: redis, url: 'redis://:hunter2@127.0.0.1:6379'}", "put the Redis password in password"),
    ("{store: redis, url: 'redis://127.0.0.1:6379/0?password=hunter2'}", "put the Redis password in password"),
    ("{store: redis, url: 'http://127.0.0.1:6379'}", "session.url"),
    ("{store: memcached}", "session.store"),
])
def test_bad_session_settings_name_the_field(tmp_path, session: str, error: str):
    d = write_policies(str(tmp_path), _files("http://127.0.0.1:9", 9, session))
    with pytest.raises(PolicyError) as e:
        load_dir(d)
    text = str(e.value)
    assert "p.yaml:" in text and error in text, text
    assert "hunter2" not in text


RENEWING_NGINX = NGINX_CONFIG.replace(
    "      error_page 401 = @signin;\n",
    "      error_page 401 = @signin;\n"
    "      auth_request_set $auth_cookie $upstream_http_set_cookie;  # as ingress-nginx's auth-url\n"
    "      add_header Set-Cookie $auth_cookie always;\n")


def test_a_renewed_cookie_session_reaches_the_browser_through_nginx(tmp_path, echo):
    if NGINX is None:
        pytest.skip("nginx is not installed (Debian: nginx-light)")
    assert RENEWING_NGINX != NGINX_CONFIG
    with oidc_provider(access_token_max_age=timedelta(seconds=2)) as issuer:
        set_user(issuer, "alice", ADMINS)
        s = _setup(tmp_path, issuer, echo.port, "{store: cookie}", BASIC)
        port = closed_port()
        conf = tmp_path / "nginx.conf"
        conf.write_text(RENEWING_NGINX.format(tmp=tmp_path, port=port, authz=s.port, echo=echo.port))
        proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(tmp_path)], stderr=subprocess.PIPE)
        try:
            wait_for(lambda: request(port, "/oauth2/healthz").status, "nginx")
            b = Browser(port)
            page = b.get(f"http://app.localtest:{port}/page")
            r = b.submit_login(page, b.history[-1][0], "alice")
            assert r.status == 200 and json.loads(r.body)["headers"]["x-auth-request-email"] == "alice@example.com"
            before = {c.name: c.value for c in b.cookies.values()}
            set_user(issuer, "alice", {**ADMINS, "email": "alice@new.example.com"})
            _wait_past(2.5)  # the tokens have expired
            r = b.get(f"http://app.localtest:{port}/page")
            assert r.status == 200, r.body
            assert json.loads(r.body)["headers"]["x-auth-request-email"] == "alice@new.example.com"  # renewed
            after = {c.name: c.value for c in b.cookies.values()}
            assert after.keys() == before.keys() and after != before  # the new session cookie arrived
            r = b.get(f"http://grafana.localtest:{port}/")  # and serves the next request
            assert r.status == 200 and json.loads(r.body)["headers"]["x-auth-request-email"] == "alice@new.example.com"
        finally:
            proc.terminate()
            proc.wait(10)
            if proc.stderr:
                proc.stderr.close()
            s.svc.close()
