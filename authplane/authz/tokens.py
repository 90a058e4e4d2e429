"""JWT verification for the forward-auth endpoint (nginx and Traefik have no jwt_authn filter).

Envoy verifies tokens itself and sends the payload; this module gives the forward-auth endpoint
the same semantics from a policy's ``jwt`` section, with joserfc doing the JOSE work: token from
the configured header, cookie or query parameter; the algorithms Envoy accepts, each only with
a key of its type (so ``none`` and an RSA public key used as an HMAC secret never verify);
issuer, audiences (403 when wrong, as Envoy), and ``exp``/``nbf``/``iat`` as Envoy's
jwt_verify_lib reads them: a JSON number in [0, 2^64), compared with the clock skew. Remote JWKS
are fetched once for all waiting checks and refreshed in the background (``KeySet``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qs

import aiohttp
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import Key, import_key
from joserfc.jws import JWSRegistry

from authplane.policy.model import Jwks, Jwt, JwtProvider

log = logging.getLogger("authplane.authz")
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
              "EdDSA", "HS256", "HS384", "HS512")
"""What Envoy's jwt_authn accepts; each verifies only with a JWKS key of its own type."""
RETRY = 5.0
"""Seconds before a failed refresh is retried (cached keys keep serving meanwhile)."""
_REGISTRY = JWSRegistry(algorithms=ALGORITHMS, strict_check_header=False)
"""Envoy reads ``alg`` and ``kid`` and ignores other header fields; so does this."""
_MAX_DATE = 2.0**64
_STRING_CLAIMS = ("iss", "sub", "jti")
_DATE_CLAIMS = ("exp", "nbf", "iat")


class InvalidToken(Exception):
    """A token is missing or not acceptable; the reason is safe to return (never the token).
    ``status`` is what Envoy's jwt_authn answers: 401, or 403 for a wrong audience."""

    def __init__(self, reason: str, status: int = 401) -> None:
        super().__init__(reason)
        self.status = status


Keys = list[tuple[str | None, Key]]
"""A JWKS as (kid, key) pairs; a key without ``kid`` may verify any token, as in Envoy."""


def _import(data: Any) -> Keys:
    keys: Keys = []
    for jwk in data.get("keys", []) if isinstance(data, dict) else []:
        try:
            keys.append((jwk.get("kid"), import_key(jwk)))
        except (JoseError, AttributeError, KeyError, TypeError, ValueError):
            continue  # an unusable key: the others still count
    return keys


class KeySet:
    """The keys of one provider's JWKS (file and inline: fixed; uri: fetched and cached).

    A remote JWKS is fetched by one task at a time whatever the number of waiting checks. Once
    keys are known, checks never wait for a refresh: after ``cacheDuration`` a background
    refresh starts and the cached keys serve until it succeeds. Before the first success a
    check waits for the fetch in flight at most the JWKS ``timeout``."""

    def __init__(self, jwks: Jwks, file_text: str | None) -> None:
        self.spec = jwks
        self._keys: Keys = []
        self._loaded = jwks.uri is None
        self._expires = 0.0
        self._fetch: asyncio.Task[None] | None = None
        if jwks.inline is not None:
            self._keys = _import(jwks.inline)
        elif file_text is not None:
            self._keys = _import(json.loads(file_text))

    async def keys(self) -> Keys:
        if self.spec.uri is None or (self._loaded and time.monotonic() < self._expires):
            return self._keys
        if self._fetch is None or self._fetch.done():
            self._fetch = asyncio.ensure_future(self._refresh(self.spec.uri))
            _FETCHES.add(self._fetch)  # the loop holds tasks weakly; a reload drops this KeySet
            self._fetch.add_done_callback(_FETCHES.discard)
        if not self._loaded:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._fetch), self.spec.timeout)
            if not self._loaded:
                raise InvalidToken("JWKS unavailable")
        return self._keys

    async def _refresh(self, uri: str) -> None:
        timeout = aiohttp.ClientTimeout(total=self.spec.timeout)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(uri) as r:
                r.raise_for_status()
                keys = _import(await r.json(content_type=None))
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            log.warning("JWKS %s: fetch failed (%s)", uri, type(e).__name__)
            self._expires = time.monotonic() + min(self.spec.cache_duration, RETRY)
            return
        self._keys, self._loaded = keys, True
        self._expires = time.monotonic() + self.spec.cache_duration


_FETCHES: set[asyncio.Task[None]] = set()


async def cancel_fetches() -> None:
    """Stop the JWKS fetches of this event loop (at shutdown)."""
    loop = asyncio.get_running_loop()
    mine = [t for t in _FETCHES if t.get_loop() is loop]
    for task in mine:
        task.cancel()
    await asyncio.gather(*mine, return_exceptions=True)


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


def _audience(aud: str) -> str:
    """Envoy compares audiences without an ``http(s)://`` scheme or a trailing slash."""
    for scheme in ("https://", "http://"):
        aud = aud.removeprefix(scheme)
    return aud.removesuffix("/")


def check_claims(prov: JwtProvider, claims: dict[str, Any], now: float) -> None:
    """The claim checks of Envoy's jwt_authn (types first, then issuer, time, audiences)."""
    for name in _STRING_CLAIMS:
        if name in claims and not isinstance(claims[name], str):
            raise InvalidToken(f"claim {name!r} is not a string")
    dates: dict[str, int] = {}
    for name in _DATE_CLAIMS:
        if name in claims:
            value = claims[name]
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < _MAX_DATE:
                raise InvalidToken(f"claim {name!r} is not a valid time")
            dates[name] = int(value)
    aud = claims.get("aud", [])
    auds = [aud] if isinstance(aud, str) else aud
    if not isinstance(auds, list) or not all(isinstance(a, str) for a in auds):
        raise InvalidToken("claim 'aud' is not a string or a list of strings")
    if prov.issuer and claims.get("iss") != prov.issuer:
        raise InvalidToken("wrong issuer")
    skew = prov.clock_skew
    if dates.get("nbf", 0) > now + skew:
        raise InvalidToken("token not yet valid")
    if dates.get("exp", 0) and dates["exp"] < now - skew:
        raise InvalidToken("expired token")
    if prov.audiences and not {_audience(a) for a in auds} & {_audience(a) for a in prov.audiences}:
        raise InvalidToken("wrong audience", 403)


def _signed_claims(keys: Keys, token: str) -> dict[str, Any]:
    """The payload of ``token`` if one of ``keys`` verifies its signature."""
    try:
        obj = jws.extract_compact(token.encode(), registry=_REGISTRY)
        kid = obj.headers().get("kid")
    except (JoseError, ValueError, TypeError, AttributeError):
        raise InvalidToken("malformed token") from None
    candidates = [k for kid_, k in keys if kid is None or kid_ in (None, kid)]
    if not candidates:
        raise InvalidToken("no key for this token")
    for key in candidates:
        try:
            if jws.validate_compact(obj, key, registry=_REGISTRY):
                break
        except (JoseError, ValueError, TypeError):
            continue  # an algorithm this key cannot verify (or none allowed)
    else:
        raise InvalidToken("bad signature")
    try:
        claims = json.loads(obj.payload)
    except ValueError:
        raise InvalidToken("malformed token") from None
    if not isinstance(claims, dict):
        raise InvalidToken("malformed token")
    return claims


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
                claims = _signed_claims(await keyset.keys(), token)
                check_claims(prov, claims, time.time())
                return claims
            except InvalidToken as e:
                problem = e
        if present:
            raise problem or InvalidToken("invalid token")
        if self.required:
            raise InvalidToken("missing token")
        return None
