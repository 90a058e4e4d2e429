"""The intermediate representation: what one fleet gets, with the policy sources resolved.

The IR is the only input of the Envoy translators in ``filters/`` and ``resources.py``: plain frozen
dataclasses, per listener, with gateway-level and route-level checks kept apart (layering).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from authplane.policy.model import ApiKey, Authorization, BasicAuth, ExtAuth, Jwt, Oidc, RouteMatch
from authplane.policy.oidc import Endpoints


@dataclass(frozen=True)
class Origin:
    """The policy object (and file position) that produced part of the Envoy config."""

    kind: str
    name: str
    path: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.kind} {self.name!r} ({self.path}:{self.line}:{self.col})"


@dataclass(frozen=True)
class JwtIR:
    policy: str
    spec: Jwt
    jwks_files: dict[str, str]
    """provider name → inlined JWKS file content."""


@dataclass(frozen=True)
class ExtAuthIR:
    policy: str
    level: str
    target: str
    spec: ExtAuth
    cluster: str
    rules: str = ""
    """Builtin service: the digest of the policy's rules (``authz.rules.rules_digest``)."""


@dataclass(frozen=True)
class BasicAuthIR:
    policy: str
    spec: BasicAuth
    htpasswd: str
    """The users as Envoy reads them: ``user:{SHA}<hash>`` lines, comments dropped."""


@dataclass(frozen=True)
class ApiKeyIR:
    policy: str
    spec: ApiKey
    credentials: tuple[tuple[str, str], ...]
    """(key, client name) pairs of the key file."""


@dataclass(frozen=True)
class OidcIR:
    policy: str
    spec: Oidc
    endpoints: Endpoints
    client_secret: bytes = field(repr=False)
    hmac_secret: bytes = field(repr=False)


@dataclass(frozen=True)
class Checks:
    """The checks of one AuthPolicy, at one level (gateway or route)."""

    policy: str
    level: str  # "gateway" | "route"
    origin: Origin
    jwt: JwtIR | None = None
    authorization: Authorization | None = None
    ext_auth: ExtAuthIR | None = None
    basic_auth: BasicAuthIR | None = None
    api_key: ApiKeyIR | None = None
    oidc: OidcIR | None = None
    """With ``oidc``, ``jwt`` holds the check of the ID token cookie that the oauth2 filter sets."""


@dataclass(frozen=True)
class RouteIR:
    name: str  # "<route>/<rule>"
    match: RouteMatch
    cluster: str
    timeout: float | None
    checks: Checks | None
    public: bool
    origin: Origin
    specificity: tuple[int, ...] = ()


@dataclass(frozen=True)
class VirtualHostIR:
    name: str
    domains: tuple[str, ...]
    routes: tuple[RouteIR, ...]


@dataclass(frozen=True)
class ListenerIR:
    name: str  # "<gateway>/<listener>"
    gateway: str
    address: str
    port: int
    xff_num_trusted_hops: int
    checks: Checks | None  # gateway level
    virtual_hosts: tuple[VirtualHostIR, ...]
    origin: Origin
    case_sensitive: bool = True
    """The gateway's ``pathMatching``: path rules and route path matches heed case."""
    reject_ambiguous: bool = True
    """The gateway's ``pathMatching``: a guard route answers 400 to ambiguous paths."""

    @property
    def route_config_name(self) -> str:
        return self.name

    def route_checks(self) -> list[Checks]:
        """Distinct route-level checks used on this listener, in a stable order."""
        seen: dict[str, Checks] = {}
        for vh in self.virtual_hosts:
            for r in vh.routes:
                if r.checks is not None:
                    seen.setdefault(r.checks.policy, r.checks)
        return [seen[k] for k in sorted(seen)]

    def all_checks(self) -> list[Checks]:
        return ([self.checks] if self.checks else []) + self.route_checks()


@dataclass(frozen=True)
class ClusterIR:
    name: str
    endpoints: tuple[tuple[str, int], ...]
    http2: bool
    connect_timeout: float
    tls: bool
    sni: str | None
    origin: Origin | None
    max_streams: int | None = None
    """HTTP/2: concurrent streams per connection; beyond it Envoy opens another connection."""

    @property
    def static_ips(self) -> bool:
        """IP-only clusters are served over EDS; hostnames need Envoy's DNS resolution."""
        import ipaddress

        try:
            for host, _ in self.endpoints:
                ipaddress.ip_address(host)
        except ValueError:
            return False
        return True


@dataclass(frozen=True)
class CompileOptions:
    """Addresses Envoy uses to reach authplane's own decision service."""

    authz_grpc: str = "127.0.0.1:9001"
    authz_http: str = "127.0.0.1:9002"


@dataclass
class FleetIR:
    name: str
    listeners: list[ListenerIR] = field(default_factory=list)
    clusters: dict[str, ClusterIR] = field(default_factory=dict)
