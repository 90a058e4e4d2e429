"""The decision service's own sign-in (forward auth, as Traefik's forwardAuth calls it) against a
certified OpenID provider written by others (npm ``oidc-provider``, default conforming claim
behaviour: ``groups`` only from userinfo), which takes the client secret only the way the
policy's ``tokenEndpointAuth`` says; and refresh tokens through ``offline_access``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from tests.authz.test_signin_flow import Setup, _check
from tests.authz.test_signin_redis import _files
from tests.support.certified_oidc import Client, certified_provider, missing, sign_in
from tests.support.oidc import Browser
from tests.support.policies import write_policies
from tests.support.processes import ServiceThread

pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")

ACCOUNTS = {"alice": {"email": "alice@example.com", "email_verified": True, "groups": ["admins", "dev"]},
            "bob": {"email": "bob@example.com", "email_verified": True, "groups": ["dev"]}}


@dataclass
class RefreshingClient(Client):
    """A registration that may use refresh tokens (oidc-provider issues them for ``offline_access``)."""

    grant_types: list[str] = field(default_factory=lambda: ["authorization_code", "refresh_token"])


@contextmanager
def _service(tmp_path, auth: str, session: str = "{store: cookie}",
             offline: bool = False) -> Iterator[Setup]:
    """The decision service (its port known first: the provider registers the callback URIs with
    it), then the provider refusing the client secret sent the other way, then the policies."""
    svc = ServiceThread()
    try:
        port = svc.svc.http_port
        callbacks = [f"http://{h}.localtest:{port}/oauth2/callback" for h in ("app", "grafana")]
        client = RefreshingClient("apps", "client-secret", callbacks, ["http://www.localtest/bye"], auth)
        with certified_provider([client], ACCOUNTS, require_token_auth=auth) as issuer:
            files = _files(issuer, 9, session, f"tokenEndpointAuth: {auth}")
            if offline:
                files["p.yaml"] = files["p.yaml"].replace("scopes: [openid, email, groups]",
                                                          "scopes: [openid, email, groups, offline_access]")
            d = write_policies(str(tmp_path / "policies"), files)
            svc.reload(d, "v1")
            yield Setup(issuer, svc, d, port)
    finally:
        svc.close()


@pytest.fixture(params=["client_secret_post", "client_secret_basic"])
def certified(request, tmp_path) -> Iterator[Setup]:
    with _service(tmp_path, request.param) as s:
        yield s


def test_a_group_rule_admits_a_member_on_the_forward_auth_path(certified):
    s = certified
    alice = Browser(s.port)
    sign_in(alice, s.url("app", "/oauth2/start?rd=/page"), "alice")
    assert alice.history[-1][0] == s.url("app", "/page")  # signed in and back (the code exchange worked)
    for host in ("app", "grafana"):  # the admins rule, on groups the provider gave in userinfo only
        r = _check(alice, s, host)
        assert r.status == 200, r.body
        assert (r.headers["x-auth-request-user"], r.headers["x-auth-request-groups"]) == ("alice", "admins,dev")
        assert r.headers["x-auth-request-email"] == "alice@example.com"
    bob = Browser(s.port)
    sign_in(bob, s.url("app", "/oauth2/start?rd=/page"), "bob")
    assert _check(bob, s, "app").status == 403


def test_offline_access_refresh_renews_the_session(tmp_path):
    with _service(tmp_path, "client_secret_basic", "{store: cookie, refreshInterval: 1s}", offline=True) as s:
        b = Browser(s.port)
        start = b.get(s.url("app", "/oauth2/start?rd=/page"), follow=False)
        assert "prompt=consent" in start.headers["location"]  # OpenID Connect Core 11: offline access
        sign_in(b, s.url("app", "/oauth2/start?rd=/page"), "alice")
        before = {c.name: c.value for c in b.cookies.values() if c.name.startswith("authplane_session")}
        assert _check(b, s, "app").status == 200
        time.sleep(1.2)  # past the refresh interval (a wait, no timing assertion)
        r = _check(b, s, "app")
        assert r.status == 200 and r.headers["x-auth-request-groups"] == "admins,dev"
        after = {c.name: c.value for c in b.cookies.values() if c.name.startswith("authplane_session")}
        assert after and after != before  # renewed with the refresh token: a new session cookie
