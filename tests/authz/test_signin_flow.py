"""The decision service's own sign-in (oauth2-proxy contract) with a real provider
(oidc-provider-mock) and a browser-like client: straight against the HTTP endpoint (as Traefik's
forwardAuth calls it) and through a real nginx wired like ingress-nginx ``auth-url``/``auth-signin``."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.http import request
from tests.support.oidc import Browser, oidc_provider, set_user
from tests.support.policies import write_policies
from tests.support.ports import closed_port
from tests.support.processes import ServiceThread

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
ADMINS = {"email": "alice@example.com", "groups": ["admins"]}


def _policies(issuer: str, port: int, key_files: list[str]) -> dict[str, str]:
    keys = ", ".join(f"{{file: {k}}}" for k in key_files)
    return {"secret.txt": "client-secret", **{k: f"{k}-0123456789abcdef0123456789abcdef" for k in key_files},
            "p.yaml": f"""
        kind: Gateway
        metadata: {{name: edge}}
        spec: {{fleet: edge, listeners: [{{name: http, port: 8080}}]}}
        ---
        kind: Backend
        metadata: {{name: app}}
        spec: {{endpoints: ["127.0.0.1:{port}"]}}
        ---
        kind: Route
        metadata: {{name: app}}
        spec: {{gateway: edge, rules: [{{name: main, match: {{pathPrefix: /}}, backend: app}}]}}
        ---
        kind: AuthPolicy
        metadata: {{name: sso}}
        spec:
          targetRef: {{kind: Route, name: app}}
          oidc:
            issuer: {issuer}
            clientId: apps
            clientSecret: {{file: secret.txt}}
            scopes: [openid, email, groups]
            cookie: {{domain: .localtest}}
            postLogoutRedirectUri: http://www.localtest/bye
            sessionKeys: [{keys}]
          extAuth:
            service: builtin
            rules:
              - {{name: sign-in, action: deny, when: {{authenticated: false}}, deny: {{status: 401}}}}
              - {{name: admins, action: allow, when: {{claims: {{groups: [admins]}}}}}}
              - {{name: others, action: deny, deny: {{status: 403}}}}
        """}


@dataclass
class Setup:
    issuer: str
    svc: ServiceThread
    policy_dir: str
    port: int
    """Where the browser sends every ``*.localtest`` request."""

    def url(self, host: str, path: str = "/") -> str:
        return f"http://{host}.localtest:{self.port}{path}"


@pytest.fixture
def provider() -> Iterator[str]:
    with oidc_provider() as issuer:
        yield issuer


def _service(tmp_path, issuer: str, port: int, keys: list[str] | None = None) -> tuple[ServiceThread, str]:
    d = write_policies(str(tmp_path / "policies"), _policies(issuer, port, keys or ["k1"]))
    return ServiceThread(d), d


@pytest.fixture
def direct(tmp_path, provider, echo) -> Iterator[Setup]:
    svc, d = _service(tmp_path, provider, echo.port)
    try:
        yield Setup(provider, svc, d, svc.svc.http_port)
    finally:
        svc.close()


def _check(b: Browser, s: Setup, host: str, path: str = "/page", xhr: bool = False):
    """What Traefik's forwardAuth sends for a request to ``host`` (through the browser's cookies)."""
    headers = {"x-forwarded-host": f"{host}.localtest:{s.port}", "x-forwarded-uri": path,
               "x-forwarded-proto": "http", "x-forwarded-method": "GET",
               "accept": "application/json" if xhr else "text/html",
               "x-auth-request-user": "mallory"}
    if xhr:
        headers["x-requested-with"] = "XMLHttpRequest"
    return b.request(s.url(host, "/authz"), headers=headers)


def _sign_in(b: Browser, s: Setup, start: str, sub: str = "alice"):
    page = b.get(start)
    assert page.status == 200 and "<form" in page.body, (page.status, b.history[-3:])
    return b.submit_login(page, b.history[-1][0], sub)


def test_direct_endpoint_signin_second_app_xhr_groups_and_sign_out(direct):
    set_user(direct.issuer, "alice", ADMINS)
    set_user(direct.issuer, "bob", {"email": "bob@example.com", "groups": ["dev"]})
    b = Browser(direct.port)
    r = _check(b, direct, "app")  # a browser without a session: straight to sign-in (Traefik)
    assert r.status == 302
    start = r.headers["location"]
    assert start.startswith(direct.url("app", "/oauth2/start?rd="))
    assert _check(b, direct, "app", xhr=True).status == 401
    end = _sign_in(b, direct, start)
    assert b.history[-1][0] == direct.url("app", "/page")  # back where the browser started
    assert end.status == 404  # the decision service itself does not serve /page
    for host in ("app", "grafana"):  # another app under the cookie domain: no new login
        r = _check(b, direct, host)
        assert r.status == 200, r.body
        assert r.headers["x-auth-request-user"] == "alice"
        assert r.headers["x-auth-request-email"] == "alice@example.com"
        assert r.headers["x-auth-request-groups"] == "admins"
    assert _check(b, direct, "app", xhr=True).status == 200

    r = b.get(direct.url("auth", "/oauth2/sign_out?rd=/"), follow=False)
    assert r.status == 302
    logout = urllib.parse.urlsplit(r.headers["location"])
    assert logout.path == "/oauth2/end_session"
    assert urllib.parse.parse_qs(logout.query)["post_logout_redirect_uri"] == ["http://www.localtest/bye"]
    assert not [c for c in b.cookies.values() if c.name.startswith("authplane_session")]
    assert _check(b, direct, "app").status == 302

    bob = Browser(direct.port)
    _sign_in(bob, direct, direct.url("app", "/oauth2/start?rd=/"), "bob")
    assert _check(bob, direct, "app").status == 403


def test_rd_to_a_foreign_host_is_refused(direct):
    b = Browser(direct.port)
    for rd in ("http://evil.example.com/", "//evil.example.com/", "https://localtest.evil.com/",
               "javascript:alert(1)"):
        r = b.get(direct.url("auth", "/oauth2/start?rd=" + urllib.parse.quote(rd, safe="")), follow=False)
        assert r.status == 400, rd
        r = b.get(direct.url("auth", "/oauth2/sign_out?rd=" + urllib.parse.quote(rd, safe="")), follow=False)
        assert r.status == 400, rd
    r = b.get(direct.url("auth", "/oauth2/start?rd=" + urllib.parse.quote(direct.url("kibana", "/x"))),
              follow=False)
    assert r.status == 302


def _session_cookies(b: Browser) -> list[str]:
    return sorted(c.name for c in b.cookies.values() if c.name.startswith("authplane_session"))


def test_tampered_cookie_and_state_are_refused(direct):
    set_user(direct.issuer, "alice", ADMINS)
    b = Browser(direct.port)
    _sign_in(b, direct, direct.url("app", "/oauth2/start?rd=/"))
    assert _check(b, direct, "app").status == 200
    cookie = next(c for c in b.cookies.values() if c.name == "authplane_session")
    raw = bytearray(base64.urlsafe_b64decode(cookie.value + "=" * (-len(cookie.value) % 4)))
    raw[-1] ^= 1
    cookie.value = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    assert _check(b, direct, "app", xhr=True).status == 401
    # a callback without the flow cookie (or with a forged state) signs nobody in
    r = b.get(direct.url("auth", "/oauth2/callback?code=x&state=y"), follow=False)
    assert r.status == 400


def test_many_groups_split_into_chunks_and_key_rotation(tmp_path, provider, echo):
    groups = [f"team-{i:04d}-with-a-long-name" for i in range(200)] + ["admins"]
    set_user(provider, "alice", {"email": "alice@example.com", "groups": groups})
    svc, d = _service(tmp_path, provider, echo.port, ["k1"])
    try:
        s = Setup(provider, svc, d, svc.svc.http_port)
        b = Browser(s.port)
        _sign_in(b, s, s.url("app", "/oauth2/start?rd=/"))
        names = _session_cookies(b)
        assert len(names) >= 2 and names[0] == "authplane_session_0", names
        assert sum(len(c.value) for c in b.cookies.values()) > 4096
        r = _check(b, s, "app")
        assert r.status == 200
        assert r.headers["x-auth-request-groups"].split(",") == groups
        # rotation: a new first key still reads sessions the old key sealed; without it, none
        write_policies(d, _policies(provider, echo.port, ["k2", "k1"]))
        svc.reload(d, "v2")
        assert _check(b, s, "app").status == 200
        write_policies(d, _policies(provider, echo.port, ["k2"]))
        svc.reload(d, "v3")
        assert _check(b, s, "app", xhr=True).status == 401
    finally:
        svc.close()


NGINX_CONFIG = """
master_process off;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{}}
http {{
  access_log off;
  large_client_header_buffers 4 16k;
  proxy_buffer_size 16k;
  proxy_buffers 8 16k;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  server {{
    listen 127.0.0.1:{port};
    location /oauth2/ {{
      proxy_set_header Host $http_host;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_pass http://127.0.0.1:{authz};
    }}
    location = /_external-auth {{
      internal;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header Host authplane.authplane.svc;
      proxy_set_header X-Original-URL $scheme://$http_host$request_uri;
      proxy_set_header X-Original-Method $request_method;
      proxy_set_header X-Real-IP $remote_addr;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_http_version 1.1;
      proxy_pass http://127.0.0.1:{authz}/oauth2/auth;
    }}
    location @signin {{
      return 302 $scheme://$http_host/oauth2/start?rd=$scheme://$http_host$request_uri;
    }}
    location / {{
      auth_request /_external-auth;
      auth_request_set $user $upstream_http_x_auth_request_user;
      auth_request_set $email $upstream_http_x_auth_request_email;
      auth_request_set $groups $upstream_http_x_auth_request_groups;
      proxy_set_header X-Auth-Request-User $user;
      proxy_set_header X-Auth-Request-Email $email;
      proxy_set_header X-Auth-Request-Groups $groups;
      error_page 401 = @signin;
      proxy_pass http://127.0.0.1:{echo};
    }}
  }}
}}
"""


@pytest.fixture
def nginx(tmp_path, provider, echo) -> Iterator[Setup]:
    if NGINX is None:
        pytest.skip("nginx is not installed (Debian: nginx-light)")
    svc, d = _service(tmp_path, provider, echo.port)
    port = closed_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONFIG.format(tmp=tmp_path, port=port, authz=svc.svc.http_port, echo=echo.port))
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(tmp_path)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                request(port, "/oauth2/healthz")
                break
            except OSError:
                time.sleep(0.05)
        yield Setup(provider, svc, d, port)
    finally:
        proc.terminate()
        proc.wait(10)
        svc.close()


def _seen(r) -> dict[str, str]:
    return json.loads(r.body)["headers"]


def test_ingress_nginx_signin_second_app_groups_xhr_sign_out(nginx):
    set_user(nginx.issuer, "alice", ADMINS)
    b = Browser(nginx.port)
    # ingress-nginx sends every 401 of auth-url to auth-signin, XHR too; /oauth2/auth itself says 401
    r = b.request(nginx.url("app", "/page"), headers={"accept": "application/json"})
    assert r.status == 302 and r.headers["location"].startswith(nginx.url("app", "/oauth2/start?rd="))
    assert b.request(nginx.url("app", "/oauth2/auth"), headers={"x-original-url": nginx.url("app", "/page"),
                                                                  "x-requested-with": "XMLHttpRequest"}).status == 401
    page = b.get(nginx.url("app", "/page"))
    assert "<form" in page.body
    r = b.submit_login(page, b.history[-1][0], "alice")
    assert r.status == 200 and b.history[-1][0] == nginx.url("app", "/page")
    seen = _seen(r)
    assert (seen["x-auth-request-user"], seen["x-auth-request-groups"]) == ("alice", "admins")
    r = b.get(nginx.url("grafana", "/d/home"), headers={"x-auth-request-user": "mallory"})
    assert r.status == 200 and b.history[-1][0] == nginx.url("grafana", "/d/home")  # no new login
    assert _seen(r)["x-auth-request-user"] == "alice"
    assert b.request(nginx.url("app", "/api"), headers={"accept": "application/json"}).status == 200

    r = b.get(nginx.url("app", "/oauth2/sign_out?rd=/"), follow=False)
    assert r.status == 302 and not _session_cookies(b)
    assert b.request(nginx.url("grafana", "/api"), headers={"accept": "application/json"}).status == 302

    set_user(nginx.issuer, "bob", {"email": "bob@example.com", "groups": ["dev"]})
    bob = Browser(nginx.port)
    page = bob.get(nginx.url("kibana", "/"))
    r = bob.submit_login(page, bob.history[-1][0], "bob")
    assert r.status == 403


def test_ingress_nginx_session_over_4kb_in_chunks(nginx):
    groups = [f"team-{i:04d}-with-a-long-name" for i in range(200)] + ["admins"]
    set_user(nginx.issuer, "alice", {"email": "alice@example.com", "groups": groups})
    b = Browser(nginx.port)
    page = b.get(nginx.url("app", "/"))
    r = b.submit_login(page, b.history[-1][0], "alice")
    assert r.status == 200, r.body[:300]
    assert len(_session_cookies(b)) >= 2
    assert _seen(r)["x-auth-request-groups"].split(",") == groups
