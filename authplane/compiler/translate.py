"""Policy model → IR: resolve references, attach policies to their level, order routes."""

from __future__ import annotations

from typing import Any

from authplane.authz.rules import rules_digest
from authplane.compiler.filters.oauth2 import cookie_name
from authplane.compiler.ir import (
    ApiKeyIR,
    BasicAuthIR,
    Checks,
    ClusterIR,
    CompileOptions,
    ExtAuthIR,
    FleetIR,
    JwtIR,
    ListenerIR,
    OidcIR,
    Origin,
    RouteIR,
    VirtualHostIR,
)
from authplane.errors import CompileError
from authplane.policy.credentials import parse_htpasswd, parse_key_file, policy_file_path
from authplane.policy.loader import Item, Policies
from authplane.policy.model import AuthPolicy, Jwks, Jwt, JwtProvider, Oidc, RouteMatch, TokenSource
from authplane.policy.validate import read_jwks_file

BUILTIN_GRPC = "authplane_authz_grpc"
BUILTIN_GRPC_STREAMS = 16
BUILTIN_HTTP = "authplane_authz_http"


def origin(item: Item[Any]) -> Origin:
    return Origin(item.obj.kind, item.name, item.source.path, item.source.line, item.source.col)


def _split(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def _checks(p: Policies, pol: Item[AuthPolicy], level: str, fleet: FleetIR,
            opts: CompileOptions) -> Checks | None:
    spec = pol.obj.spec
    if spec.public:
        return None
    jwt = None
    if spec.jwt:
        files = {}
        for prov in spec.jwt.providers:
            if prov.jwks.file is not None:
                path, text = read_jwks_file(pol, prov.jwks, p.max_file_size)
                files[prov.name] = p.files.get(path, text)
        jwt = JwtIR(pol.name, spec.jwt, files)
    ext = None
    if spec.ext_auth:
        ea = spec.ext_auth
        if ea.service == "builtin":
            cluster, address = ((BUILTIN_GRPC, opts.authz_grpc) if ea.protocol == "grpc"
                                else (BUILTIN_HTTP, opts.authz_http))
            # gRPC: a few streams per connection, so Envoy's checks spread over the connections
            # (and ``--authz-workers`` processes) instead of one HTTP/2 connection per Envoy thread
            fleet.clusters.setdefault(cluster, ClusterIR(
                cluster, (_split(address),), ea.protocol == "grpc", 1.0, False, None, None,
                BUILTIN_GRPC_STREAMS if ea.protocol == "grpc" else None))
        else:
            cluster = _backend_cluster(p, ea.service, fleet)
        ref = spec.target_ref
        target = f"{ref.kind}/{ref.name}" + (f"/{ref.rule}" if ref.rule else "")
        digest = rules_digest(pol, p.files) if ea.service == "builtin" else ""
        ext = ExtAuthIR(pol.name, level, target, ea, cluster, digest)
    oidc = None
    if spec.oidc:
        found = p.oidc[pol.name]
        oidc = OidcIR(pol.name, spec.oidc, found.endpoints, found.client_secret, found.hmac_secret)
        jwt = JwtIR(pol.name, id_token_check(spec.oidc, found.endpoints.jwks), {})
    basic = api_key = None
    if spec.basic_auth:
        users, _ = parse_htpasswd(*_policy_file(p, pol, spec.basic_auth.file))
        basic = BasicAuthIR(pol.name, spec.basic_auth, "".join(f"{u.name}:{u.secret}\n" for u in users))
    if spec.api_key:
        keys, _ = parse_key_file(*_policy_file(p, pol, spec.api_key.file))
        api_key = ApiKeyIR(pol.name, spec.api_key, tuple((k.secret, k.name) for k in keys))
    return Checks(pol.name, level, origin(pol), jwt, spec.authorization, ext, basic, api_key, oidc)


def id_token_check(spec: Oidc, jwks_uri: str) -> Jwt:
    """The JWT check of the ID token cookie the oauth2 filter keeps (HMAC-protected with it): so
    authorization rules see its claims and its claims reach the upstream as headers. With
    pass-through paths the check lets requests without the cookie through (the oauth2 filter
    already sent every other one to sign in)."""
    return Jwt(required=not spec.pass_through_paths, providers=[JwtProvider(
        name="oidc", issuer=spec.issuer, audiences=[spec.client_id], jwks=Jwks(uri=jwks_uri),
        from_=[TokenSource(cookie=cookie_name(spec, "id_token"))], forward=True,
        claims_to_headers=spec.claims_to_headers)])


def _oidc_routes(gateway: Checks | None, members: list[RouteIR]) -> list[RouteIR]:
    """Routes for the callback and logout paths on a host, so the oauth2 filter that must answer
    them is enabled there whatever the user's routes match."""
    policies = [(c, None) for c in [gateway] if c is not None and c.oidc is not None and members]
    policies += [(r.checks, r) for r in members if r.checks is not None and r.checks.oidc is not None]
    out: dict[str, RouteIR] = {}
    for checks, route in policies:
        assert checks.oidc is not None
        spec = checks.oidc.spec
        for what, path in (("callback", spec.redirect_path), ("logout", spec.logout_path)):
            owner = out.get(path)
            if owner is not None and (owner.checks.policy if owner.checks else None) != (
                    route.checks.policy if route and route.checks else None):
                raise CompileError(f"{path} is the oidc {what} path of two policies on the same host "
                                   f"({checks.origin} and {owner.origin}); give one another path")
            match = RouteMatch(path=path)
            out.setdefault(path, RouteIR(
                name=f"oidc/{checks.policy}/{what}", match=match, cluster=(route or members[0]).cluster,
                timeout=None, checks=route.checks if route else None, public=False, origin=checks.origin,
                specificity=specificity(match)))
    return list(out.values())


def _policy_file(p: Policies, pol: Item[AuthPolicy], rel: str) -> tuple[str, str]:
    """(path, content) of a file a policy names, as validation read it."""
    path = policy_file_path(pol, rel)
    if path not in p.files:
        p.files[path] = p.read_text(path)
    return path, p.files[path]


def _backend_cluster(p: Policies, name: str, fleet: FleetIR) -> str:
    item = p.backends[name]
    spec = item.obj.spec
    fleet.clusters.setdefault(name, ClusterIR(
        name, tuple(_split(e) for e in spec.endpoints), spec.protocol == "http2",
        spec.connect_timeout, spec.tls, spec.sni, origin(item)))
    return name


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


def _domain_covers(pattern: str, domain: str) -> bool:
    """Whether routes written for hostname ``pattern`` also serve requests for ``domain``."""
    if pattern == domain or pattern == "*":
        return True
    return pattern.startswith("*.") and domain.endswith(pattern[1:]) and domain != pattern[2:]


def build(p: Policies, opts: CompileOptions | None = None) -> dict[str, FleetIR]:
    """Every fleet named by a gateway, with its listeners, routes, checks and clusters."""
    opts = opts or CompileOptions()
    fleets: dict[str, FleetIR] = {}
    policy_for: dict[tuple[str, str, str | None], Item[AuthPolicy]] = {
        (x.obj.spec.target_ref.kind, x.obj.spec.target_ref.name, x.obj.spec.target_ref.rule): x
        for x in p.policies.values()
    }
    for gw in p.gateways.values():
        fleet = fleets.setdefault(gw.obj.spec.fleet, FleetIR(gw.obj.spec.fleet))
        gw_pol = policy_for.get(("Gateway", gw.name, None))
        gw_checks = _checks(p, gw_pol, "gateway", fleet, opts) if gw_pol else None
        for lst in gw.obj.spec.listeners:
            routes: list[tuple[tuple[str, ...], RouteIR]] = []
            for route in p.routes.values():
                spec = route.obj.spec
                if spec.gateway != gw.name or (spec.listeners is not None and lst.name not in spec.listeners):
                    continue
                for rule, rule_name in zip(spec.rules, spec.rule_names(), strict=True):
                    pol = (policy_for.get(("Route", route.name, rule.name)) if rule.name else None) or policy_for.get(
                        ("Route", route.name, None))
                    checks = _checks(p, pol, "route", fleet, opts) if pol else None
                    r = RouteIR(
                        name=f"{route.name}/{rule_name}", match=rule.match,
                        cluster=_backend_cluster(p, rule.backend, fleet), timeout=rule.timeout,
                        checks=checks, public=bool(pol and pol.obj.spec.public),
                        origin=origin(route), specificity=specificity(rule.match))
                    routes.append((tuple(spec.hostnames), r))
            domains = sorted({h for hosts, _ in routes for h in hosts}, key=lambda d: (d == "*", d))
            vhosts = []
            for domain in domains:
                members = [r for hosts, r in routes if any(_domain_covers(h, domain) for h in hosts)]
                members += _oidc_routes(gw_checks, members)
                members.sort(key=lambda r: (r.specificity, r.name))
                vhosts.append(VirtualHostIR(domain, (domain,), tuple(members)))
            fleet.listeners.append(ListenerIR(
                name=f"{gw.name}/{lst.name}", gateway=gw.name, address=lst.address, port=lst.port,
                xff_num_trusted_hops=gw.obj.spec.xff_num_trusted_hops, checks=gw_checks,
                virtual_hosts=tuple(vhosts), origin=origin(gw),
                case_sensitive=gw.obj.spec.path_matching.case_sensitive,
                reject_ambiguous=gw.obj.spec.path_matching.reject_ambiguous))
    for fleet in fleets.values():
        fleet.listeners.sort(key=lambda x: x.name)
        fleet.clusters = dict(sorted(fleet.clusters.items()))
    return fleets

