"""The intermediate representation: what one fleet gets, with the policy sources resolved.

The IR is the only input of the Envoy translators in ``filters/`` and ``resources.py``: plain frozen
dataclasses, per listener, with gateway-level and route-level checks kept apart (layering). A
policy's checks are carried as written (``Checks.spec``) with what the resolve stage read for it
(``Checks.resolved``); each filter module reads the sections it translates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from authplane.policy.documents import Resolved, TlsMaterial
from authplane.policy.model import AuthPolicySpec, ListenerTls, RouteMatch

LEVELS = ("gateway", "route")
"""The levels a policy applies at (``Checks.level``), in the order their filter instances run."""


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
class Checks:
    """The checks of one AuthPolicy, at one level (gateway or route)."""

    policy: str
    level: str  # "gateway" | "route"
    origin: Origin
    spec: AuthPolicySpec
    resolved: Resolved = field(repr=False)
    """What the resolve stage read for the policy (JWKS, users, keys, OIDC endpoints and secrets)."""

    @property
    def target(self) -> str:
        """The policy's ``targetRef`` as ``Kind/name[/rule]``."""
        ref = self.spec.target_ref
        return f"{ref.kind}/{ref.name}" + (f"/{ref.rule}" if ref.rule else "")


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


def specificity(match: RouteMatch) -> tuple[int, ...]:
    """Sort key, most specific first: exact paths, longer prefixes, regexes, the catch-all ``/``;
    within one kind, more header conditions first, then rules with methods."""
    prefix = (match.path_prefix or "/").rstrip("/")
    if match.path is not None:
        kind, length = 0, len(match.path)
    elif match.path_regex is not None:
        kind, length = 2, 0
    elif prefix:
        kind, length = 1, len(prefix)
    else:
        kind, length = 3, 0
    return (kind, -length, -len(match.headers), 0 if match.methods else 1)


@dataclass(frozen=True)
class VirtualHostIR:
    name: str
    domains: tuple[str, ...]
    routes: tuple[RouteIR, ...]


@dataclass(frozen=True)
class ListenerTlsIR:
    spec: ListenerTls
    material: TlsMaterial = field(repr=False)
    """The certificates (with their private keys) and client CA the resolve stage read."""


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
    env: Env = field(default_factory=lambda: Env(CompileOptions(), {}), repr=False, compare=False)
    tls: ListenerTlsIR | None = field(default=None, repr=False)
    """``protocol: https``: the listener's ``tls`` and its certificates (compiler/tls.py)."""
    redirect_port: int | None = field(default=None, repr=False)
    """``redirectToHttps``: every request gets a 301 to this port over https, nothing else."""

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
    tls_material: TlsMaterial | None = field(default=None, repr=False)
    """``tls: {caFile, certFile, keyFile}``: the CA and client certificate, sent over SDS."""
    static_client_cert: str | None = field(default=None, repr=False)
    """The name of a client certificate secret of Envoy's bootstrap (its own key, never sent)."""

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
class AuthzTls:
    """Envoys reach authplane's own decision service over TLS (``serve --authz-tls-cert``, or
    ``--authz-tls-ca`` for one running elsewhere)."""

    ca: str | None = None
    """PEM of ``--authz-tls-ca`` (sent to Envoys over SDS); None: Envoy's system trust store."""
    server_name: str | None = None
    """SNI and the SAN the service's certificate must carry (default: the address's host; an IP
    address is checked as an IP SAN, without SNI)."""
    client_cert: bool = False
    """``serve --authz-client-ca``: Envoys present their fleet certificate, the static secret
    ``authplane bootstrap --xds-client-cert`` writes (``tls.FLEET_CERT_SECRET``)."""


@dataclass(frozen=True)
class CompileOptions:
    """Addresses Envoy uses to reach authplane's own decision service, and its decision log."""

    authz_grpc: str = "127.0.0.1:9001"
    authz_http: str = "127.0.0.1:9002"
    authz_tls: AuthzTls | None = None
    """Set: the builtin clusters verify the decision service's certificate (off by default, so
    the compiled output is unchanged unless asked for)."""
    decision_log_cluster: str | None = None
    """Set (``serve --decision-log``): every listener reports each request over Envoy's gRPC
    access-log service to this cluster (authplane's own xDS cluster of the bootstrap). Off by
    default, so ``render``/``validate`` output is unchanged unless asked for."""
    decision_log_verdicts: tuple[str, ...] = ("allow", "deny", "would-deny")
    """``serve --decision-log-verdicts``: the verdicts Envoy reports; it tells them apart itself (an
    access-log filter, ``resources.decision_log``), so the others never leave Envoy."""
    decision_log_sample: float = 1.0
    """``serve --decision-log-sample``: the fraction of ``allow`` entries Envoy reports."""
    decision_log_native: bool = False
    """``serve --decision-log-transport native``: authplane's module reports the entries (its
    access logger, and its bootstrap extension of ``authplane bootstrap --native-decision-log``
    sending them in batches over the xDS cluster) instead of Envoy's gRPC access log."""


@dataclass(frozen=True)
class Env:
    """What a filter module needs besides the policy: the addresses of authplane's own decision
    service and the clusters of the fleet's Backends (a check may name one as its service)."""

    opts: CompileOptions
    backends: dict[str, ClusterIR]


@dataclass
class FleetIR:
    name: str
    listeners: list[ListenerIR] = field(default_factory=list)
    clusters: dict[str, ClusterIR] = field(default_factory=dict)
