"""The decision service's own sign-in, the oauth2-proxy contract (``/oauth2/start``, ``/callback``,
``/sign_out``; ``/oauth2/auth`` is forward auth in ``http_api.py``), driven by a policy's ``oidc``.

Authorization-code flow with PKCE (S256), ``state`` and ``nonce`` kept in a short-lived encrypted
cookie; the ID token is verified with joserfc against the provider's JWKS (``tokens.py``) and
userinfo adds the claims beyond ``sub``. The session is a cookie encrypted and authenticated with
AES-GCM (the first key encrypts, any decrypts), split into ``<name>_0``, ``<name>_1`` ... when
it would not fit in one cookie. A cookie that does not decrypt is no session.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Mapping
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from authplane.authz.rules import CompiledPolicy, SignIn
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
_DROP = frozenset({"nonce", "at_hash", "c_hash"})
_LABEL = b"authplane session v1\0"


class SignInError(Exception):
    """The flow cannot go on; the message is safe to show (never a token or a secret)."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


def session_name(s: SignIn) -> str:
    return f"{s.cookie_prefix}_session"


def flow_name(s: SignIn) -> str:
    return f"{s.cookie_prefix}_csrf"


def _aead_keys(s: SignIn) -> list[AESGCM]:
    return [AESGCM(hashlib.sha256(_LABEL + k).digest()) for k in s.keys]


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


def session(pol: CompiledPolicy, headers: Mapping[str, str]) -> dict[str, Any] | None:
    """The claims of the request's session cookie for this policy, None without a valid one."""
    s = pol.signin
    if s is None:
        return None
    value = read_cookie(_jar(headers), session_name(s))
    data = unseal(s, session_name(s), value) if value else None
    claims = data.get("claims") if data else None
    return claims if isinstance(claims, dict) else None


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
    """The provider side of sign-in; one per process (JWKS cached per provider)."""

    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._keys: dict[str, KeySet] = {}

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
        query = urlencode({"response_type": "code", "client_id": s.client_id, "redirect_uri": redirect_uri,
                           "scope": " ".join(s.scopes), "state": state, "nonce": nonce,
                           "code_challenge": challenge, "code_challenge_method": "S256"})
        sep = "&" if "?" in s.authorization_endpoint else "?"
        cookies = set_cookies(s, flow_name(s), seal(s, flow_name(s), flow), jar, secure, FLOW_TTL, host_only=True)
        return f"{s.authorization_endpoint}{sep}{query}", cookies

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
        tokens = await self._post(s.token_endpoint, {
            "grant_type": "authorization_code", "code": query["code"], "redirect_uri": flow["redirect_uri"],
            "client_id": s.client_id, "client_secret": s.client_secret, "code_verifier": flow["verifier"]})
        claims = await self._verify(s, tokens.get("id_token"), str(flow["nonce"]))
        access = tokens.get("access_token")
        if s.userinfo_endpoint and isinstance(access, str):
            info = await self._get(s.userinfo_endpoint, access)
            if info.get("sub") == claims.get("sub"):
                claims.update({k: v for k, v in info.items() if k not in ("iss", "aud", "sub")})
        exp = claims.get("exp")
        expires = int(exp) if isinstance(exp, int | float) else int(time.time()) + DEFAULT_TTL
        sealed = seal(s, session_name(s), {"claims": claims, "exp": expires})
        max_age = max(1, expires - int(time.time()))
        cookies = set_cookies(s, session_name(s), sealed, jar, secure, max_age)
        cookies += clear_cookies(s, flow_name(s), jar, secure, host_only=True)
        return str(flow.get("rd") or "/"), cookies

    @staticmethod
    def sign_out(pol: CompiledPolicy, rd: str, jar: Mapping[str, str], secure: bool) -> tuple[str, list[str]]:
        s = pol.signin
        assert s is not None
        cookies = clear_cookies(s, session_name(s), jar, secure) + clear_cookies(s, flow_name(s), jar, secure,
                                                                                 host_only=True)
        if s.end_session_endpoint:
            params = {"client_id": s.client_id}
            if s.post_logout_redirect_uri:
                params["post_logout_redirect_uri"] = s.post_logout_redirect_uri
            sep = "&" if "?" in s.end_session_endpoint else "?"
            return f"{s.end_session_endpoint}{sep}{urlencode(params)}", cookies
        return rd or "/", cookies

    async def _verify(self, s: SignIn, token: Any, nonce: str) -> dict[str, Any]:
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
        if "exp" not in claims or not isinstance(claims.get("sub"), str):
            raise SignInError("ID token refused: no exp or sub", 403)
        if not secrets.compare_digest(str(claims.get("nonce", "")), nonce):
            raise SignInError("ID token refused: nonce mismatch", 403)
        return {k: v for k, v in claims.items() if k not in _DROP}

    async def _post(self, url: str, form: dict[str, str]) -> dict[str, Any]:
        return await self._json("POST", url, data=form)

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
            log.warning("OIDC %s %s: status %d", method, url, status)
            raise SignInError(f"the provider answered {status}", 502)
        return body


def absolute(base: str, rd: str) -> str:
    return urljoin(base + "/", rd)
