"""Forward auth without a policy name: the route table Envoy gets, reduced to "which policy answers".

Built once per rule table from the compiler's IR (``translate.build``: the same hosts, the same
route order, the same matches as the Envoy route configuration), so a proxy in front of an app
(ingress-nginx ``auth-url``, Traefik ``forwardAuth``) gets the decision Envoy's route would. Routes
without a gateway (forward auth only) form one more table, ordered the same way. Fail
closed: an unknown host or path, a route that is public or has no builtin ``extAuth`` policy, or
one whose policies forward auth cannot run completely, is denied with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from authplane.compiler.ir import Checks, specificity
from authplane.compiler.translate import _domain_covers, build
from authplane.policy.documents import Located, PolicySet
from authplane.policy.model import AuthPolicy, RouteMatch

NATIVE_ONLY = (("api_key", "apiKey"), ("basic_auth", "basicAuth"), ("oidc", "oidc"),
               ("authorization", "authorization"))
"""Checks only Envoy runs: a route carrying one cannot be answered by forward auth alone."""


@dataclass(frozen=True, slots=True)
class Target:
    """What a route answers: the builtin policy, or why there is none (a denial)."""

    route: str
    policy: str | None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class RouteEntry:
    """One Envoy route's match, as ``resources._match`` writes it."""

    exact: str | None
    """Exact path without a trailing slash (``/x`` also matches ``/x/``); ``/`` itself is ``/``."""
    prefix: str | None
    """Path-separated prefix (``/api``: ``/api`` and ``/api/...``); ``""`` matches every path."""
    regex: str | None
    methods: frozenset[str]
    headers: tuple[tuple[str, str], ...]
    target: Target

    def matches(self, path: str, method: str, headers: dict[str, str], ignore_case: bool) -> bool:
        if self.methods and method not in self.methods:
            return False
        if any(headers.get(name) != value for name, value in self.headers):
            return False
        subject = path.lower() if ignore_case else path
        if self.exact is not None:
            want = self.exact.lower() if ignore_case else self.exact
            return subject == want or (want != "/" and subject == want + "/")
        if self.regex is not None:
            return re.fullmatch(self.regex, path, re.IGNORECASE if ignore_case else 0) is not None
        want = (self.prefix or "").lower() if ignore_case else self.prefix or ""
        return not want or subject == want or subject.startswith(want + "/")


@dataclass(frozen=True, slots=True)
class ListenerRoutes:
    name: str
    ignore_case: bool
    hosts: tuple[tuple[str, tuple[RouteEntry, ...]], ...]
    """Virtual hosts (one domain each) in the order Envoy picks them: exact, ``*.suffix`` longest
    first, then ``*``."""

    def host(self, host: str) -> tuple[RouteEntry, ...] | None:
        for domain, routes in self.hosts:
            if domain == host or domain == "*" or (domain.startswith("*.") and host.endswith(domain[1:])):
                return routes
        return None


@dataclass(frozen=True)
class RouteLookup:
    listeners: tuple[ListenerRoutes, ...] = ()

    def find(self, host: str, path: str, method: str, headers: dict[str, str]) -> Target:
        """The target of the first matching route on every listener; listeners routing the request
        to different policies make it ambiguous (denied). ``path``: normalised, query removed."""
        host = _bare_host(host)
        found: dict[Target, str] = {}
        for lst in self.listeners:
            routes = lst.host(host)
            for r in routes or ():
                if r.matches(path, method, headers, lst.ignore_case):
                    found.setdefault(r.target, lst.name)
                    break
        if not found:
            return Target("", None, "no route for this host and path (forward auth picks the policy "
                                    "from the route table Envoy gets)")
        policies = {t.policy for t in found}
        if len(policies) > 1:
            names = ", ".join(sorted(f"{lst}: {t.route}" for t, lst in found.items()))
            return Target("", None, f"listeners route this request differently ({names}): name the "
                                    "policy in the URL (/authz/<policy>)")
        return min(found, key=lambda t: (t.policy is None, t.route))


def _bare_host(host: str) -> str:
    """The host without its port, lowercase (an ``X-Original-URL`` carries the port in use)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.rpartition(":")[0] if host.count(":") == 1 else host


FORWARD_ONLY = "forward-auth"
"""The name of the table of the routes without a gateway."""


@dataclass(frozen=True, slots=True)
class Level:
    """One level's policy, as ``_target`` reads it (an IR ``Checks``, or a forward-only route's)."""

    policy: str
    level: str
    spec: AuthPolicy


def _levels(*checks: Checks | None) -> list[Level]:
    return [Level(c.policy, c.level, c.spec) for c in checks if c is not None]


def _target(name: str, public: bool, levels: list[Level], builtin: set[str], signin: set[str]) -> Target:
    """``name``: the route as ``<route>/<rule>``; ``levels``: the gateway and route policies."""
    if public:
        return Target(name, None, f"route {name} is public: forward auth answers only with a "
                                  "builtin extAuth policy")
    if not levels:
        return Target(name, None, f"route {name} has no AuthPolicy")
    for c in levels:
        if c.policy not in builtin:
            return Target(name, None, f"route {name}: policy {c.policy!r} ({c.level} level) has no "
                                      "builtin extAuth rules, which forward auth needs")
        native = [check for attr, check in NATIVE_ONLY if getattr(c.spec, attr) is not None
                  and not (attr == "oidc" and c.policy in signin)]
        if native:
            return Target(name, None, f"route {name}: policy {c.policy!r} also has {', '.join(native)}, "
                                      "which only Envoy runs")
    if len(levels) > 1:
        return Target(name, None, f"route {name} has builtin policies at both levels "
                                  f"({levels[0].policy!r}, {levels[1].policy!r}): name one in the URL")
    return Target(name, levels[0].policy)


def _entry(m: RouteMatch, target: Target) -> RouteEntry:
    exact = m.path.rstrip("/") or "/" if m.path is not None else None
    prefix = None if exact is not None or m.path_regex is not None else (m.path_prefix or "/").rstrip("/")
    return RouteEntry(exact, prefix, m.path_regex, frozenset(m.methods),
                      tuple(sorted((k.lower(), v) for k, v in m.headers.items())), target)


def _order(domain: str) -> tuple[int, int, str]:
    """Envoy's virtual host search order: exact, then suffix wildcards longest first, then ``*``."""
    if domain == "*":
        return (2, 0, domain)
    return (1, -len(domain), domain) if domain.startswith("*") else (0, 0, domain)


def _forward_only(p: PolicySet, builtin: set[str], signin: set[str]) -> ListenerRoutes | None:
    """The routes without a gateway as one more listener: hosts and route order as ``translate``
    gives Envoy's (a host's routes are those of every hostname covering it, most specific first)."""
    policy_for: dict[tuple[str, str | None], Located[AuthPolicy]] = {
        (x.resource.spec.target_ref.name, x.resource.spec.target_ref.rule): x for x in p.auth_policies.values()
        if x.resource.spec.target_ref.kind == "Route"}
    routes: list[tuple[tuple[tuple[int, ...], str], list[str], RouteEntry]] = []  # (sort key, hosts, entry)
    for route in p.routes.values():
        spec = route.resource.spec
        if spec.gateway is not None:
            continue
        for rule, rule_name in zip(spec.rules, spec.rule_names(), strict=True):
            pol = (policy_for.get((route.name, rule.name)) if rule.name else None) or policy_for.get((route.name, None))
            public = pol is not None and pol.resource.spec.public
            levels = [Level(pol.name, "route", pol.resource.spec)] if pol and not public else []
            name = f"{route.name}/{rule_name}"
            entry = _entry(rule.match, _target(name, public, levels, builtin, signin))
            routes.append(((specificity(rule.match), name), [h.lower() for h in spec.hostnames], entry))
    if not routes:
        return None
    routes.sort(key=lambda r: r[0])
    hosts = []
    for domain in sorted({h for _, names, _ in routes for h in names}, key=_order):
        hosts.append((domain, tuple(e for _, names, e in routes if any(_domain_covers(h, domain) for h in names))))
    return ListenerRoutes(FORWARD_ONLY, False, tuple(hosts))


def route_lookup(p: PolicySet, builtin: set[str], signin: set[str] | None = None) -> RouteLookup:
    """The lookup table of every fleet's listeners and of the routes without a gateway;
    ``builtin``: the policies with builtin rules; ``signin``: those whose ``oidc`` the decision
    service runs itself (``/oauth2/*``)."""
    signin = signin or set()
    listeners = []
    for fleet in build(p).values():
        for lst in fleet.listeners:
            hosts = tuple((vh.name.lower(), tuple(
                _entry(r.match, _target(r.name, r.public, _levels(lst.checks, r.checks), builtin, signin))
                for r in vh.routes))
                for vh in sorted(lst.virtual_hosts, key=lambda v: _order(v.name.lower())))
            listeners.append(ListenerRoutes(f"{fleet.name}:{lst.name}", not lst.case_sensitive, hosts))
    forward_only = _forward_only(p, builtin, signin)
    return RouteLookup(tuple(listeners) + ((forward_only,) if forward_only else ()))
