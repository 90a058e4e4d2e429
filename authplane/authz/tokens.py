"""JWT verification for the forward-auth endpoint (nginx and Traefik have no jwt_authn filter).

Envoy verifies tokens itself and sends the payload; this module gives the forward-auth endpoint
the same semantics from a policy's ``jwt`` section: token from the configured header, cookie or
query parameter; RS256/384/512, PS256/384/512 and ES256/384 signatures; issuer, audiences,
``exp``/``nbf`` with the clock skew. Remote JWKS are fetched and cached for ``cacheDuration``.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Mapping
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qs

import aiohttp
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from authplane.policy.model import Jwks, Jwt, JwtProvider

_HASHES = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
_CURVES = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1}


class InvalidToken(Exception):
    """A token is missing or not acceptable; the reason is safe to return (never the token).
    ``status`` is what Envoy's jwt_authn answers: 401, or 403 for a wrong audience."""

    def __init__(self, reason: str, status: int = 401) -> None:
        super().__init__(reason)
        self.status = status


def _b64(part: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise InvalidToken("malformed token") from None


def _int(value: str) -> int:
    return int.from_bytes(_b64(value), "big")


def public_key(jwk: dict[str, Any]) -> Any:
    kty = jwk.get("kty")
    if kty == "RSA":
        return rsa.RSAPublicNumbers(_int(jwk["e"]), _int(jwk["n"])).public_key()
    if kty == "EC" and jwk.get("crv") in _CURVES:
        curve = _CURVES[jwk["crv"]]()
        return ec.EllipticCurvePublicNumbers(_int(jwk["x"]), _int(jwk["y"]), curve).public_key()
    return None


def _verify(key: Any, alg: str, signed: bytes, sig: bytes) -> None:
    digest = _HASHES.get(alg[2:])
    if digest is None:
        raise InvalidToken(f"unsupported algorithm {alg!r}")
    try:
        if alg.startswith("RS") and isinstance(key, rsa.RSAPublicKey):
            key.verify(sig, signed, padding.PKCS1v15(), digest())
        elif alg.startswith("PS") and isinstance(key, rsa.RSAPublicKey):
            key.verify(sig, signed, padding.PSS(padding.MGF1(digest()), digest.digest_size), digest())
        elif alg.startswith("ES") and isinstance(key, ec.EllipticCurvePublicKey):
            half = len(sig) // 2
            der = encode_dss_signature(int.from_bytes(sig[:half], "big"), int.from_bytes(sig[half:], "big"))
            key.verify(der, signed, ec.ECDSA(digest()))
        else:
            raise InvalidToken(f"algorithm {alg!r} does not fit the key")
    except InvalidSignature:
        raise InvalidToken("bad signature") from None


class KeySet:
    """The keys of one provider's JWKS (file and inline: fixed; uri: fetched and cached)."""

    def __init__(self, jwks: Jwks, file_text: str | None) -> None:
        self.spec = jwks
        self._keys: list[tuple[str | None, Any]] = []
        self._fetched = 0.0
        if jwks.inline is not None:
            self._load(jwks.inline)
        elif file_text is not None:
            self._load(json.loads(file_text))

    def _load(self, data: Any) -> None:
        keys = []
        for jwk in data.get("keys", []) if isinstance(data, dict) else []:
            try:
                key = public_key(jwk)
            except (KeyError, TypeError, ValueError, InvalidToken):
                key = None
            if key is not None:
                keys.append((jwk.get("kid"), key))
        self._keys = keys

    async def keys(self) -> list[tuple[str | None, Any]]:
        uri = self.spec.uri
        if uri and time.monotonic() - self._fetched > self.spec.cache_duration:
            timeout = aiohttp.ClientTimeout(total=self.spec.timeout)
            try:
                async with aiohttp.ClientSession(timeout=timeout) as session, session.get(uri) as r:
                    r.raise_for_status()
                    self._load(await r.json(content_type=None))
                    self._fetched = time.monotonic()
            except (aiohttp.ClientError, TimeoutError, ValueError):
                if not self._keys:
                    raise InvalidToken("JWKS unavailable") from None
        return self._keys


def _find_token(prov: JwtProvider, headers: Mapping[str, str], query: str) -> str | None:
    sources = prov.from_ or []
    if not sources:
        value = headers.get("authorization", "")
        return value[7:].strip() if value[:7].lower() == "bearer " else None
    for src in sources:
        if src.header:
            value = headers.get(src.header, "")
            prefix = src.prefix or ""
            if value and value.startswith(prefix):
                return value[len(prefix):].strip()
        elif src.cookie:
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(headers.get("cookie", ""))
            except CookieError:
                continue
            if src.cookie in jar:
                return jar[src.cookie].value
        elif src.query:
            found = parse_qs(query).get(src.query)
            if found:
                return found[0]
    return None


class Verifier:
    """A policy's ``jwt`` section: any one provider's valid token is accepted."""

    def __init__(self, jwt: Jwt, jwks_files: dict[str, str]) -> None:
        self.required = jwt.required
        self.providers = [(p, KeySet(p.jwks, jwks_files.get(p.name))) for p in jwt.providers]

    async def verify(self, headers: Mapping[str, str], query: str = "") -> dict[str, Any] | None:
        """The verified claims; None when no token is present; InvalidToken otherwise."""
        problem: InvalidToken | None = None
        present = False
        for prov, keyset in self.providers:
            token = _find_token(prov, headers, query)
            if token is None:
                continue
            present = True
            try:
                return await self._check(prov, keyset, token)
            except InvalidToken as e:
                problem = e
        if present:
            raise problem or InvalidToken("invalid token")
        if self.required:
            raise InvalidToken("missing token")
        return None

    async def _check(self, prov: JwtProvider, keyset: KeySet, token: str) -> dict[str, Any]:
        parts = token.split(".")
        if len(parts) != 3:
            raise InvalidToken("malformed token")
        try:
            header = json.loads(_b64(parts[0]))
            claims = json.loads(_b64(parts[1]))
        except ValueError:
            raise InvalidToken("malformed token") from None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise InvalidToken("malformed token")
        alg, kid = str(header.get("alg", "")), header.get("kid")
        signed, sig = f"{parts[0]}.{parts[1]}".encode(), _b64(parts[2])
        candidates = [k for kid_, k in await keyset.keys() if kid is None or kid_ in (None, kid)]
        if not candidates:
            raise InvalidToken("no key for this token")
        last: InvalidToken | None = None
        for key in candidates:
            try:
                _verify(key, alg, signed, sig)
                break
            except InvalidToken as e:
                last = e
        else:
            raise last or InvalidToken("bad signature")
        self._claims(prov, claims)
        return claims

    @staticmethod
    def _claims(prov: JwtProvider, claims: dict[str, Any]) -> None:
        now, skew = time.time(), prov.clock_skew
        if prov.issuer and claims.get("iss") != prov.issuer:
            raise InvalidToken("wrong issuer")
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if isinstance(exp, int | float) and exp + skew < now:
            raise InvalidToken("expired token")
        if isinstance(nbf, int | float) and nbf - skew > now:
            raise InvalidToken("token not yet valid")
        if prov.audiences:
            aud = claims.get("aud")
            auds = aud if isinstance(aud, list) else [aud]
            if not any(a in prov.audiences for a in auds):
                raise InvalidToken("wrong audience", 403)
