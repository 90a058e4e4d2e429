"""One table of JWTs, each sent through a real Envoy (jwt_authn) and to the forward-auth endpoint
(which verifies tokens itself): both must answer with the same status."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from authplane.devtools.echo import EchoServer
from authplane.devtools.idp import DevIdentityProvider
from tests.support.http import request
from tests.support.policies import app_gateway, app_policy, write_policies
from tests.support.processes import ServiceThread, start_static_envoy

JWT = """
    required: {required}
    providers:
      - name: dev
        issuer: https://idp.authplane.test
        audiences: [api]
        clockSkew: 60s
        jwks: {{file: jwks.json}}
        from: [{{cookie: session}}, {{header: x-token, prefix: "Token "}}, {{header: authorization, prefix: "Bearer "}}]
"""
ALLOW_ALL = "service: builtin\nrules: [{name: all, action: allow}]"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(idp: DevIdentityProvider, header: dict | None = None, **claims: object) -> str:
    """A token with the idp's default claims overridden by ``claims`` (None removes one),
    signed as its header's ``alg`` says (``none``: no signature; HS256: the public key as secret)."""
    now = int(time.time())
    payload = {"iss": idp.issuer, "sub": "alice", "aud": "api", "iat": now, "exp": now + 3600, **claims}
    head = {"alg": "RS256", "typ": "JWT", "kid": idp.kid, **(header or {})}
    head = {k: v for k, v in head.items() if v is not None}
    signing = (f"{_b64(json.dumps(head).encode())}."
               f"{_b64(json.dumps({k: v for k, v in payload.items() if v is not None}).encode())}")
    if head["alg"] == "none":
        return signing + "."
    if head["alg"] == "HS256":
        secret = idp.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
        return f"{signing}.{_b64(hmac.new(secret, signing.encode(), hashlib.sha256).digest())}"
    return f"{signing}.{_b64(idp.key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256()))}"


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def _tampered(idp: DevIdentityProvider) -> str:
    token = sign(idp)
    head, payload, sig = token.split(".")
    return f"{head}.{payload}.{sig[:10]}{'A' if sig[10] != 'A' else 'B'}{sig[11:]}"


Case = Callable[[DevIdentityProvider, int], dict[str, str]]
"""(identity provider, now) → the request headers carrying the token."""
CASES: dict[str, tuple[str, Case]] = {
    "good": ("/x", lambda idp, now: bearer(sign(idp))),
    "expired": ("/x", lambda idp, now: bearer(sign(idp, exp=now - 600))),
    "exp-as-string": ("/x", lambda idp, now: bearer(sign(idp, exp=str(now + 3600)))),
    "exp-1e20": ("/x", lambda idp, now: bearer(sign(idp, exp=1e20))),
    "exp-negative": ("/x", lambda idp, now: bearer(sign(idp, exp=-5))),
    "exp-fractional": ("/x", lambda idp, now: bearer(sign(idp, exp=now + 3600.5))),
    "nbf-in-future": ("/x", lambda idp, now: bearer(sign(idp, nbf=now + 600))),
    "nbf-as-string": ("/x", lambda idp, now: bearer(sign(idp, nbf=str(now)))),
    "expired-within-skew": ("/x", lambda idp, now: bearer(sign(idp, exp=now - 20))),
    "nbf-within-skew": ("/x", lambda idp, now: bearer(sign(idp, nbf=now + 20))),
    "no-exp": ("/x", lambda idp, now: bearer(sign(idp, exp=None))),
    "wrong-issuer": ("/x", lambda idp, now: bearer(sign(idp, iss="https://evil.test"))),
    "no-issuer": ("/x", lambda idp, now: bearer(sign(idp, iss=None))),
    "wrong-audience": ("/x", lambda idp, now: bearer(sign(idp, aud="other"))),
    "no-audience": ("/x", lambda idp, now: bearer(sign(idp, aud=None))),
    "audience-in-list": ("/x", lambda idp, now: bearer(sign(idp, aud=["other", "api"]))),
    "audience-as-url": ("/x", lambda idp, now: bearer(sign(idp, aud="https://api/"))),
    "sub-not-string": ("/x", lambda idp, now: bearer(sign(idp, sub=7))),
    "bad-signature": ("/x", lambda idp, now: bearer(_tampered(idp))),
    "alg-none": ("/x", lambda idp, now: bearer(sign(idp, {"alg": "none"}))),
    "alg-hs256-public-key": ("/x", lambda idp, now: bearer(sign(idp, {"alg": "HS256"}))),
    "unknown-kid": ("/x", lambda idp, now: bearer(sign(idp, {"kid": "nope"}))),
    "no-kid": ("/x", lambda idp, now: bearer(sign(idp, {"kid": None}))),
    "extra-header-field": ("/x", lambda idp, now: bearer(sign(idp, {"x-custom": [1, 2], "cty": "JWT"}))),
    "missing-required": ("/x", lambda idp, now: {}),
    "missing-optional": ("/opt/x", lambda idp, now: {}),
    "invalid-optional": ("/opt/x", lambda idp, now: bearer(sign(idp, exp=now - 600))),
    "two-parts": ("/x", lambda idp, now: bearer("abc.def")),
    "four-parts": ("/x", lambda idp, now: bearer(sign(idp) + ".x")),
    "not-base64": ("/x", lambda idp, now: bearer("!!!.???.***")),
    "payload-not-json": ("/x", lambda idp, now: bearer(f"{sign(idp).split('.')[0]}.{_b64(b'[1')}.x")),
    "in-cookie": ("/x", lambda idp, now: {"cookie": f"theme=dark; session={sign(idp)}"}),
    "in-custom-header": ("/x", lambda idp, now: {"x-token": f"Token {sign(idp)}"}),
    "custom-header-wrong-prefix": ("/x", lambda idp, now: {"x-token": f"Bearer {sign(idp)}"}),
}


OK = {"good", "exp-fractional", "expired-within-skew", "nbf-within-skew", "no-exp", "audience-in-list",
      "audience-as-url", "no-kid", "extra-header-field", "missing-optional", "in-cookie", "in-custom-header"}
"""Only to show the table has both outcomes; the statuses compared are Envoy's, as run."""


@pytest.fixture(scope="module")
def both(tmp_path_factory, idp):
    """(Envoy listener port, forward-auth port) for the same policies: route ``app`` requires a
    token, route ``opt`` (``/opt``) accepts a request without one."""
    tmp = tmp_path_factory.mktemp("tokens")
    echo = EchoServer().start()
    opt_route = ("kind: Route\nmetadata: {name: opt}\n"
                 "spec: {gateway: edge, rules: [{name: main, match: {pathPrefix: /opt}, backend: app}]}")
    d = write_policies(str(tmp / "policies"), {
        "gateway.yaml": app_gateway(echo.port) + "---\n" + opt_route,
        "policy.yaml": app_policy(ALLOW_ALL, JWT.format(required="true")) + "---\n"
                       + app_policy(ALLOW_ALL, JWT.format(required="false"), name="opt", route="opt"),
        "jwks.json": json.dumps(idp.jwks())})
    svc = ServiceThread(d)
    envoy = None
    try:
        envoy = start_static_envoy(d, "edge", str(tmp), svc.opts)
        yield envoy.listener_port("edge/http"), svc.svc.http_port
    finally:
        if envoy is not None:
            envoy.stop()
        svc.close()
        echo.stop()


@pytest.mark.parametrize("case", list(CASES))
def test_forward_auth_answers_tokens_as_envoy_does(both, idp, case):
    envoy_port, forward_port = both
    path, make = CASES[case]
    headers = make(idp, int(time.time()))
    via_envoy = request(envoy_port, path, headers=headers)
    policy = "opt" if path.startswith("/opt") else "app"
    forward = request(forward_port, f"/authz/{policy}", headers={
        "x-forwarded-method": "GET", "x-forwarded-proto": "http", "x-forwarded-host": "localhost",
        "x-forwarded-uri": path, **headers})
    assert forward.status == via_envoy.status, (via_envoy.body, forward.body)
    assert (via_envoy.status == 200) == (case in OK)
    for token_part in headers.values():
        assert token_part.split()[-1] not in forward.body  # the reason never quotes the token
