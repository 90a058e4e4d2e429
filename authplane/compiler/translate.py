"""Policy model → IR: attach policies to their level, order routes, collect the routes' backends.

Reads only the loaded policies (``PolicySet.resolved`` holds what their referenced files gave):
no I/O. What a check compiles to is the business of its filter module (``filters/``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from typing import Any

from authplane.addresses import split_address
from authplane.compiler.filters import ORDER
from authplane.compiler.ir import (
    Checks,
    ClusterIR,
    CompileOptions,
    Env,
    FleetIR,
    ListenerIR,
    ListenerTlsIR,
    Origin,
    RouteIR,
    VirtualHostIR,
    specificity,
)
from authplane.policy.documents import Located, PolicySet, Resolved, TlsMaterial
from authplane.policy.model import AuthPolicy, Backend


def origin(item: Located[Any]) -> Origin:
    return Origin(item.resource.kind, item.name, item.source.path, item.source.line, item.source.col)


def _checks(p: PolicySet, pol: Located[AuthPolicy], level: str) -> Checks | None:
    if pol.resource.spec.public:
        return None
    return Checks(pol.name, level, origin(pol), pol.resource.spec, p.resolved.get(pol.name, Resolved()))


def _cluster(item: Located[Backend], p: PolicySet) -> ClusterIR:
    spec = item.resource.spec
    sni = spec.sni if isinstance(spec.tls, bool) else spec.tls.sni or spec.sni
    return ClusterIR(item.name, tuple(split_address(e) for e in spec.endpoints), spec.protocol == "http2",
                     spec.connect_timeout, bool(spec.tls), sni, origin(item),
                     tls_material=p.backend_tls.get(item.name))


def _domain_covers(pattern: str, domain: str) -> bool:
    """Whether routes written for hostname ``pattern`` also serve requests for ``domain``."""
    if pattern == domain or pattern == "*":
        return True
    return pattern.startswith("*.") and domain.endswith(pattern[1:]) and domain != pattern[2:]


def fleet_inputs(p: PolicySet) -> dict[str, tuple[Any, ...]]:
    """Per fleet, everything its IR is built from: its gateways, the routes on them, the policies
    targeting either (with what resolve read for them), the backends they use, the listeners' and
    backends' TLS files. Equal inputs give byte-identical snapshots, so a reload compiles only the
    fleets whose inputs differ; documents of unchanged files are the same objects, so comparing
    mostly costs identity checks."""
    targeting: dict[tuple[str, str], list[Located[AuthPolicy]]] = defaultdict(list)
    for pol in p.auth_policies.values():
        targeting[(pol.resource.spec.target_ref.kind, pol.resource.spec.target_ref.name)].append(pol)
    on_gateway: dict[str, list[Located[Any]]] = defaultdict(list)
    for route in p.routes.values():
        on_gateway[route.resource.spec.gateway].append(route)
    parts: dict[str, list[Any]] = {}
    used: dict[str, set[str]] = defaultdict(set)
    for gw in p.gateways.values():
        fleet = gw.resource.spec.fleet
        key = parts.setdefault(fleet, [])
        key += [gw, *(p.listener_tls.get(f"{gw.name}/{lst.name}") for lst in gw.resource.spec.listeners)]
        pols = list(targeting.get(("Gateway", gw.name), ()))
        for route in on_gateway.get(gw.name, ()):
            key.append(route)
            used[fleet].update(rule.backend for rule in route.resource.spec.rules)
            pols += targeting.get(("Route", route.name), ())
        for pol in pols:
            key += [pol, p.resolved.get(pol.name)]
            if pol.resource.spec.ext_auth is not None:
                used[fleet].add(pol.resource.spec.ext_auth.service)
    for fleet, key in parts.items():
        key += [(name, p.backends.get(name), p.backend_tls.get(name)) for name in sorted(used[fleet])]
    return {fleet: tuple(key) for fleet, key in parts.items()}


def build(p: PolicySet, opts: CompileOptions | None = None, only: Collection[str] | None = None) -> dict[str, FleetIR]:
    """Every fleet named by a gateway (or those in ``only``), with its listeners, routes, checks
    and clusters."""
    env = Env(opts or CompileOptions(), {name: _cluster(b, p) for name, b in p.backends.items()})
    fleets: dict[str, FleetIR] = {}
    policy_for: dict[tuple[str, str, str | None], Located[AuthPolicy]] = {
        (x.resource.spec.target_ref.kind, x.resource.spec.target_ref.name, x.resource.spec.target_ref.rule): x
        for x in p.auth_policies.values()
    }
    for gw in p.gateways.values():
        if only is not None and gw.resource.spec.fleet not in only:
            continue
        fleet = fleets.setdefault(gw.resource.spec.fleet, FleetIR(gw.resource.spec.fleet))
        gw_pol = policy_for.get(("Gateway", gw.name, None))
        gw_checks = _checks(p, gw_pol, "gateway") if gw_pol else None
        https_port = next((x.port for x in gw.resource.spec.listeners if x.protocol == "https"), None)
        for lst in gw.resource.spec.listeners:
            name = f"{gw.name}/{lst.name}"
            if lst.redirect_to_https:  # no routes, no checks: a 301 to the https listener
                fleet.listeners.append(ListenerIR(name, gw.name, lst.address, lst.port, 0, None, (), origin(gw),
                                                  env=env, redirect_port=https_port))
                continue
            routes: list[tuple[tuple[str, ...], RouteIR]] = []
            for route in p.routes.values():
                spec = route.resource.spec
                if spec.gateway != gw.name or (spec.listeners is not None and lst.name not in spec.listeners):
                    continue
                for rule, rule_name in zip(spec.rules, spec.rule_names(), strict=True):
                    pol = (policy_for.get(("Route", route.name, rule.name)) if rule.name else None) or policy_for.get(
                        ("Route", route.name, None))
                    checks = _checks(p, pol, "route") if pol else None
                    fleet.clusters.setdefault(rule.backend, env.backends[rule.backend])
                    r = RouteIR(
                        name=f"{route.name}/{rule_name}", match=rule.match,
                        cluster=rule.backend, timeout=rule.timeout,
                        checks=checks, public=bool(pol and pol.resource.spec.public),
                        origin=origin(route), specificity=specificity(rule.match))
                    routes.append((tuple(spec.hostnames), r))
            domains = sorted({h for hosts, _ in routes for h in hosts}, key=lambda d: (d == "*", d))
            vhosts = []
            for domain in domains:
                members = [r for hosts, r in routes if any(_domain_covers(h, domain) for h in hosts)]
                members += [r for f in ORDER for r in f.extra_routes(gw_checks, members)]
                members.sort(key=lambda r: (r.specificity, r.name))
                vhosts.append(VirtualHostIR(domain, (domain,), tuple(members)))
            tls = ListenerTlsIR(lst.tls, p.listener_tls.get(name, TlsMaterial())) if lst.tls else None
            fleet.listeners.append(ListenerIR(
                name=name, gateway=gw.name, address=lst.address, port=lst.port,
                xff_num_trusted_hops=gw.resource.spec.xff_num_trusted_hops, checks=gw_checks,
                virtual_hosts=tuple(vhosts), origin=origin(gw),
                case_sensitive=gw.resource.spec.path_matching.case_sensitive,
                reject_ambiguous=gw.resource.spec.path_matching.reject_ambiguous, env=env, tls=tls))
    for fleet in fleets.values():
        fleet.listeners.sort(key=lambda x: x.name)
        fleet.clusters = dict(sorted(fleet.clusters.items()))
    return fleets

