"""The development identity provider over HTTP: a JWKS, OpenID discovery and a token endpoint.

``GET /.well-known/jwks.json`` — the public keys; ``GET /token?sub=alice&groups=admins,dev``
(optional ``aud``, ``email``, ``ttl``) — a signed RS256 token as text. Development only: it
signs whatever it is asked to.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import parse_qs, urlsplit

from authplane.devtools.httpserver import BackgroundServer, Handler
from authplane.devtools.idp import DevIdentityProvider

DEV_KEY = os.path.join(os.path.dirname(__file__), "dev-idp-key.pem")
DEV_KID = "authplane-dev-1"


def dev_provider(issuer: str = "http://127.0.0.1:9400") -> DevIdentityProvider:
    """The provider whose public key is in policies/jwt/dev-jwks.json."""
    with open(DEV_KEY, "rb") as f:
        return DevIdentityProvider.from_pem(f.read(), issuer=issuer, kid=DEV_KID)


def mint_from_query(idp: DevIdentityProvider, query: dict[str, list[str]]) -> str:
    one = {k: v[-1] for k, v in query.items()}
    claims: dict[str, Any] = {}
    if one.get("groups"):
        claims["groups"] = [g for g in one["groups"].split(",") if g]
    if one.get("email"):
        claims["email"] = one["email"]
    return idp.mint(sub=one.get("sub", "alice"), audience=one.get("aud", "api"),
                    ttl=int(one.get("ttl", "3600")), **claims)


class IdpServer(BackgroundServer):
    def __init__(self, idp: DevIdentityProvider, host: str = "127.0.0.1", port: int = 0):
        provider = idp
        json_type = {"content-type": "application/json"}
        text_type = {"content-type": "text/plain"}

        class _Idp(Handler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if url.path == "/.well-known/jwks.json":
                    self.send(200, json.dumps(provider.jwks()), json_type)
                elif url.path == "/.well-known/openid-configuration":
                    doc = {"issuer": provider.issuer, "jwks_uri": f"{provider.issuer}/.well-known/jwks.json",
                           "id_token_signing_alg_values_supported": ["RS256"]}
                    self.send(200, json.dumps(doc), json_type)
                elif url.path == "/token":
                    try:
                        self.send(200, mint_from_query(provider, parse_qs(url.query)) + "\n", text_type)
                    except ValueError as e:
                        self.send(400, f"bad request: {e}\n", text_type)
                else:
                    self.send(404, "not found\n", text_type)

        super().__init__(_Idp, host, port)
        self.idp = idp
