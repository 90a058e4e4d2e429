"""A development identity provider: an RSA key, its JWKS, and RS256 tokens on demand."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int(n: int) -> str:
    return _b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))


class DevIdentityProvider:
    def __init__(self, issuer: str = "https://idp.authplane.test", kid: str = "dev-1",
                 key: rsa.RSAPrivateKey | None = None):
        self.issuer = issuer
        self.kid = kid
        self.key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)

    @classmethod
    def from_pem(cls, pem: bytes, **kw: Any) -> DevIdentityProvider:
        key = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        return cls(key=key, **kw)

    def private_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def jwks(self) -> dict[str, Any]:
        pub = self.key.public_key().public_numbers()
        return {"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.kid,
                          "n": _int(pub.n), "e": _int(pub.e)}]}

    def mint(self, sub: str = "alice", audience: str | list[str] | None = "api", ttl: int = 3600,
             **claims: Any) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {"iss": self.issuer, "sub": sub, "iat": now, "exp": now + ttl}
        if audience is not None:
            payload["aud"] = audience
        payload.update(claims)
        header = {"alg": "RS256", "typ": "JWT", "kid": self.kid}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64(sig)}"
