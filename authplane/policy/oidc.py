"""What an ``oidc`` section needs from outside the policy files: the provider's endpoints
(discovery) and the secrets. Resolved when policies are loaded, so compiling stays pure.

Discovery documents are cached per issuer for ``CACHE_TTL``; when the provider cannot be reached
the last good copy keeps serving (a reload must not take SSO down because the provider blinked).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from authplane.policy.model import Authorization, ExtAuth, Oidc, SecretRef

DISCOVERY_TIMEOUT = 5.0
CACHE_TTL = 600.0
_HMAC_LABEL = b"authplane oauth2 cookie hmac v1"


@dataclass(frozen=True)
class Endpoints:
    authorization: str
    token: str
    jwks: str
    end_session: str | None
    userinfo: str | None = None
    claims_parameter: bool | None = None
    """Discovery's ``claims_parameter_supported`` (``None``: endpoints given in the policy)."""


@dataclass(frozen=True)
class ResolvedOidc:
    """One policy's ``oidc`` section with its endpoints and secrets."""

    endpoints: Endpoints
    client_secret: bytes = field(repr=False)
    hmac_secret: bytes = field(repr=False)
    session_keys: tuple[bytes, ...] = field(default=(), repr=False)
    """``sessionKeys`` as read (empty: the decision service uses ``hmac_secret``)."""
    redis_password: bytes | None = field(default=None, repr=False)
    """``session.password`` as read."""


class OidcError(Exception):
    """Discovery or a secret failed; the message never contains a secret."""


_cache: dict[str, tuple[float, Endpoints]] = {}
_lock = threading.Lock()


def discovery_url(issuer: str) -> str:
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


MAX_DISCOVERY_BYTES = 1024 * 1024


def _read_bounded(url: str, timeout: float) -> bytes:
    """The body at ``url``, within ``timeout`` in all (a provider that trickles bytes cannot hold a
    reload) and at most ``MAX_DISCOVERY_BYTES``."""
    deadline = time.monotonic() + timeout
    body = b""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        while chunk := r.read1(65536):
            body += chunk
            if len(body) > MAX_DISCOVERY_BYTES:
                raise ValueError(f"larger than {MAX_DISCOVERY_BYTES} bytes")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not complete within {timeout:g}s")
    return body


def _fetch(issuer: str, timeout: float) -> Endpoints:
    url = discovery_url(issuer)
    try:
        doc = json.loads(_read_bounded(url, timeout))
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise OidcError(f"cannot fetch the discovery document {url}: {reason}") from None
    if not isinstance(doc, dict):
        raise OidcError(f"discovery document {url}: expected a JSON object")
    if doc.get("issuer", issuer).rstrip("/") != issuer.rstrip("/"):
        raise OidcError(f"discovery document {url} names issuer {doc.get('issuer')!r}, not {issuer!r}")
    missing = [k for k in ("authorization_endpoint", "token_endpoint", "jwks_uri")
               if not isinstance(doc.get(k), str) or not doc[k].startswith(("http://", "https://"))]
    if missing:
        raise OidcError(f"discovery document {url} has no usable {', '.join(missing)}")
    end, info = doc.get("end_session_endpoint"), doc.get("userinfo_endpoint")
    return Endpoints(doc["authorization_endpoint"], doc["token_endpoint"], doc["jwks_uri"],
                     end if isinstance(end, str) and end.startswith(("http://", "https://")) else None,
                     info if isinstance(info, str) and info.startswith(("http://", "https://")) else None,
                     doc.get("claims_parameter_supported") is True)


def discover(issuer: str, timeout: float = DISCOVERY_TIMEOUT) -> tuple[Endpoints, str | None]:
    """The issuer's endpoints and, when a stale cached copy had to be used, a warning."""
    now = time.monotonic()
    with _lock:
        cached = _cache.get(issuer)
    if cached and now - cached[0] < CACHE_TTL:
        return cached[1], None
    try:
        found = _fetch(issuer, timeout)
    except OidcError as e:
        if cached:
            return cached[1], f"{e}; using the copy fetched {round(now - cached[0])}s ago"
        raise
    with _lock:
        _cache[issuer] = (now, found)
    return found, None


def endpoints(spec: Oidc) -> tuple[Endpoints, str | None]:
    if not spec.discovery:
        assert spec.authorization_endpoint and spec.token_endpoint and spec.jwks_uri
        return Endpoints(spec.authorization_endpoint, spec.token_endpoint, spec.jwks_uri,
                         spec.end_session_endpoint, spec.userinfo_endpoint), None
    found, warning = discover(spec.issuer)
    if spec.end_session_endpoint or spec.userinfo_endpoint:
        found = Endpoints(found.authorization, found.token, found.jwks,
                          spec.end_session_endpoint or found.end_session,
                          spec.userinfo_endpoint or found.userinfo, found.claims_parameter)
    return found, warning


_IN_EVERY_ID_TOKEN = frozenset({"sub", "iss", "aud", "exp", "iat", "nonce", "auth_time", "azp", "at_hash", "acr",
                                 "amr", "sid"})


def id_token_claims(spec: Oidc, authorization: Authorization | ExtAuth | None) -> list[str]:
    """The claims to ask for in the ID token (the ``claims`` request parameter): ``idTokenClaims``,
    or by default the top-level claims the policy copies into headers and its authorization rules
    read (native rules for Envoy's oauth2 filter, ``extAuth`` rules for the decision service's
    sign-in), beyond those every ID token has; sorted."""
    if spec.id_token_claims is not None:
        return sorted(set(spec.id_token_claims))
    names = {c.split(".", 1)[0] for c in spec.claims_to_headers}
    rules = authorization.rules if authorization else []
    names |= {c.split(".", 1)[0] for r in rules for cond in r.when.nested() for c in cond.claims}
    return sorted(names - _IN_EVERY_ID_TOKEN)


def authorization_url(spec: Oidc | None, authorization: Authorization | ExtAuth | None, endpoint: str) -> str:
    """The provider's authorization endpoint, with the OpenID ``claims`` request parameter when
    the policy needs claims in the ID token (Envoy's oauth2 filter and the decision service's
    sign-in both keep the endpoint's query and add their own)."""
    claims = id_token_claims(spec, authorization) if spec else []
    if not claims:
        return endpoint
    value = json.dumps({"id_token": dict.fromkeys(claims)}, separators=(",", ":"))
    return f"{endpoint}{'&' if '?' in endpoint else '?'}claims={urllib.parse.quote(value, safe='')}"


_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,63}$")


def read_secret(ref: SecretRef, relative: Callable[[str], str],
                limit: int | None = None) -> tuple[bytes, str | None]:
    """(secret, path of the file it came from, if any); ``relative`` turns the policy's file name
    into a path (``Source.relative``)."""
    from authplane.policy.files import DEFAULT_MAX_FILE_SIZE, read_file

    if ref.env is not None:
        value = os.environ.get(ref.env, "").strip()
        if not value:  # a name that does not look like one may be the secret itself: not echoed
            name = ref.env if _ENV_NAME.match(ref.env) else "(name not shown: not an upper-case variable name)"
            raise OidcError(f"environment variable {name} is not set or empty")
        return value.encode(), None
    assert ref.file is not None
    path = relative(ref.file)
    try:
        value = read_file(path, limit or DEFAULT_MAX_FILE_SIZE).strip()
    except OSError as e:
        raise OidcError(f"cannot read {ref.file!r}: {e.strerror}") from None
    if not value:
        raise OidcError(f"{ref.file!r} is empty")
    return value, path


def derive_hmac_secret(client_secret: bytes, spec: Oidc) -> bytes:
    """HMAC-SHA256 of the issuer and client ID under the client secret: the same 32 bytes on
    every Envoy and after every restart, never revealing the client secret."""
    message = b"\0".join([_HMAC_LABEL, spec.issuer.encode(), spec.client_id.encode()])
    return hmac.new(client_secret, message, hashlib.sha256).digest()
