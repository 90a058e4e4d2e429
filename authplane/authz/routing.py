"""Forward auth without a policy name: the route table Envoy gets, reduced to "which policy answers".

Built once per rule table from the compiler's IR (``translate.build``: the same hosts, the same
route order, the same matches as the Envoy route configuration), so a proxy in front of an app
(ingress-nginx ``auth-url``, Traefik ``forwardAuth``) gets the decision Envoy's route would. Fail
closed: an unknown host or path, a route that is public or has no builtin ``extAuth`` policy, or
one whose policies forward auth cannot run completely, is denied with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from authplane.compiler.ir import Checks, ListenerIR, RouteIR
from authplane.compiler.translate import build
from authplane.policy.documents import PolicySet

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


def _target(lst: ListenerIR, r: RouteIR, builtin: set[str], signin: set[str]) -> Target:
    if r.public:
        return Target(r.name, None, f"route {r.name} is public: forward auth answers only with a "
                                    "builtin extAuth policy")
    levels: list[Checks] = [c for c in (lst.checks, r.checks) if c is not None]
    if not levels:
        return Target(r.name, None, f"route {r.name} has no AuthPolicy")
    for c in levels:
        if c.policy not in builtin:
            return Target(r.name, None, f"route {r.name}: policy {c.policy!r} ({c.level} level) has no "
                                        "builtin extAuth rules, which forward auth needs")
        native = [name for attr, name in NATIVE_ONLY if getattr(c.spec, attr) is not None
                  and not (attr == "oidc" and c.policy in signin)]
        if native:
            return Target(r.name, None, f"route {r.name}: policy {c.policy!r} also has {', '.join(native)}, "
                                        "which only Envoy runs")
    if len(levels) > 1:
        return Target(r.name, None, f"route {r.name} has builtin policies at both levels "
                                    f"({levels[0].policy!r}, {levels[1].policy!r}): name one in the URL")
    return Target(r.name, levels[0].policy)


def _entry(r: RouteIR, target: Target) -> RouteEntry:
    m = r.match
    exact = m.path.rstrip("/") or "/" if m.path is not None else None
    prefix = None if exact is not None or m.path_regex is not None else (m.path_prefix or "/").rstrip("/")
    return RouteEntry(exact, prefix, m.path_regex, frozenset(m.methods),
                      tuple(sorted((k.lower(), v) for k, v in m.headers.items())), target)


def _order(domain: str) -> tuple[int, int, str]:
    """Envoy's virtual host search order: exact, then suffix wildcards longest first, then ``*``."""
    if domain == "*":
        return (2, 0, domain)
    return (1, -len(domain), domain) if domain.startswith("*") else (0, 0, domain)


def route_lookup(p: PolicySet, builtin: set[str], signin: set[str] | None = None) -> RouteLookup:
    """The lookup table of every fleet's listeners; ``builtin``: the policies with builtin rules;
    ``signin``: those whose ``oidc`` the decision service runs itself (``/oauth2/*``)."""
    listeners = []
    for fleet in build(p).values():
        for lst in fleet.listeners:
            hosts = tuple((vh.name.lower(), tuple(_entry(r, _target(lst, r, builtin, signin or set()))
                                                  for r in vh.routes))
                          for vh in sorted(lst.virtual_hosts, key=lambda v: _order(v.name.lower())))
            listeners.append(ListenerRoutes(f"{fleet.name}:{lst.name}", not lst.case_sensitive, hosts))
    return RouteLookup(tuple(listeners))
