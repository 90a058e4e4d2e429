"""The SSO example of ``policies/sso/`` (user story 2) served by ``authplane serve``: the client
secret and cookie key reach Envoy over SDS, one sign-in at a real OpenID provider serves Grafana,
Kibana and the wiki under one parent domain, and each app's group rule decides."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.compiler.test_oidc_envoy import sign_in
from tests.support import ROOT
from tests.support.http import request
from tests.support.oidc import Browser, oidc_provider, set_user
from tests.support.ports import free_port
from tests.support.processes import ServeProcess, start_envoys

KEYCLOAK = "https://sso.example.test/realms/main"


@pytest.fixture(scope="module")
def sso(tmp_path_factory):
    from authplane.devtools.echo import EchoServer

    tmp = tmp_path_factory.mktemp("sso-example")
    echo = EchoServer().start()
    port = free_port()
    procs: list = []
    try:
        with oidc_provider() as issuer:
            set_user(issuer, "alice", {"email": "alice@example.test", "groups": ["grafana-users"]})
            set_user(issuer, "olga", {"email": "olga@example.test", "groups": ["ops"]})
            d = tmp / "policies"
            shutil.copytree(os.path.join(ROOT, "policies", "sso"), d)
            with open(d / "sso.yaml") as f:
                text = f.read()
            for old, new in ((f"{KEYCLOAK}/protocol/openid-connect/auth", f"{issuer}/oauth2/authorize"),
                             (f"{KEYCLOAK}/protocol/openid-connect/token", f"{issuer}/oauth2/token"),
                             (f"{KEYCLOAK}/protocol/openid-connect/certs", f"{issuer}/jwks"),
                             (KEYCLOAK, issuer), ("port: 10002", f"port: {port}")):
                assert old in text, old
                text = text.replace(old, new)
            for app_port in ("3000", "5601", "9080"):
                text = text.replace(f'"127.0.0.1:{app_port}"', f'"127.0.0.1:{echo.port}"')
            with open(d / "sso.yaml", "w") as f:
                f.write(text)
            serve = ServeProcess(str(d), str(tmp), 0, "--no-authz", "--log-level", "debug")
            procs.append(serve)
            serve.wait_started()
            procs += start_envoys(str(tmp), serve.xds, [("sso-1", "sso", True)])
            serve.wait_in_sync("sso-1")
            yield issuer, port, str(d), serve
    finally:
        for p in reversed(procs):
            p.stop(signal.SIGKILL) if isinstance(p, ServeProcess) else p.stop()
        echo.stop()


def test_one_sign_in_serves_every_app_and_group_rules_decide(sso):
    _, port, _, _ = sso
    browser = Browser(port, domain=".example.test")
    r = sign_in(browser, "http://wiki.example.test/start", "alice")
    assert r.status == 200, browser.history
    headers = r.json()["headers"]
    assert (headers["x-auth-request-user"], headers["x-auth-request-email"]) == ("alice", "alice@example.test")
    logins = len(browser.history)
    assert browser.get("http://grafana.example.test/d/home").status == 200  # grafana-users
    assert len(browser.history) == logins + 1  # no second trip to the provider
    assert browser.get("http://kibana.example.test/app/discover").status == 403  # not in ops

    ops = Browser(port, domain=".example.test")
    assert sign_in(ops, "http://kibana.example.test/app/discover", "olga").status == 200
    assert ops.get("http://grafana.example.test/").status == 403
    assert ops.get("http://wiki.example.test/").status == 200  # any signed-in user


def test_api_clients_and_pass_through_paths(sso):
    _, port, _, _ = sso
    assert request(port, "/api/search", host="grafana.example.test",
                   headers={"accept": "application/json"}).status == 401
    assert request(port, "/public/logo.png", host="wiki.example.test", headers={"accept": "text/html"}).status == 200


def test_render_redacts_the_client_secret_unless_asked(sso):
    _, _, d, serve = sso
    with open(os.path.join(d, "client-secret.dev.txt")) as f:
        secret = f.read().strip()
    cmd = [sys.executable, "-m", "authplane.cli", "render", d, "--fleet", "sso", "--format", "json"]
    for extra, shown in (([], False), (["--static"], False), (["--show-secrets"], True)):
        r = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert (base64.b64encode(secret.encode()).decode() in r.stdout or secret in r.stdout) is shown, extra
        assert ("[redacted: " in r.stdout) is not shown, extra
    b64 = base64.b64encode(secret.encode()).decode()
    status = json.dumps(serve.status())
    for text in (serve.log(), status):  # nor does it show in logs or status
        assert secret not in text and b64 not in text
