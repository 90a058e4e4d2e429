"""The development identity provider serves a JWKS and mints tokens Envoy accepts."""

from __future__ import annotations

import json
import os
import urllib.request

from authplane.devtools.idp_server import IdpServer, dev_provider

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_idp_serves_the_committed_dev_jwks_and_mints_tokens():
    server = IdpServer(dev_provider()).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        jwks = json.loads(urllib.request.urlopen(f"{base}/.well-known/jwks.json").read())
        with open(os.path.join(ROOT, "policies", "jwt", "dev-jwks.json")) as f:
            assert jwks == json.load(f)
        token = urllib.request.urlopen(f"{base}/token?sub=bob&groups=admins,dev").read().decode().strip()
        import base64

        payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
        assert payload["sub"] == "bob" and payload["groups"] == ["admins", "dev"]
        assert payload["iss"] == "http://127.0.0.1:9400" and payload["aud"] == "api"
    finally:
        server.stop()
