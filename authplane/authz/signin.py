"""The decision service's own sign-in, the oauth2-proxy contract (``/oauth2/start``, ``/callback``,
``/sign_out``; ``/oauth2/auth`` is forward auth in ``http_api.py``), driven by a policy's ``oidc``.

Authorization-code flow with PKCE (S256), ``state`` and ``nonce`` kept in a short-lived encrypted
cookie; the ID token is verified with joserfc against the provider's JWKS (``tokens.py``) and
userinfo adds the claims beyond ``sub``. The session is a cookie encrypted and authenticated with
AES-GCM (the first key encrypts, any decrypts), split into ``<name>_0``, ``<name>_1`` ... when
it would not fit in one cookie. A cookie that does not decrypt is no session. With
``session.store: redis`` the cookie carries only a ticket and the session lives in Redis
(``sessions.py``).

A refresh token, when the provider issues one, is kept in the (encrypted) session: past the
token's expiry (or ``session.refreshInterval``) the next check renews the tokens silently and
reads the claims again; a provider refusing the refresh (``invalid_grant``) ends the session.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import quote_plus, urlencode, urljoin, urlsplit

import aiohttp
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from authplane.authz.rules import CompiledPolicy, SignIn
from authplane.authz.sessions import RedisSessions, StoreUnavailable, Ticket
from authplane.authz.tokens import InvalidToken, KeySet, _signed_claims, check_claims
from authplane.policy.model import Jwks, JwtProvider

log = logging.getLogger("authplane.authz")
CHUNK = 3800
"""Bytes of cookie value per chunk: a cookie with its name and attributes stays under 4 KB."""
MAX_CHUNKS = 16
FLOW_TTL = 600
"""Seconds a sign-in may take between ``/oauth2/start`` and the callback."""
DEFAULT_TTL = 3600
"""Session lifetime when the ID token has no ``exp``."""
RENEW_LOCK = 30.0
"""Seconds one process holds a Redis session's renewal lock (others use the current claims)."""
_DROP = frozenset({"nonce", "at_hash", "c_hash"})
_LABEL = b"authplane session v1\0"


class SignInError(Exception):
    """The flow cannot go on; the message is safe to show (never a token or a secret)."""

    def __init__(self, reason: str, status: int = 400, error: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.error = error
        """The provider's OAuth ``error`` code, when it answered one (``invalid_grant`` ...)."""


@contextmanager
def _store_errors(s: SignIn) -> Iterator[None]:
    try:
        yield
    except StoreUnavailable:
        raise SignInError("the session store cannot be reached", s.unavailable_status) from None


def session_name(s: SignIn) -> str:
    return f"{s.cookie_prefix}_session"


def flow_name(s: SignIn) -> str:
    return f"{s.cookie_prefix}_csrf"


def _aead_keys(s: SignIn) -> tuple[AESGCM, ...]:
    return _derive(s.keys)


@functools.lru_cache(maxsize=64)
def _derive(keys: tuple[bytes, ...]) -> tuple[AESGCM, ...]:
    """The AES-GCM keys of ``sessionKeys``, derived once per key set (not per check)."""
    return tuple(AESGCM(hashlib.sha256(_LABEL + k).digest()) for k in keys)


def _aad(s: SignIn, name: str) -> bytes:
    """Binds a cookie to its name and the client: another client's session never decrypts."""
    return f"{name}\0{s.issuer}\0{s.client_id}".encode()


def seal(s: SignIn, name: str, data: dict[str, Any]) -> str:
    nonce = os.urandom(12)
    sealed = _aead_keys(s)[0].encrypt(nonce, json.dumps(data, separators=(",", ":")).encode(), _aad(s, name))
    return base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode()


def unseal(s: SignIn, name: str, value: str) -> dict[str, Any] | None:
    """The payload if a key authenticates it and it has not expired, else None."""
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except ValueError:
        return None
    if len(raw) < 29:
        return None
    for key in _aead_keys(s):
        try:
            data = json.loads(key.decrypt(raw[:12], raw[12:], _aad(s, name)))
        except (InvalidTag, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("exp"), int | float) and data["exp"] > time.time():
            return data
        return None
    return None


def _jar(headers: Mapping[str, str]) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(headers.get("cookie", ""))
    except CookieError:
        return {}
    return {k: m.value for k, m in jar.items()}


def read_cookie(jar: Mapping[str, str], name: str) -> str | None:
    """One cookie, or the concatenation of its numbered chunks."""
    if name in jar:
        return jar[name]
    parts = []
    for i in range(MAX_CHUNKS):
        if f"{name}_{i}" not in jar:
            break
        parts.append(jar[f"{name}_{i}"])
    return "".join(parts) or None


def _attributes(s: SignIn, secure: bool, max_age: int, host_only: bool = False) -> str:
    attrs = [f"Path=/; Max-Age={max_age}; HttpOnly"]
    if s.cookie_domain and not host_only:
        attrs.append(f"Domain={s.cookie_domain}")
    if s.same_site != "disabled":
        attrs.append(f"SameSite={s.same_site.capitalize()}")
    if secure:
        attrs.append("Secure")
    return "; ".join(attrs)


def set_cookies(s: SignIn, name: str, value: str, jar: Mapping[str, str], secure: bool, max_age: int,
                host_only: bool = False) -> list[str]:
    """``Set-Cookie`` values writing ``value`` (chunked when long) and expiring stale chunks."""
    attrs = _attributes(s, secure, max_age, host_only)
    if len(value) <= CHUNK:
        written = {name: value}
    else:
        written = {f"{name}_{i}": value[o:o + CHUNK] for i, o in enumerate(range(0, len(value), CHUNK))}
        if len(written) > MAX_CHUNKS:
            raise SignInError("the session is too large for cookies", 500)
    out = [f"{k}={v}; {attrs}" for k, v in written.items()]
    return out + clear_cookies(s, name, jar, secure, host_only, keep=set(written))


def clear_cookies(s: SignIn, name: str, jar: Mapping[str, str], secure: bool, host_only: bool = False,
                  keep: set[str] | None = None) -> list[str]:
    attrs = _attributes(s, secure, 0, host_only)
    stale = [k for k in jar if (k == name or (k.startswith(name + "_") and k[len(name) + 1:].isdigit()))
             and k not in (keep or set())]
    return [f"{k}=; {attrs}" for k in stale]


def safe_redirect(s: SignIn, rd: str, host: str) -> str | None:
    """``rd`` when it points under the cookie domain (or to ``host`` without one); None for any
    other target (no open redirect). A path is taken relative to ``host``."""
    if not rd or rd.startswith(("//", "/\\")) or "\\" in rd or any(c < " " for c in rd):
        return None
    if rd.startswith("/"):
        return rd
    try:
        url = urlsplit(rd)
        target = (url.hostname or "").lower()
    except ValueError:
        return None
    if url.scheme not in ("http", "https") or not target:
        return None
    bare = host.rpartition(":")[0] if host.count(":") == 1 else host
    if s.cookie_domain:
        ok = target == s.cookie_domain or target.endswith("." + s.cookie_domain)
    else:
        ok = target == bare.lower()
    return rd if ok else None


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


class SignInFlow:
    """The provider side of sign-in and the sessions; one per process and event loop (JWKS and
    Redis connections cached)."""

    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._keys: dict[str, KeySet] = {}
        self._stores: dict[tuple[str, str | None], RedisSessions] = {}
        self._renewing: dict[str, asyncio.Future[dict[str, Any] | None]] = {}

    async def close(self) -> None:
        for store in self._stores.values():
            await store.close()
        self._stores.clear()

    def _store(self, s: SignIn) -> RedisSessions:
        assert s.redis_url is not None
        key = (s.redis_url, s.redis_password)
        store = self._stores.get(key)
        if store is None:
            store = self._stores[key] = RedisSessions(s.redis_url, s.redis_password)
        return store

    def start(self, pol: CompiledPolicy, base: str, rd: str, jar: Mapping[str, str],
              secure: bool) -> tuple[str, list[str]]:
        """(provider URL, Set-Cookie values) for a sign-in returning to ``rd``; ``base``:
        ``scheme://host`` of this endpoint (the callback comes back there)."""
        s = pol.signin
        assert s is not None
        verifier, challenge = _pkce()
        state, nonce = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        redirect_uri = base + s.redirect_path
        flow = {"state": state, "nonce": nonce, "verifier": verifier, "rd": rd, "policy": pol.name,
                "redirect_uri": redirect_uri, "exp": int(time.time()) + FLOW_TTL}
        params = {"response_type": "code", "client_id": s.client_id, "redirect_uri": redirect_uri,
                  "scope": " ".join(s.scopes), "state": state, "nonce": nonce,
                  "code_challenge": challenge, "code_challenge_method": "S256"}
        if "offline_access" in s.scopes:  # OpenID Connect Core 11: offline access needs consent
            params["prompt"] = "consent"
        sep = "&" if "?" in s.authorization_endpoint else "?"
        cookies = set_cookies(s, flow_name(s), seal(s, flow_name(s), flow), jar, secure, FLOW_TTL, host_only=True)
        return f"{s.authorization_endpoint}{sep}{urlencode(params)}", cookies

    @staticmethod
    def pending(pol: CompiledPolicy, jar: Mapping[str, str]) -> dict[str, Any] | None:
        s = pol.signin
        assert s is not None
        value = read_cookie(jar, flow_name(s))
        return unseal(s, flow_name(s), value) if value else None

    async def callback(self, pol: CompiledPolicy, flow: dict[str, Any], query: Mapping[str, str],
                       jar: Mapping[str, str], secure: bool) -> tuple[str, list[str]]:
        """(where to go now, Set-Cookie values) after the provider redirected back."""
        s = pol.signin
        assert s is not None
        if "error" in query:
            raise SignInError("the provider refused the sign-in", 403)
        if not secrets.compare_digest(query.get("state", ""), str(flow.get("state", ""))) or "code" not in query:
            raise SignInError("sign-in state mismatch (start again)")
        tokens = await self._token(s, {"grant_type": "authorization_code", "code": query["code"],
                                       "redirect_uri": flow["redirect_uri"], "code_verifier": flow["verifier"]})
        claims, id_exp = await self._identity(s, tokens, str(flow["nonce"]), None)
        data = _session_data(s, claims, id_exp, tokens, None)
        with _store_errors(s):
            old = self._ticket(s, jar)
            cookies = await self._save(s, data, jar, secure, None)
            if old is not None:  # a new sign-in over an old session: the old one ends
                await self._store(s).delete(old)
        cookies += clear_cookies(s, flow_name(s), jar, secure, host_only=True)
        return str(flow.get("rd") or "/"), cookies

    async def session(self, pol: CompiledPolicy, headers: Mapping[str, str],
                      secure: bool) -> tuple[dict[str, Any] | None, list[str]]:
        """The claims of the request's session for this policy (None without a valid one) and
        the Set-Cookie values to answer with (a renewed cookie session, or clearing an ended
        one). Raises ``SignInError`` with ``session.unavailableStatus`` when Redis is down."""
        s = pol.signin
        if s is None:
            return None, []
        jar = _jar(headers)
        with _store_errors(s):
            data, ticket = await self._load(s, jar)
            if data is None:
                return None, []
            renew = data.get("renew")
            if isinstance(data.get("refresh"), str) and isinstance(renew, int | float) and renew <= time.time():
                return await self._renewed(s, data, ticket, jar, secure)
        claims = data.get("claims")
        return (claims if isinstance(claims, dict) else None), []

    async def sign_out(self, pol: CompiledPolicy, rd: str, jar: Mapping[str, str],
                       secure: bool) -> tuple[str, list[str]]:
        s = pol.signin
        assert s is not None
        with _store_errors(s):
            ticket = self._ticket(s, jar)
            if ticket is not None:  # gone for every app and every process at once
                await self._store(s).delete(ticket)
        cookies = clear_cookies(s, session_name(s), jar, secure) + clear_cookies(s, flow_name(s), jar, secure,
                                                                                 host_only=True)
        if s.end_session_endpoint:
            params = {"client_id": s.client_id}
            if s.post_logout_redirect_uri:
                params["post_logout_redirect_uri"] = s.post_logout_redirect_uri
            sep = "&" if "?" in s.end_session_endpoint else "?"
            return f"{s.end_session_endpoint}{sep}{urlencode(params)}", cookies
        return rd or "/", cookies

    # --- the session store -----------------------------------------------------------------------

    @staticmethod
    def _ticket(s: SignIn, jar: Mapping[str, str]) -> Ticket | None:
        """The Redis ticket the session cookie carries (``store: redis``), if it decrypts."""
        if s.store != "redis":
            return None
        value = read_cookie(jar, session_name(s))
        sealed = unseal(s, session_name(s), value) if value else None
        return Ticket.from_cookie(sealed) if sealed else None

    async def _load(self, s: SignIn, jar: Mapping[str, str]) -> tuple[dict[str, Any] | None, Ticket | None]:
        if s.store != "redis":
            value = read_cookie(jar, session_name(s))
            return (unseal(s, session_name(s), value) if value else None), None
        ticket = self._ticket(s, jar)
        data = await self._store(s).load(ticket) if ticket else None
        live = data is not None and isinstance(data.get("exp"), int | float) and data["exp"] > time.time()
        return (data if live else None), ticket

    async def _save(self, s: SignIn, data: dict[str, Any], jar: Mapping[str, str], secure: bool,
                    ticket: Ticket | None) -> list[str]:
        """Set-Cookie values for the session ``data`` (stored in Redis under ``ticket``, or a new
        one, with ``store: redis``)."""
        max_age = max(1, int(data["exp"] - time.time()))
        if s.store == "redis":
            ticket = ticket or Ticket.new()
            await self._store(s).save(ticket, data, max_age)
            value = seal(s, session_name(s), {**ticket.to_cookie(), "exp": data["exp"]})
        else:
            value = seal(s, session_name(s), data)
        return set_cookies(s, session_name(s), value, jar, secure, max_age)

    async def _renewed(self, s: SignIn, data: dict[str, Any], ticket: Ticket | None, jar: Mapping[str, str],
                       secure: bool) -> tuple[dict[str, Any] | None, list[str]]:
        """Renew with the refresh token (one renewal at a time per session in this process)."""
        key = hashlib.sha256(str(data["refresh"]).encode()).hexdigest()
        pending = self._renewing.get(key)
        if pending is None:
            pending = self._renewing[key] = asyncio.ensure_future(self._renew(s, data, ticket))
            pending.add_done_callback(lambda _: self._renewing.pop(key, None))
        try:
            new = await asyncio.shield(pending)
        except SignInError as e:  # the provider failed (Redis errors go on up)
            log.warning("session renewal failed (%s): no session for this request", e)
            return None, []
        if new is None:
            return None, clear_cookies(s, session_name(s), jar, secure)
        claims = new.get("claims")
        cookies = [] if s.store == "redis" else set_cookies(s, session_name(s), seal(s, session_name(s), new),
                                                            jar, secure, max(1, int(new["exp"] - time.time())))
        return (claims if isinstance(claims, dict) else None), cookies

    async def _renew(self, s: SignIn, data: dict[str, Any], ticket: Ticket | None) -> dict[str, Any] | None:
        """The renewed session data; None when the provider refused the refresh token (the
        session is over, and deleted from Redis)."""
        if ticket is None:
            return await self._refresh(s, data)
        store = self._store(s)
        if not await store.lock(ticket, RENEW_LOCK):
            return data  # another process renews it right now: the current claims serve
        try:
            current = await store.load(ticket)
            if current is None or current.get("refresh") != data.get("refresh") \
                    or current.get("renew", 0) > time.time():
                return current  # renewed (or ended) since this process read it
            new = await self._refresh(s, data)
            if new is None:
                await store.delete(ticket)
            else:
                await store.save(ticket, new, max(1, int(new["exp"] - time.time())))
            return new
        finally:
            await store.unlock(ticket)

    async def _refresh(self, s: SignIn, data: dict[str, Any]) -> dict[str, Any] | None:
        try:
            tokens = await self._token(s, {"grant_type": "refresh_token", "refresh_token": str(data["refresh"])})
        except SignInError as e:  # an OAuth error answer is a refusal; unreachable or 5xx is not
            if e.error is not None and e.error not in ("server_error", "temporarily_unavailable"):
                log.info("the provider refused the refresh token (%s): session ended", e.error)
                return None
            raise
        previous = data.get("claims") if isinstance(data.get("claims"), dict) else {}
        try:
            claims, id_exp = await self._identity(s, tokens, None, previous)
        except SignInError as e:
            if e.status == 403:  # a refreshed ID token that does not verify (another subject ...)
                log.warning("refreshed ID token refused (%s): session ended", e)
                return None
            raise
        return _session_data(s, claims, id_exp, tokens, data)

    # --- the provider ----------------------------------------------------------------------------

    async def _identity(self, s: SignIn, tokens: dict[str, Any], nonce: str | None,
                        previous: dict[str, Any] | None) -> tuple[dict[str, Any], float | None]:
        """(claims, the ID token's ``exp``) from a token response: its ID token (a refresh may
        return none: the previous claims stay) and userinfo."""
        id_exp: float | None = None
        if previous is not None and not isinstance(tokens.get("id_token"), str):
            claims = dict(previous)
        else:
            claims = await self._verify(s, tokens.get("id_token"), nonce)
            id_exp = float(claims["exp"])
            if previous is not None and claims.get("sub") != previous.get("sub"):
                raise SignInError("ID token refused: the refreshed token is for another subject", 403)
        access = tokens.get("access_token")
        if s.userinfo_endpoint and isinstance(access, str):
            info = await self._get(s.userinfo_endpoint, access)
            if info.get("sub") == claims.get("sub"):
                claims.update({k: v for k, v in info.items() if k not in ("iss", "aud", "sub", "exp")})
        return claims, id_exp

    async def _verify(self, s: SignIn, token: Any, nonce: str | None) -> dict[str, Any]:
        """The verified claims; ``nonce`` None: a refreshed ID token (OpenID Connect Core 12.2:
        no nonce check)."""
        if not isinstance(token, str):
            raise SignInError("the provider returned no ID token", 502)
        keyset = self._keys.get(s.jwks_uri)
        if keyset is None:
            keyset = self._keys[s.jwks_uri] = KeySet(Jwks(uri=s.jwks_uri), None)
        prov = JwtProvider(name="oidc", issuer=s.issuer, audiences=[s.client_id], jwks=Jwks(uri=s.jwks_uri))
        try:
            claims = _signed_claims(await keyset.keys(), token)
            check_claims(prov, claims, time.time())
        except InvalidToken as e:
            raise SignInError(f"ID token refused: {e}", 403) from None
        if not isinstance(claims.get("exp"), int | float) or not isinstance(claims.get("sub"), str):
            raise SignInError("ID token refused: no exp or sub", 403)
        if nonce is not None and not secrets.compare_digest(str(claims.get("nonce", "")), nonce):
            raise SignInError("ID token refused: nonce mismatch", 403)
        return {k: v for k, v in claims.items() if k not in _DROP}

    async def _token(self, s: SignIn, form: dict[str, str]) -> dict[str, Any]:
        """A token endpoint request, the client authenticated as ``tokenEndpointAuth`` says."""
        if s.token_auth == "client_secret_basic":  # RFC 6749 2.3.1: each part form-encoded first
            basic = base64.b64encode(f"{quote_plus(s.client_id)}:{quote_plus(s.client_secret)}".encode()).decode()
            return await self._json("POST", s.token_endpoint, data=form, headers={"authorization": f"Basic {basic}"})
        return await self._json("POST", s.token_endpoint,
                                data={**form, "client_id": s.client_id, "client_secret": s.client_secret})

    async def _get(self, url: str, token: str) -> dict[str, Any]:
        return await self._json("GET", url, headers={"authorization": f"Bearer {token}"})

    async def _json(self, method: str, url: str, **kw: Any) -> dict[str, Any]:
        try:
            async with aiohttp.ClientSession(timeout=self.timeout) as client, \
                    client.request(method, url, headers={"accept": "application/json", **kw.pop("headers", {})},
                                   **kw) as r:
                body = await r.json(content_type=None)
                status = r.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            log.warning("OIDC %s %s failed (%s)", method, url, type(e).__name__)
            raise SignInError("the provider cannot be reached", 502) from None
        if status != 200 or not isinstance(body, dict):
            error = body.get("error") if isinstance(body, dict) and isinstance(body.get("error"), str) else None
            log.warning("OIDC %s %s: status %d%s", method, url, status, f" ({error})" if error else "")
            raise SignInError(f"the provider answered {status}", 502, error)
        return body


def _session_data(s: SignIn, claims: dict[str, Any], id_exp: float | None, tokens: dict[str, Any],
                  previous: dict[str, Any] | None) -> dict[str, Any]:
    """What a session stores. Without a refresh token it ends with the ID token; with one it
    lasts ``session.lifetime`` from sign-in and is renewed once the tokens expire (or after
    ``session.refreshInterval``)."""
    now = time.time()
    refresh = tokens.get("refresh_token") or (previous or {}).get("refresh")
    expires_in = tokens.get("expires_in")
    expiries = [e for e in (id_exp, now + expires_in if isinstance(expires_in, int | float) else None) if e]
    if not isinstance(refresh, str):
        exp = claims.get("exp")
        return {"claims": claims, "exp": int(exp) if isinstance(exp, int | float) else int(now) + DEFAULT_TTL}
    token_exp = min(expiries) if expiries else now + DEFAULT_TTL
    renew = min(token_exp, now + s.refresh_interval) if s.refresh_interval else token_exp
    if id_exp is None:  # claims kept from before: a cached decision lasts until the next renewal
        claims["exp"] = int(renew)
    exp = previous["exp"] if previous else int(now + s.lifetime)
    return {"claims": claims, "exp": exp, "refresh": refresh, "renew": renew}


def absolute(base: str, rd: str) -> str:
    return urljoin(base + "/", rd)
