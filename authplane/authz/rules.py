"""Policies → an immutable table of compiled builtin rules, swapped whole on every reload.

Pure and cheap to share: plain frozen dataclasses, frozensets and ``ipaddress`` networks (the
table is pickled to worker processes). Nothing here opens sockets.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from authplane.authz.routing import RouteLookup, route_lookup
from authplane.contract import MODE_SHADOW
from authplane.policy.credentials import parse_api_keys
from authplane.policy.documents import Located, PolicySet, Resolved
from authplane.policy.model import ApiKeys, AuthPolicy, ExtAuth, ExtAuthConditions, Jwt, Oidc
from authplane.policy.oidc import authorization_url
from authplane.policy.types import StringMatch

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trim_slash(path: str) -> str:
    return path[:-1] if len(path) > 1 and path.endswith("/") else path


@dataclass(frozen=True, slots=True)
class Values:
    """Compiled values of one header or claim: any of them matches. Regexes are kept as text
    (compiled once per process by the evaluator: the table is pickled to workers)."""

    exact: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    regexes: tuple[str, ...] = ()
    present: bool = False

    @classmethod
    def build(cls, values: list[StringMatch]) -> Values:
        return cls(
            exact=frozenset(v.exact for v in values if v.exact is not None),
            prefixes=tuple(v.prefix for v in values if v.prefix is not None),
            regexes=tuple(v.regex for v in values if v.regex is not None),
            present=any(v.present for v in values))


@dataclass(frozen=True, slots=True)
class Matcher:
    """Compiled ``ExtAuthConditions``: all given kinds must match, any value within a kind, every
    scope, and ``negate`` (the ``not`` conditions) must not match."""

    claims: tuple[tuple[tuple[str, ...], Values], ...] = ()
    headers: tuple[tuple[str, Values], ...] = ()
    networks: tuple[Network, ...] = ()
    methods: frozenset[str] = frozenset()
    paths: frozenset[str] = frozenset()
    """Exact paths without a trailing slash: ``/x`` (or ``/x/``) matches ``/x`` and ``/x/``, and
    ``/x/*`` adds ``/x`` here and ``/x/`` to ``prefixes``."""
    prefixes: tuple[str, ...] = ()
    path_regexes: tuple[str, ...] = ()
    """Matched against the whole path as received (``(?i)``-prefixed when ignoring case)."""
    scopes: tuple[str, ...] = ()
    api_clients: frozenset[str] | None = None
    authenticated: bool | None = None
    ignore_case: bool = False
    """The gateway's ``pathMatching.caseSensitive: false``: paths are kept lowercase."""
    negate: Matcher | None = None

    @property
    def checks_path(self) -> bool:
        return bool(self.paths or self.prefixes or self.path_regexes)

    @classmethod
    def build(cls, when: ExtAuthConditions, ignore_case: bool = False) -> Matcher:
        plain = [p.path for p in when.paths if p.path is not None]
        paths = [p.lower() if ignore_case else p for p in plain]
        return cls(
            claims=tuple((tuple(k.split(".")), Values.build(v)) for k, v in sorted(when.claims.items())),
            headers=tuple((k, Values.build(v)) for k, v in sorted(when.headers.items())),
            networks=tuple(ipaddress.ip_network(c) for c in when.source_cidrs),
            methods=frozenset(when.methods),
            paths=frozenset(trim_slash(p.removesuffix("*")) for p in paths),
            prefixes=tuple(p[:-1] for p in paths if p.endswith("/*")),
            path_regexes=tuple(("(?i)" if ignore_case else "") + p.regex for p in when.paths if p.regex),
            scopes=tuple(sorted(set(when.scopes))),
            api_clients=frozenset(when.api_keys) if when.api_keys else None,
            authenticated=when.authenticated, ignore_case=ignore_case,
            negate=cls.build(when.not_, ignore_case) if when.not_ is not None else None,
        )


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    allow: bool
    match: Matcher
    upstream: tuple[tuple[str, str], ...]
    remove: tuple[str, ...]
    response: tuple[tuple[str, str], ...]
    status: int
    body: str
    headers: tuple[tuple[str, str], ...]
    sign_in: str | None
    shadow: bool = False
    """``mode: shadow``: skipped by enforcement, part of the shadow evaluation (``evaluate.decide``)."""


@dataclass(frozen=True)
class KeyTable:
    """API keys as SHA-256 digests, bucketed by their first 8 bytes: a lookup costs one hash and
    one ``hmac.compare_digest`` of whole digests, whatever the number of keys; the bucket lookup
    only reveals facts about the digest of a guess, never about a key. No key is held in the clear
    (keys written ``sha256:<hex>`` are already hashed)."""

    header: str
    prefix: str
    client_header: str | None
    forward: bool
    buckets: dict[bytes, tuple[tuple[bytes, str], ...]] = field(repr=False)

    @classmethod
    def build(cls, spec: ApiKeys, text: str) -> KeyTable:
        clients: dict[bytes, str] = {}
        for name, key in parse_api_keys(text).items():
            hashed = key.startswith("sha256:")  # parse_api_keys checked the 64 hex digits
            clients[bytes.fromhex(key[7:]) if hashed else hashlib.sha256(key.encode()).digest()] = name
        buckets: dict[bytes, tuple[tuple[bytes, str], ...]] = {}
        for digest, name in clients.items():
            buckets[digest[:8]] = (*buckets.get(digest[:8], ()), (digest, name))
        return cls(spec.header, spec.prefix, spec.client_header, spec.forward, buckets)


@dataclass(frozen=True)
class SignIn:
    """A policy's ``oidc`` section as the decision service's own sign-in (``/oauth2/*``) runs it:
    endpoints from discovery, the client secret and the session keys (the first encrypts)."""

    issuer: str
    client_id: str
    client_secret: str = field(repr=False)
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    end_session_endpoint: str | None
    userinfo_endpoint: str | None
    scopes: tuple[str, ...]
    redirect_path: str
    cookie_prefix: str
    cookie_domain: str | None
    """Without the leading dot; None: host-only cookies, ``rd`` only to the sign-in host."""
    same_site: str
    post_logout_redirect_uri: str | None
    keys: tuple[bytes, ...] = field(repr=False)
    token_auth: str = "client_secret_post"
    store: str = "cookie"
    """``cookie`` or ``redis`` (``session.store``)."""
    redis_url: str | None = None
    redis_password: str | None = field(default=None, repr=False)
    unavailable_status: int = 503
    lifetime: float = 604800.0
    refresh_interval: float | None = None


@dataclass(frozen=True)
class CompiledPolicy:
    name: str
    rules: tuple[Rule, ...]
    keys: KeyTable | None
    identity_headers: bool
    allow_ttl: float
    deny_ttl: float
    key_headers: tuple[str, ...]
    """Headers that go into the cache key: the ones rules read, plus credentials."""
    uses_source: bool
    uses_url: bool
    """A sign-in redirect carries the full original URL, or a token may come in a query parameter
    (forward auth), so the cache key includes the query."""
    jwt: Jwt | None
    jwks_files: dict[str, str]
    """provider name → JWKS file content (forward-auth verifies tokens itself)."""
    strip: tuple[str, ...] = ()
    """Removed from the client's request on every allow (unless the decision sets them): every
    header any rule, the identity headers or the API key client header can set, and the API key
    header unless forwarded. Independent of the request, so a cached decision strips them too."""
    shadow: bool = False
    """``mode: shadow``: a denial is answered as an allow that reports the would-deny."""
    signin: SignIn | None = None
    """``oidc``: forward auth reads the decision service's own session cookie for the claims."""
    shadow_rules: bool = False
    """Some rule is ``mode: shadow``: ``decide`` evaluates the rules twice (with and without them)."""


@dataclass(frozen=True)
class RuleTable:
    """Every builtin policy, compiled; ``version`` identifies it in cache keys and logs."""

    version: str
    policies: dict[str, CompiledPolicy]
    routes: RouteLookup = field(default_factory=RouteLookup)
    """Host and path → policy, for forward auth that names none (Envoy's route table)."""

    @classmethod
    def empty(cls) -> RuleTable:
        return cls("", {})


def _rule(r: Any, ignore_case: bool) -> Rule:
    return Rule(
        name=r.name, allow=r.action == "allow", match=Matcher.build(r.when, ignore_case),
        upstream=tuple(sorted(r.upstream_headers.items())), remove=tuple(r.remove_headers),
        response=tuple(sorted(r.response_headers.items())), status=r.deny.status, body=r.deny.body,
        headers=tuple(sorted(r.deny.headers.items())), sign_in=r.deny.sign_in,
        shadow=r.mode == MODE_SHADOW)


def compile_policy(item: Located[AuthPolicy], resolved: Resolved, ignore_case: bool = False) -> CompiledPolicy:
    """One policy's builtin rules, from what the resolve stage read (no file is opened here);
    ``ignore_case``: the target's gateway matches paths ignoring case."""
    ext = item.resource.spec.ext_auth
    assert ext is not None and ext.rules is not None
    keys = (KeyTable.build(ext.api_keys, resolved.ext_keys)
            if ext.api_keys and resolved.ext_keys is not None else None)
    jwt = item.resource.spec.jwt
    sources = [src for prov in jwt.providers for src in prov.from_ or []] if jwt else []
    credentials = ["authorization", "cookie"] + ([keys.header] if keys else [])
    credentials += [src.header for src in sources if src.header]  # forward auth reads tokens there
    key_headers = tuple(sorted(set(credentials) | set(ext.read_headers())))
    strip = ext.upstream_headers() + ([keys.header] if keys and not keys.forward else [])
    return CompiledPolicy(
        name=item.name, rules=tuple(_rule(r, ignore_case) for r in ext.rules), keys=keys,
        identity_headers=ext.identity_headers, allow_ttl=ext.cache.allow_ttl,
        deny_ttl=ext.cache.deny_ttl, key_headers=key_headers,
        uses_source=any(c.source_cidrs for r in ext.rules for c in r.when.nested()),
        uses_url=any(r.deny.sign_in for r in ext.rules) or any(src.query for src in sources),
        jwt=jwt, jwks_files=dict(resolved.jwks),
        strip=tuple(h.lower() for h in strip), shadow=item.resource.spec.mode == MODE_SHADOW,
        signin=_signin(item.resource.spec.oidc, ext, resolved),
        shadow_rules=any(r.mode == MODE_SHADOW for r in ext.rules))


def _signin(spec: Oidc | None, ext: ExtAuth, resolved: Resolved) -> SignIn | None:
    found = resolved.oidc
    if spec is None or found is None:
        return None
    e = found.endpoints
    domain = spec.cookie.domain.lstrip(".").lower() if spec.cookie.domain else None
    return SignIn(
        issuer=spec.issuer, client_id=spec.client_id, client_secret=found.client_secret.decode(),
        authorization_endpoint=authorization_url(spec, ext, e.authorization), token_endpoint=e.token,
        jwks_uri=e.jwks, end_session_endpoint=e.end_session, userinfo_endpoint=e.userinfo,
        scopes=tuple(dict.fromkeys(["openid", *spec.scopes])), redirect_path=spec.redirect_path,
        cookie_prefix=spec.cookie.prefix, cookie_domain=domain, same_site=spec.cookie.same_site,
        post_logout_redirect_uri=spec.post_logout_redirect_uri,
        keys=found.session_keys or (found.hmac_secret,), token_auth=spec.token_endpoint_auth,
        store=spec.session.store, redis_url=spec.session.url,
        redis_password=found.redis_password.decode() if found.redis_password else None,
        unavailable_status=spec.session.unavailable_status, lifetime=spec.session.lifetime,
        refresh_interval=spec.session.refresh_interval)


def _case_sensitive(policies: PolicySet, item: Located[AuthPolicy]) -> bool:
    """The ``pathMatching.caseSensitive`` of the gateway the policy's target belongs to."""
    ref = item.resource.spec.target_ref
    name = ref.name
    if ref.kind == "Route":
        route = policies.routes.get(ref.name)
        name = route.resource.spec.gateway if route else ""
    gateway = policies.gateways.get(name)
    return gateway is None or gateway.resource.spec.path_matching.case_sensitive


def compile_table(policies: PolicySet, version: str) -> RuleTable:
    """Every ``service: builtin`` policy. The table version also covers the files the rules read
    (API key files are not part of the Envoy snapshot), so a key change invalidates the cache."""
    compiled: dict[str, CompiledPolicy] = {}
    for name, item in policies.auth_policies.items():
        ext = item.resource.spec.ext_auth
        if ext is not None and ext.service == "builtin" and ext.rules is not None:
            compiled[name] = compile_policy(item, policies.resolved[name], not _case_sensitive(policies, item))
    digest = hashlib.sha256(version.encode())
    for path in sorted(policies.files):
        digest.update(f"\0{path}\0".encode() + policies.files[path].encode())
    signin = {n for n, c in compiled.items() if c.signin}
    return RuleTable(f"{version}+{digest.hexdigest()[:8]}", compiled,
                     route_lookup(policies, set(compiled), signin) if compiled else RouteLookup())
