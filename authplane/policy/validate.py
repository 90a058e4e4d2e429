"""The validate stage: checks across documents (references, one policy per target, what each
check needs from the others). Reading the files the policies name is the resolve stage's job
(``resolve.py``)."""

from __future__ import annotations

import difflib
import functools
import os
from collections import defaultdict
from typing import Any

from pydantic.alias_generators import to_camel
from pydantic.alias_generators import to_snake as _to_snake

from authplane.contract import RESERVED_HEADERS
from authplane.errors import Problem
from authplane.policy import cel, modules
from authplane.policy.documents import Located, PolicySet, Source
from authplane.policy.model import AuthorizationRule, AuthPolicy, ExtAuthRule, Route, TargetRef

to_snake = functools.cache(_to_snake)
"""``basicAuth`` → ``basic_auth``, once per name (validate asks for every check of every policy)."""

CHECKS = ("jwt", "oidc", "authorization", "basicAuth", "apiKey", "extAuth")
"""The check sections of an AuthPolicy, as written in YAML."""

def validate(p: PolicySet) -> list[Problem]:
    problems: list[Problem] = []
    _gateways(p, problems)
    _routes(p, problems)
    _policies(p, problems)
    _client_cert_rules(p)
    return problems


def _gateways(p: PolicySet, out: list[Problem]) -> None:
    bound: dict[tuple[str, int], tuple[Located[Any], int]] = {}
    for gw in p.gateways.values():
        seen: set[str] = set()
        for i, lst in enumerate(gw.resource.spec.listeners):
            if lst.name in seen:
                out.append(gw.source.problem(("spec", "listeners", i, "name"),
                                             f"duplicate listener name {lst.name!r}"))
            seen.add(lst.name)
            key = (gw.resource.spec.fleet, lst.port)
            if key in bound:
                other, j = bound[key]
                out.append(gw.source.problem(
                    ("spec", "listeners", i, "port"),
                    f"port {lst.port} is already used in fleet {key[0]!r} by Gateway "
                    f"{other.name!r} listener {j} ({other.source})"))
            else:
                bound[key] = (gw, i)
            if lst.redirect_to_https and not any(x.protocol == "https" for x in gw.resource.spec.listeners):
                out.append(gw.source.problem(("spec", "listeners", i, "redirectToHttps"),
                                             "redirectToHttps needs a protocol: https listener in the gateway"))


def _routes(p: PolicySet, out: list[Problem]) -> None:
    for route in p.routes.values():
        spec = route.resource.spec
        if spec.gateway is None:
            _forward_only_route(p, route, out)
            continue
        gw = p.gateways.get(spec.gateway)
        if "rules" not in spec.model_fields_set:
            out.append(route.source.problem(("spec", "rules"), "missing required field"))
        if gw is None:
            _missing(p, route, ("spec", "gateway"), "Gateway", spec.gateway, out)
        elif spec.listeners is not None:
            names = {lst.name for lst in gw.resource.spec.listeners}
            for i, name in enumerate(spec.listeners):
                if name not in names:
                    out.append(route.source.problem(
                        ("spec", "listeners", i),
                        f"Gateway {gw.name!r} has no listener {name!r} (it has: {', '.join(sorted(names))})"))
        seen: set[str] = set()
        for i, (rule, name) in enumerate(zip(spec.rules, spec.rule_names(), strict=True)):
            if name in seen:
                where = ("spec", "rules", i, "name") if rule.name else ("spec", "rules", i)
                derived = "" if rule.name else " (the name of this unnamed rule); name the rule"
                out.append(route.source.problem(where, f"duplicate rule name {name!r}{derived}"))
            seen.add(name)
            if rule.backend is None:
                if "rules" in spec.model_fields_set:
                    out.append(route.source.problem(("spec", "rules", i, "backend"), "missing required field"))
            elif rule.backend not in p.backends:
                _missing(p, route, ("spec", "rules", i, "backend"), "Backend", rule.backend, out)


def _forward_only_route(p: PolicySet, route: Located[Route], out: list[Problem]) -> None:
    """A route without a gateway exists for forward auth alone: what only Envoy uses (backends,
    listeners, timeouts) means it was meant for a gateway, and its policy must be one the decision
    service can answer by itself."""
    spec = route.resource.spec
    if spec.listeners is not None or any(r.backend is not None for r in spec.rules):
        out.append(route.source.problem(("spec", "gateway"), "missing required field"))
        return
    for i, rule in enumerate(spec.rules):
        if rule.timeout is not None:
            out.append(route.source.problem(("spec", "rules", i, "timeout"),
                                            "a route without a gateway (forward auth only) has no upstream "
                                            "timeout: its ingress sends the requests"))
    pols = [x for x in p.auth_policies.values() if x.resource.spec.target_ref.kind == "Route"
            and x.resource.spec.target_ref.name == route.name]
    for pol in pols:
        _forward_only_policy(route, pol, out)
    if not pols:
        p.warnings.append(route.source.problem(
            ("metadata", "name"), f"route {route.name!r} has no gateway and no AuthPolicy: forward auth "
                                  "denies every request it matches"))


ENVOY_ONLY = ("authorization", "basicAuth", "apiKey")
"""Checks only Envoy runs (the decision service runs ``jwt``, ``extAuth`` and ``oidc`` sign-in)."""


def _forward_only_policy(route: Located[Route], pol: Located[AuthPolicy], out: list[Problem]) -> None:
    spec = pol.resource.spec
    what = f"Route {route.name!r} has no gateway (forward auth only)"
    if spec.public:
        out.append(pol.source.problem(("spec", "public"), f"{what}: forward auth answers only with "
                                                          "extAuth service: builtin, never public"))
        return
    for check in ENVOY_ONLY:
        if getattr(spec, to_snake(check)) is not None:
            out.append(pol.source.problem(("spec", check), f"{what}: only Envoy runs {check}; "
                                                           "use extAuth rules (service: builtin)"))
    if spec.ext_auth is None or spec.ext_auth.service != "builtin":
        where = ("spec", "extAuth", "service") if spec.ext_auth else ("spec",)
        out.append(pol.source.problem(where, f"{what}: the decision service answers for it, which needs "
                                             "extAuth with service: builtin"))


def _missing(p: PolicySet, item: Located[Any], path: tuple[Any, ...], kind: str, name: str,
             out: list[Problem], extra: str = "") -> None:
    """Report a dangling reference, unless the target exists but failed to load."""
    if (kind, name) in p.broken:
        return
    close = difflib.get_close_matches(name, list(p.table(kind)), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else extra
    out.append(item.source.problem(path, f"{kind} {name!r} does not exist{hint}"))


def _policies(p: PolicySet, out: list[Problem]) -> None:
    gateways_with_jwt = {x.resource.spec.target_ref.name for x in p.auth_policies.values()
                         if x.resource.spec.target_ref.kind == "Gateway"
                         and (x.resource.spec.jwt or x.resource.spec.oidc)}
    targets: dict[tuple[str, str, str | None], Located[AuthPolicy]] = {}
    by_route: dict[str, list[Located[AuthPolicy]]] = defaultdict(list)
    for pol in p.auth_policies.values():
        spec = pol.resource.spec
        ref = spec.target_ref
        src = pol.source
        table = p.gateways if ref.kind == "Gateway" else p.routes
        if ref.name not in table:
            _missing(p, pol, ("spec", "targetRef", "name"), ref.kind, ref.name, out)
        elif ref.rule is not None:
            _target_rule(p.routes[ref.name], src, ref.rule, out)
        key = (ref.kind, ref.name, ref.rule)
        if key in targets:
            first = targets[key]
            out.append(src.problem(("spec", "targetRef"),
                                   f"{ref.kind} {ref.name!r}{f' rule {ref.rule!r}' if ref.rule else ''} "
                                   f"already has AuthPolicy {first.name!r} ({first.source}); "
                                   "at most one AuthPolicy per target"))
        else:
            targets[key] = pol
        if ref.kind == "Route":
            by_route[ref.name].append(pol)
        checks = [c for c in CHECKS if getattr(spec, to_snake(c)) is not None]
        if spec.public:
            if ref.kind == "Gateway":
                out.append(src.problem(("spec", "public"), "public: true is only allowed on a Route target"))
            elif checks:
                out.append(src.problem(("spec", "public"),
                                       f"public: true turns every check off; remove {', '.join(checks)}"))
        elif not checks and not spec.filters:
            out.append(src.problem(("spec",), f"the policy has no check: set {', '.join(CHECKS)} or public"))
        if spec.jwt:
            _jwt(pol, out)
        if spec.authorization:
            _names(pol, ("spec", "authorization", "rules"), spec.authorization.rules, out)
            route = p.routes.get(ref.name) if ref.kind == "Route" else None
            gateway_jwt = route is not None and route.resource.spec.gateway in gateways_with_jwt
            if any(r.when.uses_jwt() for r in spec.authorization.rules) and not (spec.jwt or spec.oidc or gateway_jwt):
                out.append(src.problem(("spec", "authorization"),
                                       f"{_jwt_kinds(spec.authorization.rules)} conditions need a jwt or oidc "
                                       "section in this policy or on the gateway"))
        if spec.oidc and spec.jwt:
            out.append(src.problem(("spec", "oidc"), "oidc checks the ID token itself; put bearer-token (jwt) "
                                                     "checks in another policy"))
        if spec.ext_auth:
            _ext_auth(p, pol, out)
        if spec.filters:
            _filters(p, pol, out)
        _satisfy(pol, out)
        route = p.routes.get(ref.name) if ref.kind == "Route" else None
        out.extend(cel.problems(pol, jwt=bool(spec.jwt or spec.oidc) or (
            route is not None and route.resource.spec.gateway in gateways_with_jwt)))
    for route_name, pols in by_route.items():
        whole = [x for x in pols if x.resource.spec.target_ref.rule is None]
        parts = [x for x in pols if x.resource.spec.target_ref.rule is not None]
        if whole and parts:
            for part in parts:
                out.append(part.source.problem(
                    ("spec", "targetRef", "rule"),
                    f"Route {route_name!r} already has AuthPolicy {whole[0].name!r} ({whole[0].source}) "
                    "for all its rules; split the route or move the checks into one policy"))


def _target_rule(route: Located[Route], src: Source, rule: str, out: list[Problem]) -> None:
    """A policy for one rule needs that rule's written name: a derived ``rule-<i>`` moves when rules
    are reordered."""
    spec = route.resource.spec
    named = [r.name for r in spec.rules if r.name]
    if rule in named:
        return
    if rule in spec.rule_names():
        line, col = route.source.at(("spec", "rules", spec.rule_names().index(rule)))
        msg = (f"Route {route.name!r} rule {rule!r} has no name of its own "
               f"({route.source.path}:{line}:{col}); "
               "give it `name:` to target it")
    else:
        msg = f"Route {route.name!r} has no rule {rule!r}"
        msg += f" (its named rules: {', '.join(named)})" if named else " (none of its rules has a name)"
    out.append(src.problem(("spec", "targetRef", "rule"), msg))


def _names(pol: Located[AuthPolicy], path: tuple[str, ...], things: list[Any], out: list[Problem]) -> None:
    seen: set[str] = set()
    for i, thing in enumerate(things):
        if thing.name in seen:
            out.append(pol.source.problem((*path, i, "name"), f"duplicate name {thing.name!r}"))
        seen.add(thing.name)


CREDENTIALS = ("jwt", "apiKey", "basicAuth")
"""The checks ``satisfy: any`` chooses among."""


def _satisfy(pol: Located[AuthPolicy], out: list[Problem]) -> None:
    """``satisfy: any`` needs two credential checks whose credentials a request carries in
    different places (the compiler tells them apart by where they are)."""
    spec = pol.resource.spec
    where = ("spec", "satisfy")
    if spec.satisfy.mode == "all":
        if spec.satisfy.method_header is not None:
            out.append(pol.source.problem(where, "methodHeader needs mode: any"))
        return
    given = [c for c in CREDENTIALS if getattr(spec, to_snake(c)) is not None]
    if len(given) < 2:
        out.append(pol.source.problem(where, f"satisfy: any needs at least two of {', '.join(CREDENTIALS)} "
                                             f"(this policy has {', '.join(given) or 'none'})"))
    if spec.oidc is not None:
        out.append(pol.source.problem(where, "satisfy: any cannot be combined with oidc (sign-in sessions)"))
    if spec.jwt is not None and not spec.jwt.required:
        out.append(pol.source.problem(("spec", "jwt", "required"),
                                      "with satisfy: any a JWT is one of the accepted credentials; "
                                      "required: false would let every request by"))
    if spec.api_key is not None:
        kind, name = spec.api_key.source
        jwt_sources = {("header", s.header) if s.header else ("query", s.query) if s.query else ("cookie", s.cookie)
                       for p in (spec.jwt.providers if spec.jwt else []) for s in p.from_}
        if spec.jwt is not None and any(not p.from_ for p in spec.jwt.providers):
            jwt_sources |= {("header", "authorization"), ("query", "access_token")}
        if (kind, name) == ("header", "authorization") or (kind, name) in jwt_sources:
            out.append(pol.source.problem(("spec", "apiKey"),
                                          f"with satisfy: any the API key needs a {kind} of its own "
                                          f"({name!r} also carries another credential)"))


def _filters(p: PolicySet, pol: Located[AuthPolicy], out: list[Problem]) -> None:
    """Unique names; each module file exists and is a shared object for this Envoy's ABI; an entry
    turned off names one of its gateway's."""
    filters = pol.resource.spec.filters
    _names(pol, ("spec", "filters"), filters, out)
    base = os.path.dirname(pol.source.path)
    ref = pol.resource.spec.target_ref
    route = p.routes.get(ref.name) if ref.kind == "Route" else None
    gw_name = route.resource.spec.gateway if route else None
    gateway = TargetRef(kind="Gateway", name=gw_name) if gw_name else None
    inherited = {f.name for x in p.auth_policies.values() if gateway and x.resource.spec.target_ref == gateway
                 for f in x.resource.spec.filters}
    for i, f in enumerate(filters):
        why = modules.filter_problems(f, base)
        if why:
            out.append(pol.source.problem(("spec", "filters", i, "module"), why))
        if not f.enabled and f.name not in inherited:
            out.append(pol.source.problem(("spec", "filters", i, "enabled"),
                                          f"enabled: false turns off a gateway-level filter, and the gateway's "
                                          f"policy has no filter {f.name!r}"))


def _native(pol: Located[AuthPolicy], out: list[Problem]) -> None:
    """``extAuth.engine: native``: rules the module can decide, and the module is here."""
    spec = pol.resource.spec
    ext = spec.ext_auth
    assert ext is not None
    where = ("spec", "extAuth")
    if ext.service != "builtin":
        out.append(pol.source.problem((*where, "engine"), "engine: native runs builtin rules (service: builtin)"))
        return
    for path, what in modules.native_obstacles(ext, spec.mode == "shadow"):
        out.append(pol.source.problem((*where, *path) if path else ("spec", "mode"),
                                      f"engine: native cannot decide {what}; use engine: service"))
    why = modules.native_unavailable()
    if why:
        out.append(pol.source.problem((*where, "engine"), why))


def _jwt(pol: Located[AuthPolicy], out: list[Problem]) -> None:
    jwt = pol.resource.spec.jwt
    assert jwt is not None
    _names(pol, ("spec", "jwt", "providers"), jwt.providers, out)


def _ext_auth(p: PolicySet, pol: Located[AuthPolicy], out: list[Problem]) -> None:
    ext = pol.resource.spec.ext_auth
    assert ext is not None
    where = ("spec", "extAuth")
    if ext.engine == "native":
        _native(pol, out)
    elif ext.engine == "auto" and ext.service != "builtin":
        out.append(pol.source.problem((*where, "engine"), "engine: auto runs builtin rules (service: builtin)"))
    if ext.service == "builtin":
        for name in ("path_prefix", "headers_to_upstream"):
            if getattr(ext, name):
                out.append(pol.source.problem((*where, to_camel(name)),
                                              "only used with your own HTTP service (Backend)"))
        if not ext.rules:
            out.append(pol.source.problem((*where, "rules"),
                                          "service: builtin needs rules (no rule would deny every request)"))
        else:
            _names(pol, (*where, "rules"), ext.rules, out)
            _builtin_rules(p, pol, out)
    else:
        if ext.service not in p.backends:
            _missing(p, pol, (*where, "service"), "Backend", ext.service, out, " (or use builtin)")
        elif ext.protocol == "grpc" and p.backends[ext.service].resource.spec.protocol != "http2":
            out.append(pol.source.problem((*where, "service"),
                                          f"gRPC ext_authz needs Backend {ext.service!r} to have protocol: http2"))
        for name in ("rules", "api_keys"):
            if getattr(ext, name) is not None:
                out.append(pol.source.problem((*where, to_camel(name)),
                                              f"{to_camel(name)} are only used with service: builtin"))


_NATIVE_DENY = ExtAuthRule.model_fields["deny"].default


def _jwt_kinds(rules: list[AuthorizationRule] | list[ExtAuthRule]) -> str:
    """``claims`` or ``scopes``: what the rules read from the JWT, for a message."""
    return "claims" if any(c.claims for r in rules for c in r.when.nested()) else "scopes"


def _builtin_rules(p: PolicySet, pol: Located[AuthPolicy], out: list[Problem]) -> None:
    ext = pol.resource.spec.ext_auth
    assert ext is not None and ext.rules is not None
    where = ("spec", "extAuth", "rules")
    for i, rule in enumerate(ext.rules):
        for depth, when in enumerate(rule.when.nested()):
            at = (*where, i, "when", *("not",) * depth)
            for header in when.headers:
                if header in RESERVED_HEADERS:
                    out.append(pol.source.problem((*at, "headers"),
                                                  f"{header} is set by Envoy for the decision service; "
                                                  "use sourceCIDRs or claims"))
            if when.api_keys and ext.api_keys is None:  # the clients are checked by resolve.py
                out.append(pol.source.problem((*at, "apiKeys"),
                                              "apiKeys conditions need extAuth.apiKeys (the key file)"))
    if any(r.when.uses_jwt() for r in ext.rules) and not (pol.resource.spec.jwt or pol.resource.spec.oidc):
        ref = pol.resource.spec.target_ref
        route = p.routes.get(ref.name) if ref.kind == "Route" else None
        gw_name = route.resource.spec.gateway if route else None
        gateway = TargetRef(kind="Gateway", name=gw_name) if gw_name else None
        if gateway is None or not any(
                x.resource.spec.jwt and x.resource.spec.target_ref == gateway for x in p.auth_policies.values()):
            out.append(pol.source.problem(where, f"{_jwt_kinds(ext.rules)} conditions need a jwt section in "
                                                 "this policy or on the gateway"))
    native = all(
        not (any(c.api_keys or c.authenticated is not None for c in r.when.nested()) or r.upstream_headers
             or r.remove_headers or r.response_headers) and r.deny == _NATIVE_DENY
        for r in ext.rules)
    ref = pol.resource.spec.target_ref
    forward_only = ref.kind == "Route" and ref.name in p.routes and p.routes[ref.name].resource.spec.gateway is None
    if native and not ext.api_keys and not forward_only:  # a forward-only route has no Envoy to run them
        p.warnings.append(pol.source.problem(
            where, "these rules only use what native `authorization` rules can express (claims, "
                   "headers, sourceCIDRs, methods, paths; 403 on deny): native rules keep ~88% of "
                   "Envoy's throughput, a decision service call costs far more "
                   "(see docs/decision-service.md)"))


def _client_cert_rules(p: PolicySet) -> None:
    """Warn about ``clientCert`` rules that can never match: no listener of the gateway the policy
    applies to verifies client certificates."""
    for pol in p.auth_policies.values():
        spec = pol.resource.spec
        rules = spec.authorization.rules if spec.authorization else []
        uses = [i for i, r in enumerate(rules) if any(c.client_cert for c in r.when.nested())]
        ref = spec.target_ref
        route = p.routes.get(ref.name) if ref.kind == "Route" else None
        gateway = p.gateways.get(route.resource.spec.gateway if route else ref.name)
        if not uses or gateway is None or (ref.kind == "Route" and route is None):
            continue
        names = route.resource.spec.listeners if route else None
        if not any(lst.tls and lst.tls.client_validation for lst in gateway.resource.spec.listeners
                   if names is None or lst.name in names):
            p.warnings.append(pol.source.problem(
                ("spec", "authorization", "rules", uses[0], "when"),
                f"clientCert conditions never match: no listener of Gateway {gateway.name!r} this policy "
                "applies to has tls.clientValidation"))
