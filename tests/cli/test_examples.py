"""The example policies in policies/ do what their comments say, through a real Envoy."""

from __future__ import annotations

import os
import shutil

import pytest

from authplane.devtools.idp import DevIdentityProvider
from tests.support import ROOT
from tests.support.http import request
from tests.support.processes import start_static_envoy

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
