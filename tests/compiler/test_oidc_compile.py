"""OIDC resolution (discovery, secrets, HMAC key) and how secrets appear in what authplane prints."""

from __future__ import annotations

import base64
import os

from authplane.compiler.render import dump, snapshot_dict, static_bootstrap, to_dict
from authplane.compiler.resources import SECRET
from authplane.compiler.snapshot import compile_policies
from authplane.policy import oidc
from authplane.policy.loader import load_dir
from authplane.policy.model import Oidc
from tests.support import TESTDATA
from tests.support.oidc import oidc_provider

CASE = os.path.join(TESTDATA, "oidc-sso.in.yaml")
CLIENT_SECRET = "golden-test-client-secret-not-for-production"


def spec(client_id: str = "apps") -> Oidc:
    return Oidc(issuer="https://idp.example.com", client_id=client_id, client_secret={"env": "X"})


def test_hmac_key_is_stable_per_client_and_does_not_reveal_the_secret():
    key = oidc.derive_hmac_secret(b"s3cret", spec())
    assert key == oidc.derive_hmac_secret(b"s3cret", spec()) and len(key) == 32
    assert key != oidc.derive_hmac_secret(b"s3cret", spec("other"))
    assert key != oidc.derive_hmac_secret(b"rotated", spec())
    assert b"s3cret" not in key


def test_discovery_is_cached_and_survives_the_provider_going_away(monkeypatch):
    with oidc_provider() as issuer:
        found, warning = oidc.discover(issuer)
    assert (found.authorization, found.token, found.jwks) == (
        f"{issuer}/oauth2/authorize", f"{issuer}/oauth2/token", f"{issuer}/jwks")
    assert found.end_session == f"{issuer}/oauth2/end_session" and warning is None
    assert oidc.discover(issuer) == (found, None)  # cached: the provider is gone
    monkeypatch.setattr(oidc, "CACHE_TTL", 0.0)
    again, warning = oidc.discover(issuer, timeout=1)
    assert again == found
    assert warning and "cannot fetch the discovery document" in warning and "using the copy fetched" in warning


def test_render_redacts_secrets_and_the_static_bootstrap_carries_them():
    snap = compile_policies(load_dir(CASE))["edge"]
    assert sorted(snap.resources[SECRET]) == ["admin-sso/oidc-client-secret", "admin-sso/oidc-hmac",
                                              "sso/oidc-client-secret", "sso/oidc-hmac"]
    shown = dump(snapshot_dict(snap))
    assert CLIENT_SECRET not in shown and base64.b64encode(CLIENT_SECRET.encode()).decode() not in shown
    assert shown.count(f"[redacted: {len(CLIENT_SECRET)} bytes]") == 2
    assert shown.count("[redacted: 32 bytes]") == 2
    assert base64.b64encode(CLIENT_SECRET.encode()).decode() in dump(snapshot_dict(snap, show_secrets=True))
    boot = to_dict(static_bootstrap(snap))
    assert {s["name"] for s in boot["static_resources"]["secrets"]} == set(snap.resources[SECRET])
    text = dump(boot)
    assert "sds_config" not in text and "sso/oidc-hmac" in text  # static references by name


def test_oidc_secret_and_discovery_changes_change_the_version(tmp_path):
    from tests.support.policies import write_policies

    policy = """
        kind: Gateway
        metadata: {name: edge}
        spec: {fleet: edge, listeners: [{name: http, port: 8080}]}
        ---
        kind: AuthPolicy
        metadata: {name: sso}
        spec:
          targetRef: {kind: Gateway, name: edge}
          oidc:
            issuer: https://idp.example.com
            authorizationEndpoint: https://idp.example.com/a
            tokenEndpoint: https://idp.example.com/t
            jwksUri: https://idp.example.com/k
            clientId: app
            clientSecret: {file: secret.txt}
        """
    d = write_policies(str(tmp_path), {"p.yaml": policy, "secret.txt": "one"})
    first = compile_policies(load_dir(d))["edge"].version
    write_policies(str(tmp_path), {"secret.txt": "two"})
    assert compile_policies(load_dir(d))["edge"].version != first
