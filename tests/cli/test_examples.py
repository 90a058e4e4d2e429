"""The example policies in policies/ do what their comments say, through a real Envoy."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess

import pytest

from authplane.devtools.idp import DevIdentityProvider
from tests.support import ROOT
from tests.support.http import request
from tests.support.ports import free_port, wait_for
from tests.support.processes import ServiceThread, start_static_envoy

DEV_KEY = os.path.join(ROOT, "authplane", "devtools", "dev-idp-key.pem")


@pytest.fixture
def examples(tmp_path, echo, sample_authz):
    """policies/ copied, with the demo's fixed upstream ports swapped for the test's own."""
    d = tmp_path / "policies"
    shutil.copytree(os.path.join(ROOT, "policies"), d)
    for path in d.rglob("*.yaml"):
        text = path.read_text()
        text = text.replace("127.0.0.1:9080", f"127.0.0.1:{echo.port}")
        text = text.replace("127.0.0.1:9500", f"127.0.0.1:{sample_authz.port}")
        path.write_text(text)
    envoy = start_static_envoy(str(d), "edge", str(tmp_path))
    yield envoy
    envoy.stop()


def test_story1_byo_ext_authz_gateway_and_route(examples):
    port = examples.listener_port("llm/http")
    r = request(port, "/openai/v1/chat")
    assert r.status == 403
    assert r.body == "denied by ext_authz for not found header `x-ext-authz: allow` in the request"
    assert r.headers["x-ext-authz-check-result"] == "denied"
    r = request(port, "/openai/v1/chat", headers={"x-ext-authz": "allow"})
    assert r.status == 200
    assert r.json()["headers"]["x-ext-authz-check-result"] == "allowed"
    assert request(port, "/models").status == 403  # gateway level applies to every route
    assert request(port, "/models", headers={"x-ext-authz": "allow"}).status == 200


def test_story3_jwt_with_jwks_file_and_claim_rules(examples):
    with open(DEV_KEY, "rb") as f:
        idp = DevIdentityProvider.from_pem(f.read(), issuer="http://127.0.0.1:9400",
                                           kid="authplane-dev-1")
    port = examples.listener_port("edge/http")
    alice = {"authorization": f"Bearer {idp.mint(sub='alice', groups=['admins'])}"}
    bob = {"authorization": f"Bearer {idp.mint(sub='bob', groups=['dev'])}"}
    assert request(port, "/api/items").status == 401
    r = request(port, "/api/items", headers=bob)
    assert r.status == 200 and r.json()["headers"]["x-user-id"] == "bob"
    assert request(port, "/api/items", method="DELETE", headers=bob).status == 403
    assert request(port, "/api/admin/users", headers=bob).status == 403
    assert request(port, "/api/admin/users", headers=alice).status == 200
    cookie = {"cookie": f"token={idp.mint(sub='carol')}"}
    assert request(port, "/api/items", headers=cookie).status == 200
    assert request(port, "/healthz").status == 200
    assert request(port, "/open/anything").status == 200


def test_public_health_route_under_a_gateway_ext_authz(examples):
    port = examples.listener_port("llm/http")
    assert request(port, "/healthz").status == 200  # public: true, no x-ext-authz needed
    assert request(port, "/models").status == 403  # the gateway's check still applies elsewhere


def test_api_keys_and_basic_auth_on_one_route_each(examples):
    port = examples.listener_port("edge/http")
    assert request(port, "/partners/orders").status == 401
    assert request(port, "/partners/orders", headers={"x-api-key": "wrong"}).status == 401
    r = request(port, "/partners/orders", headers={"x-api-key": "acme-dev-key-1"})
    assert r.status == 200
    seen = r.json()["headers"]
    assert seen["x-client"] == "acme" and "x-api-key" not in seen
    assert request(port, "/staging/").status == 401
    wrong = base64.b64encode(b"demo:nope").decode()
    assert request(port, "/staging/", headers={"authorization": f"Basic {wrong}"}).status == 401
    good = base64.b64encode(b"demo:staging-demo").decode()
    r = request(port, "/staging/", headers={"authorization": f"Basic {good}"})
    assert r.status == 200
    seen = r.json()["headers"]
    assert seen["x-user"] == "demo" and "authorization" not in seen


NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def test_forward_auth_set_with_its_nginx_conf(tmp_path, echo):
    """policies/forward-auth/nginx.conf as shipped (only its three ports swapped) in a real nginx,
    against the decision service loaded with the example policies."""
    d = tmp_path / "policies"
    shutil.copytree(os.path.join(ROOT, "policies"), d)
    svc = ServiceThread(str(d))
    nginx_port = free_port()
    conf = (d / "forward-auth" / "nginx.conf").read_text()
    for old, new in (("127.0.0.1:10080", nginx_port), ("127.0.0.1:9002", svc.svc.http_port),
                     ("127.0.0.1:9080", echo.port)):
        assert old in conf
        conf = conf.replace(old, f"127.0.0.1:{new}")
    run = tmp_path / "nginx"
    run.mkdir()
    (run / "nginx.conf").write_text(conf)
    proc = subprocess.Popen([NGINX, "-p", str(run), "-c", str(run / "nginx.conf")], stderr=subprocess.PIPE)
    try:
        wait_for(lambda: _answers(nginx_port), "nginx to listen")
        with open(DEV_KEY, "rb") as f:
            idp = DevIdentityProvider.from_pem(f.read(), issuer="http://127.0.0.1:9400", kid="authplane-dev-1")
        assert request(nginx_port, "/").status == 401
        bob = {"authorization": f"Bearer {idp.mint(sub='bob', groups=['dev'])}"}
        assert request(nginx_port, "/", headers=bob).status == 403
        alice = {"authorization": f"Bearer {idp.mint(sub='alice', groups=['admins'])}",
                 "x-auth-request-user": "mallory"}
        r = request(nginx_port, "/", headers=alice)
        assert r.status == 200
        assert r.json()["headers"]["x-auth-request-user"] == "alice"  # the client's copy is replaced
    finally:
        proc.terminate()
        proc.wait(10)
        svc.close()


def _answers(port: int) -> bool:
    try:
        request(port, "/")
    except OSError:
        return False
    return True
