"""A real nginx wired the way ingress-nginx wires ``auth-url``/``auth-signin``/
``auth-response-headers`` in front of the forward-auth endpoint (skipped without nginx)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from tests.support.http import request
from tests.support.policies import DEV_JWT, app_gateway, app_policy, write_policies
from tests.support.ports import closed_port
from tests.support.processes import ServiceThread

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: nginx-light)")

# What ingress-nginx generates for the annotations in docs/decision-service.md, trimmed to the
# directives that matter (its template sets these headers on the auth subrequest).
CONFIG = """
master_process off;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{}}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  server {{
    listen 127.0.0.1:{port};
    location = /_external-auth {{
      internal;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header Host authplane.authplane.svc;
      proxy_set_header X-Original-URL $scheme://$http_host$request_uri;
      proxy_set_header X-Original-Method $request_method;
      proxy_set_header X-Sent-From "nginx-ingress-controller";
      proxy_set_header X-Real-IP $remote_addr;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Auth-Request-Redirect $request_uri;
      proxy_http_version 1.1;
      proxy_pass http://127.0.0.1:{authz}/authz/sso;
    }}
    location @signin {{
      return 302 https://auth.example.com/oauth2/start?rd=$scheme://$http_host$request_uri;
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
def nginx(tmp_path, echo, jwks_file):
    d = write_policies(str(tmp_path / "policies"), {"p.yaml": app_gateway(echo.port) + "---\n" + app_policy(
        jwt=DEV_JWT, name="sso", ext="""
        service: builtin
        rules:
          - {name: sign-in, action: deny, when: {authenticated: false}, deny: {status: 401}}
          - {name: admins, action: allow, when: {claims: {groups: [admins]}}}
          - {name: others, action: deny, deny: {status: 403}}
        """)})
    svc = ServiceThread(d)
    port = closed_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(CONFIG.format(tmp=tmp_path, port=port, authz=svc.svc.http_port, echo=echo.port))
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(tmp_path)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                request(port, "/healthz")
                break
            except OSError:
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        svc.close()


def test_ingress_nginx_auth_url_signin_and_response_headers(nginx, idp):
    r = request(nginx, "/app/page?x=1", host="app.example.com", headers={"accept": "text/html"})
    assert r.status == 302
    assert r.headers["location"] == "https://auth.example.com/oauth2/start?rd=http://app.example.com/app/page?x=1"
    admin = {"cookie": f"session={idp.mint(sub='alice', email='a@example.com', groups=['admins'])}"}
    r = request(nginx, "/app/page", headers=admin)
    assert r.status == 200
    seen = r.json()["headers"]
    assert (seen["x-auth-request-user"], seen["x-auth-request-email"]) == ("alice", "a@example.com")
    assert seen["x-auth-request-groups"] == "admins"
    assert request(nginx, "/app/page", headers={"cookie": f"session={idp.mint(groups=['dev'])}"}).status == 403
