"""The typed policy model (apiVersion authplane.dev/v1alpha1). Unknown fields are errors.

Field names are camelCase in YAML (the contract) and snake_case in Python.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from authplane.contract import API_VERSION, IDENTITY_HEADERS
from authplane.policy.types import (
    CIDR,
    Duration,
    Endpoint,
    HeaderName,
    Hostname,
    IPAddress,
    Method,
    Name,
    PathMatch,
    PathPattern,
    Port,
    Regex,
    Scope,
    Status,
    StringMatch,
)


class Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True,
        use_attribute_docstrings=True,
    )


def _one_of(model: BaseModel, *fields: str, required: bool = True) -> None:
    given = [f for f in fields if getattr(model, f) is not None]
    names = ", ".join(to_camel(f) for f in fields)
    if len(given) > 1:
        raise ValueError(f"set only one of {names}")
    if required and not given:
        raise ValueError(f"set one of {names}")


class Metadata(Model):
    name: Name
    """Unique per kind; lowercase letters, digits, '-', '_' and '.'."""
    labels: dict[str, str] = {}
    """Free-form labels; not used by authplane."""


# --- Gateway -----------------------------------------------------------------------------------


class CertificateFiles(Model):
    cert_file: Annotated[str, Field(min_length=1)]
    """PEM certificate (the leaf first, then its intermediates), relative to the policy file."""
    key_file: Annotated[str, Field(min_length=1)]
    """PEM private key of the certificate, relative to the policy file. It reaches Envoy over SDS
    only; ``authplane render`` redacts it unless given ``--show-secrets``."""


class ClientValidation(Model):
    ca_file: Annotated[str, Field(min_length=1)]
    """PEM bundle of the CAs whose client certificates are accepted, relative to the policy file. A
    certificate from any other CA fails the handshake, whatever its names."""
    mode: Literal["require", "optional"] = "require"
    """``require``: a client without a certificate fails the handshake. ``optional``: it connects,
    and matches no ``when.clientCert`` condition (a presented certificate must still verify)."""


class ListenerTls(Model):
    """TLS of an ``https`` listener. The files are watched: a replaced certificate is served to new
    connections without restart; a broken replacement is refused and the last good one kept."""

    certificates: Annotated[list[CertificateFiles], Field(min_length=1)]
    """Certificates, chosen by the client's SNI from each certificate's DNS names (the first one
    when no name matches or the client sends no SNI)."""
    min_version: Literal["1.2", "1.3"] = "1.2"
    """Lowest TLS version accepted."""
    client_validation: ClientValidation | None = None
    """Verify client certificates (mTLS); authorization rules match their names with
    ``when.clientCert``."""
    forward_client_cert: bool = False
    """Send the verified client certificate's subject, URI and DNS names upstream in
    ``x-forwarded-client-cert``. A copy sent by the client never reaches the upstream either way."""


class Listener(Model):
    name: Name
    """Listener name, unique in the gateway; the Envoy listener is named ``<gateway>/<name>``."""
    port: Port
    """TCP port Envoy listens on."""
    address: IPAddress = "0.0.0.0"
    """Address Envoy binds."""
    protocol: Literal["http", "https"] = "http"
    """``https`` terminates TLS (set ``tls``)."""
    tls: ListenerTls | None = None
    """``protocol: https``: certificates, minimum version, client certificate validation."""
    redirect_to_https: bool = False
    """``protocol: http``: answer every request with a 301 to the same host and path on the
    gateway's (first) ``https`` listener's port, with no check run."""

    @model_validator(mode="after")
    def _tls(self) -> Listener:
        if self.protocol == "https" and self.tls is None:
            raise ValueError("protocol: https needs tls (certificates)")
        if self.protocol == "http" and self.tls is not None:
            raise ValueError("tls needs protocol: https")
        if self.protocol == "https" and self.redirect_to_https:
            raise ValueError("redirectToHttps is for a protocol: http listener")
        return self


class PathMatching(Model):
    case_sensitive: bool = True
    """``false``: path rules (``authorization`` and builtin ``when.paths``) and route path matches
    ignore case, for backends that serve ``/API/x`` as ``/api/x``."""
    reject_ambiguous: bool = True
    """Answer 400, before any check, to a path (after normalisation) with a path parameter (``;`` or
    ``%3B``) or a segment ending in a dot (``/a.``, ``/a./b``, ``/...``): backends such as Tomcat or
    IIS read ``/a;x`` and ``/a.`` as ``/a``. ``false`` is an explicit opt-out."""


class GatewaySpec(Model):
    fleet: Name
    """Envoys whose ``node.cluster`` equals this value receive this gateway."""
    listeners: Annotated[list[Listener], Field(min_length=1)]
    """Listeners of the gateway (plain HTTP unless ``protocol: https``)."""
    xff_num_trusted_hops: Annotated[int, Field(ge=0, le=10)] = 0
    """Number of trusted proxies in front of Envoy whose ``x-forwarded-for`` entries are believed.
    0 (default): the client address is the TCP peer and ``x-forwarded-for`` from clients is ignored
    for source-address checks."""
    path_matching: PathMatching = PathMatching()
    """How paths are matched and which paths are refused (see concepts: Path matching)."""


# --- Backend -----------------------------------------------------------------------------------


class BackendTls(Model):
    """Upstream TLS. The endpoints' certificate is always verified (against ``caFile``, else the
    system trust store) and must name ``sni``. Files are relative to the policy file, watched, and
    reach Envoy over SDS."""

    ca_file: Annotated[str, Field(min_length=1)] | None = None
    """PEM bundle of the CAs the endpoints' certificates must chain to (default: the system trust
    store)."""
    cert_file: Annotated[str, Field(min_length=1)] | None = None
    """Client certificate (PEM) presented to the endpoints: mTLS to the upstream."""
    key_file: Annotated[str, Field(min_length=1)] | None = None
    """Private key (PEM) of ``certFile``."""
    sni: str | None = None
    """SNI sent and DNS name the endpoints' certificate must carry (default: the Backend's ``sni``,
    else the first endpoint's host)."""

    @model_validator(mode="after")
    def _pair(self) -> BackendTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("set both certFile and keyFile, or neither")
        return self


class BackendSpec(Model):
    endpoints: Annotated[list[Endpoint], Field(min_length=1)]
    """``host:port`` of each upstream instance; IP endpoints are served over EDS, hostnames are
    resolved by Envoy (STRICT_DNS)."""
    protocol: Literal["http1", "http2"] = "http1"
    """``http2`` speaks cleartext HTTP/2 (h2c), needed for gRPC services."""
    connect_timeout: Duration = 2.0
    """Upstream connect timeout."""
    tls: bool | BackendTls = False
    """Connect to the endpoints with TLS, verifying their certificate: ``true`` with the system
    trust store, or ``{caFile, certFile, keyFile, sni}``."""
    sni: str | None = None
    """SNI and certificate name to use with ``tls`` (default: the first endpoint's host)."""


# --- Route -------------------------------------------------------------------------------------


class RouteMatch(Model):
    path: PathPattern | None = None
    """Exact path; also matches with a trailing slash (``/x`` and ``/x/``), so that ``/x/`` cannot
    fall through to a route without the policy of ``/x``."""
    path_prefix: str | None = None
    """Path prefix matched on whole segments: ``/api`` matches ``/api`` and ``/api/x``, not ``/apix``."""
    path_regex: Regex | None = None
    """RE2 regular expression matched against the whole path."""
    methods: list[Method] = []
    """Any of these methods (default: any method)."""
    headers: dict[HeaderName, str] = {}
    """Each header must be present with exactly this value."""

    @model_validator(mode="after")
    def _one_path(self) -> RouteMatch:
        _one_of(self, "path", "path_prefix", "path_regex", required=False)
        if self.path_prefix is not None and not self.path_prefix.startswith("/"):
            raise ValueError("pathPrefix must start with /")
        return self


class RouteRule(Model):
    name: Name | None = None
    """Rule name, unique in the route; a policy that targets one rule needs it. Unnamed rules are
    shown as ``rule-<index>`` (``rule-0`` for the first) in render and status."""
    match: RouteMatch = RouteMatch(path_prefix="/")
    """What requests this rule takes (default: every path)."""
    backend: Name | None = None
    """Name of the Backend the requests go to; required on a route with a ``gateway``, absent on a
    forward-auth-only route (the ingress in front of the app routes the requests)."""
    timeout: Duration | None = None
    """Upstream request timeout (Envoy's default 15s when unset; 0s disables it)."""


class RouteSpec(Model):
    gateway: Name | None = None
    """The Gateway this route attaches to. Without one (and without ``backend`` in its rules) the
    route is for forward auth only: no Envoy receives it, and the decision service's forward-auth
    endpoint picks the policy of a request the URL does not name by its ``hostnames`` and rules,
    as for Envoy's routes."""
    listeners: list[Name] | None = None
    """Attach only to these listeners of the gateway (default: all)."""
    hostnames: Annotated[list[Hostname], Field(min_length=1)] = ["*"]
    """Host headers served; ``*`` is every host, ``*.example.com`` a suffix."""
    rules: Annotated[list[RouteRule], Field(min_length=1)] = [RouteRule()]
    """Rules (required with a ``gateway``; a forward-auth-only route defaults to one rule for every
    path). Envoy tries the rules of all routes of a host most specific first: exact paths,
    longer prefixes, regexes, then the catch-all prefix ``/``; more header conditions first."""

    def rule_names(self) -> list[str]:
        """Each rule's name, ``rule-<index>`` for a rule written without one."""
        return [r.name or f"rule-{i}" for i, r in enumerate(self.rules)]


# --- AuthPolicy --------------------------------------------------------------------------------


class TargetRef(Model):
    kind: Literal["Gateway", "Route"]
    """What the policy attaches to."""
    name: Name
    """Name of the Gateway or Route."""
    rule: Name | None = None
    """With ``kind: Route``: attach to this rule only."""

    @model_validator(mode="after")
    def _rule_needs_route(self) -> TargetRef:
        if self.rule is not None and self.kind != "Route":
            raise ValueError("rule can only be set with kind: Route")
        return self


class Jwks(Model):
    uri: Annotated[str, Field(pattern=r"^https?://[^/\s]+(/\S*)?$")] | None = None
    """Remote JWKS URL (http or https); Envoy fetches it, caches it and refreshes it in the
    background so key rotation needs no restart."""
    file: str | None = None
    """JWKS file, relative to the policy file; its content is sent to Envoy inline."""
    inline: dict[str, Any] | None = None
    """A JWKS written in the policy (``{keys: [...]}``)."""
    cache_duration: Duration = 300.0
    """How long a fetched remote JWKS is cached before it is fetched again."""
    timeout: Duration = 5.0
    """Timeout of one remote JWKS fetch."""

    @model_validator(mode="after")
    def _one_source(self) -> Jwks:
        _one_of(self, "uri", "file", "inline")
        return self


class TokenSource(Model):
    header: HeaderName | None = None
    """Read the token from this header."""
    prefix: str | None = None
    """With ``header``: the value prefix before the token, e.g. ``"Bearer "``."""
    cookie: str | None = None
    """Read the token from this cookie."""
    query: str | None = None
    """Read the token from this query parameter."""

    @model_validator(mode="after")
    def _one_source(self) -> TokenSource:
        _one_of(self, "header", "cookie", "query")
        if self.prefix is not None and self.header is None:
            raise ValueError("prefix can only be used with header")
        return self


class JwtProvider(Model):
    name: Name
    """Provider name, unique in the policy."""
    issuer: str | None = None
    """Required ``iss`` claim (unset: any issuer)."""
    audiences: list[str] = []
    """Accepted ``aud`` values (empty: any). A token for another audience gets 403."""
    jwks: Jwks
    """Where the verification keys come from."""
    from_: Annotated[list[TokenSource], Field(alias="from")] = []
    """Where the token is read (default: ``Authorization: Bearer <token>``)."""
    forward: bool = False
    """Keep the token in the request sent upstream (default: removed)."""
    claims_to_headers: dict[str, HeaderName] = {}
    """Copy these claims (``sub``, ``email``, nested ``a.b``) into upstream request headers."""
    clock_skew: Duration = 60.0
    """Tolerated clock difference when checking ``exp`` and ``nbf``."""
    cache_size: Annotated[int, Field(ge=0, le=1_000_000)] = 100
    """Verified tokens kept in Envoy's JWT cache (0 turns the cache off). The cache keeps RS256
    verification from dominating the request cost."""


class Jwt(Model):
    providers: Annotated[list[JwtProvider], Field(min_length=1)]
    """A token from any one of these providers is accepted."""
    required: bool = True
    """false: a request without a token passes this check; a present but bad token never does."""


class ClientCert(Model):
    sans: Annotated[list[Annotated[str, Field(pattern=r"^\S+$")]], Field(min_length=1)]
    """Any of these names among the certificate's URI and DNS SANs (SPIFFE IDs included): exact
    values, or prefixes written with a trailing ``*`` (``spiffe://corp.example/ns/prod/*``; ``*``
    alone: any verified certificate). Envoy falls back to the certificate's subject
    (``CN=...,O=...``) when a certificate has no SAN that matches."""


class Conditions(Model):
    """All given kinds must match; within one kind, any listed value matches."""

    claims: dict[str, Annotated[list[StringMatch], Field(min_length=1)]] = {}
    """Verified JWT claims (dotted paths for nested claims): a string claim must match a value,
    an array claim must contain a string that does. Values are exact strings, ``{prefix: ...}``,
    ``{regex: ...}`` or ``{present: true}``."""
    headers: dict[HeaderName, Annotated[list[StringMatch], Field(min_length=1)]] = {}
    """Request headers: exact values, ``{prefix: ...}``, ``{regex: ...}`` or ``{present: true}``."""
    source_cidrs: Annotated[list[CIDR], Field(alias="sourceCIDRs")] = []
    """Client address ranges (the client address as the gateway's xffNumTrustedHops defines it)."""
    methods: list[Method] = []
    """HTTP methods."""
    paths: list[PathMatch] = []
    """Exact paths (``/x`` matches ``/x`` and ``/x/``), prefixes written ``/x/*`` (``/x``, ``/x/``
    and everything below), or ``{regex: ...}``, matched on the normalised path (see concepts:
    Path matching)."""
    scopes: list[Scope] = []
    """OAuth scopes the verified JWT must all carry, in its ``scope`` or ``scp`` claim (a
    space-delimited string or an array of strings)."""
    client_cert: ClientCert | None = None
    """The verified client certificate (listeners with ``tls.clientValidation``); a request
    without one matches no ``clientCert`` condition. Authorization rules only."""
    not_: Annotated[Conditions | None, Field(alias="not")] = None
    """Conditions that must not match (all of its kinds together), e.g.
    ``not: {headers: {x-internal: [{present: true}]}}``."""

    cel: Annotated[str, Field(min_length=1)] | None = None
    """A CEL expression that must be true (authorization rules only), over Envoy's attributes
    (``request.path``, ``request.method``, ``request.headers['x']``, ``source.address``,
    ``connection.mtls`` ...) and ``claims``, the verified JWT payload (``claims.groups``): reading
    it needs a ``jwt`` or ``oidc`` section in the policy or on the route's gateway. Parsed
    and type-checked at load; Envoy evaluates it natively. An evaluation error (a missing header or
    claim) makes the rule not match, except a deny rule under ``default: deny``, where it denies:
    test presence with ``'x' in request.headers`` or ``has(claims.x)``."""

    @field_validator("not_")
    @classmethod
    def _not_empty(cls, value: Conditions | None) -> Conditions | None:
        if value is not None and value.is_empty():
            raise ValueError("not needs a condition (an empty one matches every request, so the rule never would)")
        return value

    def is_empty(self) -> bool:
        return not (self.claims or self.headers or self.source_cidrs or self.methods or self.paths
                    or self.scopes or self.not_ or self.cel is not None or self.client_cert is not None)

    def nested(self) -> Iterator[Conditions]:
        """These conditions and those under ``not``, outermost first."""
        yield self
        if self.not_ is not None:
            yield from self.not_.nested()

    def uses_jwt(self) -> bool:
        """Reads the verified JWT (claims or scopes), here or under ``not``."""
        return any(c.claims or c.scopes for c in self.nested())


class AuthorizationRule(Model):
    name: Name
    """Rule name, unique in the policy."""
    action: Literal["allow", "deny"]
    """Deny rules win over allow rules."""
    when: Conditions = Conditions()
    """Conditions; empty matches every request."""
    mode: Literal["enforce", "shadow"] = "enforce"
    """``shadow``: the rule is evaluated and its would-be outcome recorded, but enforcement goes on
    as if the rule were not there (a shadow deny rule never denies; a shadow allow rule allows
    nothing yet). Recorded as the level's RBAC shadow result (``authplane/contract.py``)."""


class Authorization(Model):
    default: Literal["allow", "deny"] = "deny"
    """Decision when no allow rule matches (deny rules always win)."""
    rules: list[AuthorizationRule] = []
    """Allow and deny rules."""


class BasicAuth(Model):
    """HTTP Basic authentication against an htpasswd file (Envoy's native ``basic_auth`` filter)."""

    file: str
    """htpasswd file, relative to the policy file: one ``user:{SHA}<base64 SHA-1>`` per line (``#``
    comments), as written by ``htpasswd -s``; Envoy supports no other hash. Its content travels in
    the route configuration, so a change applies to open connections. Do not name it ``*.yaml``."""
    user_header: HeaderName | None = None
    """Send the authenticated user name upstream in this header (any copy sent by the client is
    replaced)."""
    forward: bool = False
    """Keep the ``Authorization`` header in the request sent upstream (default: removed)."""


class ApiKey(Model):
    """API keys checked by Envoy's native ``api_key_auth`` filter. Missing or unknown key: 401;
    a key of a client not in ``clients``: 403."""

    file: str
    """Key file, relative to the policy file: one ``client-name: key`` per line (``#`` comments); a
    client may have several keys (rotation). Keys are compared as written (no hashed keys). Do not
    name it ``*.yaml``."""
    header: HeaderName | None = None
    """Read the key from this header (the default, ``x-api-key``, when no source is set); a
    ``Bearer `` prefix is stripped."""
    query: str | None = None
    """Read the key from this query parameter."""
    cookie: str | None = None
    """Read the key from this cookie."""
    clients: list[Name] = []
    """Accept only the keys of these clients (default: every client in the file)."""
    client_header: HeaderName | None = None
    """Send the client name of the key upstream in this header (any copy sent by the client is
    replaced); authorization rules can match it (``when.headers``)."""
    forward: bool = False
    """Keep the key in the request sent upstream (default: removed from its header, query
    parameter or cookie)."""

    @model_validator(mode="after")
    def _one_source(self) -> ApiKey:
        _one_of(self, "header", "query", "cookie", required=False)
        return self

    @property
    def source(self) -> tuple[str, str]:
        """(kind, name) of where the key is read: ``("header", "x-api-key")`` by default."""
        for kind in ("header", "query", "cookie"):
            value = getattr(self, kind)
            if value is not None:
                return kind, value
        return "header", "x-api-key"


_URL = r"^https?://[^/\s]+(/\S*)?$"
Url = Annotated[str, Field(pattern=_URL)]


class SecretRef(Model):
    """Where a secret is read; it reaches Envoy over SDS, and ``authplane render`` redacts it
    unless given ``--show-secrets``."""

    file: str | None = None
    """File holding the secret (surrounding whitespace is ignored), relative to the policy file."""
    env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    """Environment variable of the authplane process holding the secret."""

    @model_validator(mode="after")
    def _one_source(self) -> SecretRef:
        _one_of(self, "file", "env")
        return self


class OidcCookie(Model):
    domain: Annotated[str, Field(pattern=r"^\.?[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?$")] | None = None
    """Parent domain of the session cookies (``.example.com``): one login serves every host under
    it that uses the same client (default: the request's host only)."""
    same_site: Literal["lax", "strict", "none", "disabled"] = "lax"
    """``SameSite`` attribute of the session cookies (``disabled``: not set). Envoy always marks
    them ``Secure`` and ``HttpOnly``: browsers keep them only over HTTPS (or on localhost)."""
    prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")] = "authplane"
    """Prefix of the cookie names (``<prefix>_id``, ``<prefix>_hmac`` ...). Policies that share a
    login (same client, same domain) must use the same prefix; others need different ones."""


class OidcSession(Model):
    """Where the decision service's own sign-in (forward auth, ``/oauth2/*``) keeps sessions, and
    how it renews them. Envoy's ``oauth2`` filter keeps its own cookies and ignores this section."""

    store: Literal["cookie", "redis"] = "cookie"
    """``cookie``: the whole session, encrypted with ``sessionKeys``, in the browser (chunked past
    4 KB). ``redis``: the session in Redis, encrypted with a secret only the browser's cookie holds
    (a Redis dump alone cannot be replayed); the cookie carries just that ticket, and sign-out
    removes the session for every app and process at once."""
    url: str | None = None
    """``store: redis``: ``redis://host:6379/0`` (``rediss://`` for TLS, ``unix:///path``). A user
    name may be in the URL; the password may not: put it in ``password``."""
    password: SecretRef | None = None
    """``store: redis``: the Redis password, ``{file: redis-password.txt}`` or ``{env: NAME}``."""
    unavailable_status: Status = 503
    """``store: redis``: the status answered when Redis cannot be reached (never an allow)."""
    lifetime: Duration = 604800.0
    """How long a session with a refresh token lives before a new sign-in (oauth2-proxy's
    ``cookie-expire``, 7 days by default). Without a refresh token a session ends with its ID
    token. Request ``offline_access`` in ``scopes`` for a refresh token from providers that need
    it (authplane then adds ``prompt=consent``, as OpenID Connect asks)."""
    refresh_interval: Duration | None = None
    """Renew the tokens with the refresh token this long after the last renewal (oauth2-proxy's
    ``cookie-refresh``), so group changes or a revoked grant are seen sooner. Default: when the
    ID token (or access token) expires. A provider refusing the refresh (``invalid_grant``) ends
    the session."""

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")  # no echo: it may hold a password
        return value

    @model_validator(mode="after")
    def _redis(self) -> OidcSession:
        if self.store == "redis" and self.url is None:
            raise ValueError("store: redis needs url")
        if self.store != "redis" and (self.url is not None or self.password is not None):
            raise ValueError("url and password are for store: redis")
        userinfo, at, _ = self.url.partition("://")[2].partition("@") if self.url else ("", "", "")
        if (at and ":" in userinfo) or (self.url and "password=" in self.url.partition("?")[2]):
            raise ValueError("put the Redis password in password ({file: ...} or {env: ...}), not in url")
        return self


class Oidc(Model):
    """Browser sign-in with OpenID Connect (authorization code flow with PKCE), compiled to
    Envoy's ``oauth2`` filter plus a JWT check of the resulting ID token, so ``authorization``
    rules can use its claims (``groups`` ...)."""

    issuer: Url
    """The provider's issuer URL (the ``iss`` of its ID tokens)."""
    authorization_endpoint: Url | None = None
    """Where browsers are sent to sign in. Unset (with ``tokenEndpoint`` and ``jwksUri``): read
    from the provider's discovery document (``<issuer>/.well-known/openid-configuration``), which
    authplane fetches when it loads the policies (5s timeout, cached for 10 minutes; the last good
    copy is kept if the provider cannot be reached)."""
    token_endpoint: Url | None = None
    """Where Envoy exchanges the authorization code for tokens."""
    jwks_uri: Url | None = None
    """The provider's signing keys (verify the ID token)."""
    end_session_endpoint: Url | None = None
    """The provider's logout endpoint (default: from discovery, if it has one): ``logoutPath``
    also ends the provider's session there."""
    userinfo_endpoint: Url | None = None
    """Forward-auth sign-in: where the decision service reads the claims beyond ``sub``
    (``email``, ``groups``) after the code exchange and each renewal. Default: from discovery, if
    it has one; with the endpoints written out and this unset, only the ID token's claims (asked
    for with the ``claims`` parameter, see ``idTokenClaims``) are known."""
    client_id: Annotated[str, Field(min_length=1)]
    """OAuth client ID registered at the provider (the ID token's audience)."""
    client_secret: SecretRef
    """OAuth client secret: ``{file: client-secret.txt}`` or ``{env: NAME}``."""
    hmac_secret: SecretRef | None = None
    """Key signing the session cookies (32+ bytes). Default: derived from the client secret,
    issuer and client ID (HMAC-SHA256), so every Envoy of every fleet and every restart of
    authplane uses the same key, and rotating the client secret ends every session."""
    redirect_path: PathPattern = "/oauth2/callback"
    """Callback path the provider redirects to (register ``<scheme>://<host><redirectPath>`` at the
    provider for every host); authplane adds a route for it on every host the policy covers."""
    logout_path: PathPattern = "/oauth2/sign_out"
    """Visiting this path clears the session cookies (and ends the provider's session when it has
    an end-session endpoint); authplane adds a route for it on every host the policy covers.
    Envoy sends the browser to the end-session endpoint with
    ``post_logout_redirect_uri=<scheme>://<host>/``: register that URI for every host at the
    provider, or the provider refuses the logout (400) and keeps its own session, so the next
    visit signs the user back in without a prompt."""
    scopes: list[Annotated[str, Field(pattern=r"^[!#-\[\]-~]+$")]] = ["openid", "email", "profile"]
    """Scopes requested (``openid`` is always added). Add ``groups`` if your provider needs it
    for a ``groups`` claim."""
    id_token_claims: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]+$")]] | None = None
    """Claims asked for in the ID token with the OpenID ``claims`` request parameter on the sign-in
    URL. Envoy reads only the ID token (it never calls the userinfo endpoint), and a conforming
    provider returns scope-requested claims (``email``, ``groups``) from userinfo only. Default:
    the claims of ``claimsToHeaders`` and of this policy's authorization rules other than ``sub``
    (list claims that only other policies' rules read here); ``[]``: no ``claims`` parameter.
    ``validate`` warns when the provider's discovery document does not list
    ``claims_parameter_supported``."""
    token_endpoint_auth: Literal["client_secret_post", "client_secret_basic"] = "client_secret_post"
    """How the client secret is sent to the token endpoint (by Envoy, and by the decision
    service's own sign-in): in the form body, or as HTTP Basic
    authentication (which stricter providers require; use what the client is registered with)."""
    cookie: OidcCookie = OidcCookie()
    """Session cookies."""
    pass_through_paths: list[PathPattern] = []
    """Paths (exact, or prefixes written ``/prefix/*``) served without a session; their requests
    carry no claims, so authorization rules on claims deny them."""
    forward_access_token: bool = False
    """Send the access token upstream as ``Authorization: Bearer <token>``."""
    id_token_header: HeaderName | None = None
    """Send the verified ID token upstream in this header (any client copy is removed). The
    session cookies themselves never reach the upstream."""
    claims_to_headers: dict[str, HeaderName] = {
        "sub": "x-auth-request-user", "email": "x-auth-request-email", "groups": "x-auth-request-groups"}
    """ID token claims copied into upstream request headers (client copies are always removed).
    Envoy sends an array claim (``groups``) as the base64 of its JSON: ``["admins","dev"]`` arrives
    as ``WyJhZG1pbnMiLCJkZXYiXQ==``."""
    post_logout_redirect_uri: Url | None = None
    """Forward-auth sign-in (``/oauth2/sign_out`` of the decision service): where the provider's
    end-session endpoint sends the browser after logout (register it at the provider; unset: no
    ``post_logout_redirect_uri`` is sent)."""
    session_keys: list[SecretRef] = []
    """Forward-auth sign-in: keys (32+ bytes each) encrypting the decision service's session
    cookies with AES-GCM. The first encrypts, any decrypts: put a new key first to rotate, drop
    the old one once its sessions have expired. Default: ``hmacSecret`` (or its default)."""
    session: OidcSession = OidcSession()
    """Forward-auth sign-in: the session store (cookie or Redis) and token renewal."""

    @model_validator(mode="after")
    def _endpoints(self) -> Oidc:
        given = [self.authorization_endpoint, self.token_endpoint, self.jwks_uri]
        if any(given) and not all(given):
            raise ValueError("set all of authorizationEndpoint, tokenEndpoint, jwksUri, or none "
                             "(discovery)")
        if self.redirect_path == self.logout_path:
            raise ValueError("redirectPath and logoutPath must differ")
        return self

    @property
    def discovery(self) -> bool:
        return self.authorization_endpoint is None


class ApiKeys(Model):
    """API keys checked by the builtin decision service."""

    file: str
    """Key file, relative to the policy file: one ``client-name: key`` per line (``#`` comments);
    a key written ``sha256:<hex>`` is stored hashed. Do not name it ``*.yaml`` inside the policy
    directory (it would be read as a policy). Changing the file changes decisions at the next reload."""
    header: HeaderName = "x-api-key"
    """Request header carrying the key."""
    prefix: str = ""
    """Value prefix before the key, e.g. ``"ApiKey "`` with ``header: authorization``."""
    client_header: HeaderName | None = None
    """On allow, send the client name of a valid key upstream in this header (any copy sent by the
    client is replaced)."""
    forward: bool = False
    """Keep the key header in the request sent upstream (default: removed)."""


class ExtAuthConditions(Conditions):
    """All given kinds must match; within one kind, any listed value matches. ``claims`` and
    ``scopes`` read the JWT verified by Envoy (or, on the forward-auth endpoint, by the decision
    service with this policy's ``jwt`` providers)."""

    api_keys: list[str] = []
    """A valid API key (see ``extAuth.apiKeys``) of one of these clients; ``"*"``: any client."""
    client_cert: ClientCert | None = None
    """Not available in builtin rules: use ``authorization`` rules (Envoy sees the certificate)."""
    authenticated: bool | None = None
    """true: the request carries a verified JWT or a valid API key; false: it carries neither."""
    not_: Annotated[ExtAuthConditions | None, Field(alias="not")] = None
    """Conditions that must not match (all of its kinds together), e.g.
    ``not: {headers: {x-internal: [{present: true}]}}``."""

    @field_validator("client_cert")
    @classmethod
    def _no_client_cert(cls, value: ClientCert | None) -> ClientCert | None:
        if value is not None:
            raise ValueError("clientCert conditions are for authorization rules (Envoy RBAC), not extAuth rules")
        return value

    def is_empty(self) -> bool:
        return super().is_empty() and not self.api_keys and self.authenticated is None

    def nested(self) -> Iterator[ExtAuthConditions]:
        yield self
        if self.not_ is not None:
            yield from self.not_.nested()


class DenyResponse(Model):
    status: Status = 403
    """HTTP status of the denial."""
    body: str = ""
    """Response body."""
    headers: dict[HeaderName, str] = {}
    """Response headers. A 401 gets ``WWW-Authenticate: Bearer realm="<policy>"`` unless set here."""
    sign_in: Annotated[str, Field(pattern=r"^https?://[^/\s]+(/\S*)?$")] | None = None
    """Sign-in URL: browsers (``Accept: text/html``) get a 302 to it with the original URL in the
    ``rd`` query parameter; other clients get ``status`` (use 401)."""


class ExtAuthRule(Model):
    name: Name
    """Rule name, unique in the policy."""
    when: ExtAuthConditions = ExtAuthConditions()
    """Conditions; empty matches every request."""
    action: Literal["allow", "deny"]
    """What a match decides; the first matching rule wins and no match denies."""
    upstream_headers: dict[HeaderName, str] = {}
    """On allow: headers set on the request sent upstream (replacing any client copy)."""
    remove_headers: list[HeaderName] = []
    """On allow: headers removed from the request sent upstream."""
    response_headers: dict[HeaderName, str] = {}
    """On allow: headers added to the response sent to the client."""
    deny: DenyResponse = DenyResponse()
    """On deny: the response sent to the client."""
    mode: Literal["enforce", "shadow"] = "enforce"
    """``shadow``: enforcement skips the rule (as if it were not there) and the decision service
    also evaluates the whole rule list with it; when that first match is this deny rule and the
    enforced rules allow, the request passes and the would-deny is reported with the rule named
    (the policy-level shadow report, ``authplane/contract.py``). A shadow allow rule allows
    nothing yet and reports nothing. See docs/shadow-mode.md."""


class DecisionCache(Model):
    """How long the builtin decision service reuses a decision for the same request identity
    (credentials, method, path, the headers and source address the rules read, policy version)."""

    allow_ttl: Duration = 10.0
    """Lifetime of a cached allow (capped by the JWT's ``exp``); 0s turns caching of allows off."""
    deny_ttl: Duration = 1.0
    """Lifetime of a cached deny; 0s turns caching of denies off."""


class ExtAuth(Model):
    service: str
    """``builtin`` (authplane's decision service) or the name of a Backend (your own service)."""
    protocol: Literal["grpc", "http"] | None = None
    """Protocol of the service: Envoy's ext_authz gRPC API or plain HTTP. Default: ``http`` for
    ``builtin`` (fewer per-check costs, see docs/decision-service.md), ``grpc`` for a Backend."""
    timeout: Duration = 0.2
    """How long Envoy waits for a decision."""
    fail_open: bool = False
    """Let requests through when the service cannot be reached (Envoy adds
    ``x-envoy-auth-failure-mode-allowed: true`` upstream)."""
    status_on_error: Status = 503
    """Status returned when the service cannot be reached and failOpen is false."""
    headers_to_upstream: list[HeaderName] = []
    """HTTP Backend services: response headers of the service copied to the upstream request
    (gRPC services set upstream headers in their answer; builtin rules declare theirs)."""
    path_prefix: str = ""
    """HTTP Backend services: prefix added to the request path sent to the service."""
    rules: list[ExtAuthRule] | None = None
    """``service: builtin`` only: the decision rules."""
    api_keys: ApiKeys | None = None
    """``service: builtin`` only: API keys the rules can require (``when.apiKeys``)."""
    identity_headers: bool = True
    """``service: builtin`` only: on allow, send ``X-Auth-Request-User``, ``-Email`` and
    ``-Groups`` upstream (from the JWT's ``sub``, ``email``, ``groups``, or the API key's client
    name); copies sent by the client are always removed."""
    cache: DecisionCache = DecisionCache()
    """``service: builtin`` only: decision cache lifetimes."""
    engine: Literal["service", "native", "auto"] = "service"
    """``service: builtin`` only: where the rules are decided. ``service``: authplane's decision
    service (ext_authz). ``native``: inside Envoy, by authplane's dynamic module
    (``libauthplane_rules.so``), with the rules delivered as its route configuration; for rules
    without regexes, API keys, CEL, ``signIn`` or shadow mode (see docs/dynamic-modules.md).
    ``auto``: ``native`` when the module is installed and can decide the rules, else the decision
    service; ``validate`` says which, and ``validate --report`` why."""

    @model_validator(mode="before")
    @classmethod
    def _default_protocol(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("protocol") is None and "service" in data:
            data = {**data, "protocol": "http" if data["service"] == "builtin" else "grpc"}
        return data

    def read_headers(self) -> list[str]:
        """Request headers the builtin rules read (what Envoy must send in HTTP mode)."""
        names = {"accept"} | {h for r in self.rules or [] for c in r.when.nested() for h in c.headers}
        if self.api_keys:
            names.add(self.api_keys.header)
        return sorted(names)

    def upstream_headers(self) -> list[str]:
        """Headers the builtin service may set upstream on allow (HTTP mode lets only these through)."""
        names = {h for r in self.rules or [] for h in r.upstream_headers}
        if self.identity_headers:
            names.update(IDENTITY_HEADERS)
        if self.api_keys and self.api_keys.client_header:
            names.add(self.api_keys.client_header)
        return sorted(names)

    def response_headers(self) -> list[str]:
        """Headers the builtin service may add to the client's response on allow."""
        return sorted({h for r in self.rules or [] for h in r.response_headers})


class Satisfy(Model):
    """How the credential checks of a policy (``jwt``, ``apiKey``, ``basicAuth``) combine. Written
    ``satisfy: any`` or ``satisfy: {mode: any, methodHeader: x-auth-method}``."""

    mode: Literal["all", "any"] = "all"
    """``all``: each credential check must pass. ``any``: one valid credential among them is
    enough (browsers with a JWT, bots with an API key on one route); a request with none gets 401
    with a ``WWW-Authenticate`` challenge for each scheme, and every credential a request presents
    is verified: a wrong one is 401 even next to a valid one. The other checks (``authorization``,
    ``extAuth``) and the other level's policy still apply."""
    method_header: HeaderName | None = None
    """With ``mode: any``: send upstream, in this header, the method that satisfied the policy
    (``jwt``, ``apiKey``, ``basicAuth``; ``apiKey,basicAuth`` for a request with both). A JWT sent
    next to a key or Basic credentials is verified too but not named. Any copy sent by the client
    is replaced before the authorization rules, which can match it (``when.headers``)."""

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data: Any) -> Any:
        return {"mode": data} if isinstance(data, str) else data


MODULE_PLACES = ("beforeAuthentication", "afterAuthentication", "beforeAuthorization", "afterAuthorization")
"""Where a ``filters`` entry runs in the HTTP filter chain (``compiler/filters/__init__.py``)."""


class ModuleFilter(Model):
    """An Envoy dynamic module (a shared object implementing an HTTP filter) run at this level."""

    name: Name
    """Unique in the policy. A route-level entry with the name of one of its gateway's entries
    replaces it on the route (``enabled: false`` turns it off there)."""
    module: Annotated[str, Field(min_length=1)] | None = None
    """A module name (``lib<name>.so`` on Envoy's module search path, ``ENVOY_DYNAMIC_MODULES_SEARCH_PATH``)
    or the path of a ``lib<name>.so`` file, relative to the policy file (its directory must be on
    that search path too). Required unless ``enabled: false``."""
    filter_name: Annotated[str, Field(min_length=1)] | None = None
    """The filter name given to the module (a module may implement several); default: ``name``."""
    config: Any = None
    """The module's configuration: a string is passed as is, anything else as JSON."""
    place: Literal["beforeAuthentication", "afterAuthentication", "beforeAuthorization",
                   "afterAuthorization"] = "afterAuthorization"
    """Where it runs: before the credential checks, after them, before the authorization rules
    (after the credential checks, after the ``afterAuthentication`` modules), or after every
    check (the decision service and native rules included), right before the router."""
    enabled: bool = True
    """``false``: the gateway-level entry of that name does not run on this route."""

    @model_validator(mode="after")
    def _module_needed(self) -> ModuleFilter:
        if self.enabled and self.module is None:
            raise ValueError("module is required (a module name or the path of its lib<name>.so)")
        return self


class AuthPolicySpec(Model):
    target_ref: TargetRef
    """The Gateway, Route or Route rule the policy applies to."""
    public: bool = False
    """Route level only: turn every check (gateway level included) off for the target."""
    jwt: Jwt | None = None
    """JWT verification."""
    authorization: Authorization | None = None
    """Native authorization rules (Envoy RBAC)."""
    basic_auth: BasicAuth | None = None
    """HTTP Basic authentication (htpasswd file)."""
    api_key: ApiKey | None = None
    """API key authentication (key file)."""
    oidc: Oidc | None = None
    """Browser sign-in (OpenID Connect); a session is required unless a path passes through."""
    ext_auth: ExtAuth | None = None
    """External authorization (authplane's decision service or your own)."""
    satisfy: Satisfy = Satisfy()
    """``all`` (default) or ``any``: whether every credential check (``jwt``, ``apiKey``,
    ``basicAuth``) must pass, or one valid credential among them is enough (see ``Satisfy``)."""
    filters: list[ModuleFilter] = []
    """Envoy dynamic modules (custom HTTP filters) run at this level, at a declared place among
    the checks (see docs/dynamic-modules.md)."""
    mode: Literal["enforce", "shadow"] = "enforce"
    """``shadow``: every check of the policy is evaluated and its outcome recorded (would-deny),
    but none denies; a gateway-level policy that enforces still does. Flip it with an ordinary
    edit. How each check does it and what it costs: docs/shadow-mode.md. Not with ``oidc``,
    ``satisfy: any`` or a gRPC Backend ``extAuth`` service."""

    @model_validator(mode="after")
    def _shadow_checks(self) -> AuthPolicySpec:
        if self.mode == "shadow":
            if self.oidc is not None:
                raise ValueError("mode: shadow does not apply to oidc (a sign-in redirect cannot be recorded)")
            if self.satisfy.mode == "any":
                raise ValueError("mode: shadow does not combine with satisfy: any")
            ext = self.ext_auth
            if ext is not None and ext.service != "builtin" and ext.protocol == "grpc":
                raise ValueError("mode: shadow needs an HTTP extAuth Backend (protocol: http): Envoy "
                                 "cannot let a gRPC service's denial pass")
        return self


# --- PolicyTest --------------------------------------------------------------------------------


class PolicyTestJwt(Model):
    """A JWT minted for the case with a key ``authplane test`` generates: every provider is
    re-keyed to it for the run, so the policy's real keys are not needed."""

    provider: Name
    """The ``jwt`` provider the token is for: its ``issuer``, first audience and ``from`` are used."""
    policy: Name | None = None
    """The AuthPolicy holding the provider (default: the first, by name, with a provider of that name)."""
    claims: dict[str, Any] = {}
    """Claims of the token (``sub``, ``groups`` ...); ``iss``, ``aud``, ``iat`` and ``exp`` are set
    unless given."""


class PolicyTestRequest(Model):
    method: Method = "GET"
    """HTTP method."""
    path: Annotated[str, Field(pattern=r"^/\S*$")]
    """Path, with the query string if any."""
    host: str | None = None
    """Host header (default: the first hostname of the fleet's first listener's routes; ``test``
    for ``*``)."""
    headers: dict[HeaderName, str] = {}
    """Request headers."""
    jwt: PolicyTestJwt | None = None
    """Send a token minted for a provider, where the provider reads it (default ``Authorization:
    Bearer``)."""
    client_cert: str | None = None
    """A PEM client certificate (with its key, unless ``clientKey``), relative to this file: the
    request goes over TLS to the fleet's https listener (one verifying client certificates first)
    presenting it, for ``when.clientCert`` rules."""
    client_key: str | None = None
    """The private key of ``clientCert``, relative to this file."""

    @model_validator(mode="after")
    def _key_needs_cert(self) -> PolicyTestRequest:
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("clientKey needs clientCert")
        return self


class PolicyTestExpect(Model):
    status: Status
    """The response status the client gets."""
    upstream_headers: dict[HeaderName, str | None] = {}
    """Headers the upstream must receive with exactly this value; ``null``: must not receive."""


class PolicyTestCase(Model):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    """Case name, unique in the document; reported on failure and in JUnit XML."""
    request: PolicyTestRequest
    """The request sent to the gateway."""
    expect: PolicyTestExpect
    """What the client and the upstream see."""


class PolicyTestSpec(Model):
    """Cases run by ``authplane test`` through a real Envoy with the compiled configuration, the
    builtin decision service and an upstream that echoes what it receives. Ignored by validate,
    render and serve."""

    fleet: Name
    """The fleet whose configuration is tested; requests go to its first plain-HTTP listener."""
    stubs: dict[Name, Literal["allow", "deny"]] = {}
    """Backends used as your own ext_authz service, replaced for the run by a stub that allows
    or denies (403) every check."""
    cases: Annotated[list[PolicyTestCase], Field(min_length=1)]
    """The requests and what they must get."""

    @model_validator(mode="after")
    def _unique_names(self) -> PolicyTestSpec:
        names = [c.name for c in self.cases]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ValueError(f"case names must be unique: {dup!r} is used twice")
        return self


# --- documents ---------------------------------------------------------------------------------


class _Document(Model):
    api_version: Literal["authplane.dev/v1alpha1"] = Field(alias="apiVersion")
    """Always ``authplane.dev/v1alpha1``."""
    metadata: Metadata


class Gateway(_Document):
    kind: Literal["Gateway"]
    spec: GatewaySpec


class Backend(_Document):
    kind: Literal["Backend"]
    spec: BackendSpec


class Route(_Document):
    kind: Literal["Route"]
    spec: RouteSpec


class AuthPolicy(_Document):
    kind: Literal["AuthPolicy"]
    spec: AuthPolicySpec


class PolicyTest(_Document):
    kind: Literal["PolicyTest"]
    """``PolicyTest``: run by ``authplane test``, ignored by validate, render and serve."""
    metadata: Metadata
    """The suite's name, unique among PolicyTest documents (the JUnit testsuite's name)."""
    spec: PolicyTestSpec
    """The fleet, the stubs and the cases."""


KINDS: dict[str, type[_Document]] = {
    "Gateway": Gateway, "Backend": Backend, "Route": Route, "AuthPolicy": AuthPolicy,
}
DOCUMENT_KINDS: dict[str, type[_Document]] = {**KINDS, "PolicyTest": PolicyTest}
"""Every kind a policy file may hold: the policy kinds and ``PolicyTest`` (run by ``authplane test``)."""
assert API_VERSION == "authplane.dev/v1alpha1"

PolicyDocument = Annotated[Gateway | Backend | Route | AuthPolicy | PolicyTest, Field(discriminator="kind")]
