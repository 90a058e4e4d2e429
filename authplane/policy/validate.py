"""Checks across documents: references, one policy per target, files the policies read."""

from __future__ import annotations

import difflib
import json
import os
from collections import defaultdict
from typing import Any

from authplane.errors import Problem
from authplane.policy.loader import Item, Policies
from authplane.policy.model import AuthPolicy, Jwks

_JWK_MEMBERS = {"RSA": ("n", "e"), "EC": ("crv", "x", "y"), "oct": ("k",), "OKP": ("crv", "x")}


def usable_keys(jwks: Any) -> str | None:
    """None when ``jwks`` holds at least one usable key, else what is wrong."""
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        return 'expected a JWKS: a JSON object with a "keys" list'
    for key in jwks["keys"]:
        if isinstance(key, dict) and all(key.get(m) for m in _JWK_MEMBERS.get(key.get("kty"), ("?",))):
            return None
    return "no usable key (each key needs kty RSA/EC/oct/OKP and its members, e.g. n and e for RSA)"


def read_jwks_file(item: Item[AuthPolicy], jwks: Jwks) -> tuple[str, str]:
    """(absolute path, content) of a policy's JWKS file; OSError if it cannot be read."""
    assert jwks.file is not None
    path = os.path.normpath(os.path.join(os.path.dirname(item.source.path), jwks.file))
    with open(path, encoding="utf-8") as f:
        return path, f.read()


def validate(p: Policies) -> list[Problem]:
    problems: list[Problem] = []
    _gateways(p, problems)
    _routes(p, problems)
    _policies(p, problems)
    return problems


def _gateways(p: Policies, out: list[Problem]) -> None:
    bound: dict[tuple[str, int], tuple[Item[Any], int]] = {}
    for gw in p.gateways.values():
        seen: set[str] = set()
        for i, lst in enumerate(gw.obj.spec.listeners):
            if lst.name in seen:
                out.append(gw.source.problem(("spec", "listeners", i, "name"),
                                             f"duplicate listener name {lst.name!r}"))
            seen.add(lst.name)
            key = (gw.obj.spec.fleet, lst.port)
            if key in bound:
                other, j = bound[key]
                out.append(gw.source.problem(
                    ("spec", "listeners", i, "port"),
                    f"port {lst.port} is already used in fleet {key[0]!r} by Gateway "
                    f"{other.name!r} listener {j} ({other.source})"))
            else:
                bound[key] = (gw, i)


def _routes(p: Policies, out: list[Problem]) -> None:
    for route in p.routes.values():
        spec = route.obj.spec
        gw = p.gateways.get(spec.gateway)
        if gw is None:
            _missing(p, route, ("spec", "gateway"), "Gateway", spec.gateway, out)
        elif spec.listeners is not None:
            names = {lst.name for lst in gw.obj.spec.listeners}
            for i, name in enumerate(spec.listeners):
                if name not in names:
                    out.append(route.source.problem(
                        ("spec", "listeners", i),
                        f"Gateway {gw.name!r} has no listener {name!r} (it has: {', '.join(sorted(names))})"))
        seen: set[str] = set()
        for i, rule in enumerate(spec.rules):
            if rule.name in seen:
                out.append(route.source.problem(("spec", "rules", i, "name"), f"duplicate rule name {rule.name!r}"))
            seen.add(rule.name)
            if rule.backend not in p.backends:
                _missing(p, route, ("spec", "rules", i, "backend"), "Backend", rule.backend, out)


def _missing(p: Policies, item: Item[Any], path: tuple[Any, ...], kind: str, name: str,
             out: list[Problem], extra: str = "") -> None:
    """Report a dangling reference, unless the target exists but failed to load."""
    if (kind, name) in p.broken:
        return
    close = difflib.get_close_matches(name, list(p.table(kind)), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else extra
    out.append(item.source.problem(path, f"{kind} {name!r} does not exist{hint}"))


def _policies(p: Policies, out: list[Problem]) -> None:
    gateways_with_jwt = {x.obj.spec.target_ref.name for x in p.policies.values()
                         if x.obj.spec.target_ref.kind == "Gateway" and x.obj.spec.jwt}
    targets: dict[tuple[str, str, str | None], Item[AuthPolicy]] = {}
    by_route: dict[str, list[Item[AuthPolicy]]] = defaultdict(list)
    for pol in p.policies.values():
        spec = pol.obj.spec
        ref = spec.target_ref
        src = pol.source
        table = p.gateways if ref.kind == "Gateway" else p.routes
        if ref.name not in table:
            _missing(p, pol, ("spec", "targetRef", "name"), ref.kind, ref.name, out)
        elif ref.rule is not None and ref.rule not in {r.name for r in p.routes[ref.name].obj.spec.rules}:
            out.append(src.problem(("spec", "targetRef", "rule"), f"Route {ref.name!r} has no rule {ref.rule!r}"))
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
        if spec.public:
            if ref.kind == "Gateway":
                out.append(src.problem(("spec", "public"), "public: true is only allowed on a Route target"))
            elif spec.jwt or spec.authorization or spec.ext_auth:
                out.append(src.problem(("spec", "public"),
                                       "public: true turns every check off; remove jwt, authorization and extAuth"))
        elif not (spec.jwt or spec.authorization or spec.ext_auth):
            out.append(src.problem(("spec",), "the policy has no check: set jwt, authorization, extAuth or public"))
        if spec.jwt:
            _jwt(p, pol, out)
        if spec.authorization:
            _names(pol, ("spec", "authorization", "rules"), spec.authorization.rules, out)
            route = p.routes.get(ref.name) if ref.kind == "Route" else None
            gateway_jwt = route is not None and route.obj.spec.gateway in gateways_with_jwt
            if any(r.when.claims for r in spec.authorization.rules) and not (spec.jwt or gateway_jwt):
                out.append(src.problem(("spec", "authorization"),
                                       "claims conditions need a jwt section in this policy or on the gateway"))
        if spec.ext_auth:
            _ext_auth(p, pol, out)
    for route_name, pols in by_route.items():
        whole = [x for x in pols if x.obj.spec.target_ref.rule is None]
        parts = [x for x in pols if x.obj.spec.target_ref.rule is not None]
        if whole and parts:
            for part in parts:
                out.append(part.source.problem(
                    ("spec", "targetRef", "rule"),
                    f"Route {route_name!r} already has AuthPolicy {whole[0].name!r} ({whole[0].source}) "
                    "for all its rules; split the route or move the checks into one policy"))


def _names(pol: Item[AuthPolicy], path: tuple[str, ...], things: list[Any], out: list[Problem]) -> None:
    seen: set[str] = set()
    for i, thing in enumerate(things):
        if thing.name in seen:
            out.append(pol.source.problem((*path, i, "name"), f"duplicate name {thing.name!r}"))
        seen.add(thing.name)


def _jwt(p: Policies, pol: Item[AuthPolicy], out: list[Problem]) -> None:
    jwt = pol.obj.spec.jwt
    assert jwt is not None
    _names(pol, ("spec", "jwt", "providers"), jwt.providers, out)
    for i, prov in enumerate(jwt.providers):
        where = ("spec", "jwt", "providers", i, "jwks")
        if prov.jwks.file is not None:
            try:
                path, text = read_jwks_file(pol, prov.jwks)
            except OSError as e:
                out.append(pol.source.problem((*where, "file"), f"cannot read JWKS file {prov.jwks.file!r}: "
                                                                f"{e.strerror}"))
                continue
            try:
                problem = usable_keys(json.loads(text))
            except ValueError as e:
                problem = f"not JSON ({e})"
            if problem:
                out.append(pol.source.problem((*where, "file"), f"JWKS file {prov.jwks.file!r}: {problem}"))
            else:
                p.files[path] = text
        elif prov.jwks.inline is not None:
            problem = usable_keys(prov.jwks.inline)
            if problem:
                out.append(pol.source.problem((*where, "inline"), problem))


def _ext_auth(p: Policies, pol: Item[AuthPolicy], out: list[Problem]) -> None:
    ext = pol.obj.spec.ext_auth
    assert ext is not None
    where = ("spec", "extAuth")
    if ext.service == "builtin":
        if not ext.rules:
            out.append(pol.source.problem((*where, "rules"),
                                          "service: builtin needs rules (no rule would deny every request)"))
        else:
            _names(pol, (*where, "rules"), ext.rules, out)
    else:
        if ext.service not in p.backends:
            _missing(p, pol, (*where, "service"), "Backend", ext.service, out, " (or use builtin)")
        elif ext.protocol == "grpc" and p.backends[ext.service].obj.spec.protocol != "http2":
            out.append(pol.source.problem((*where, "service"),
                                          f"gRPC ext_authz needs Backend {ext.service!r} to have protocol: http2"))
        if ext.rules is not None:
            out.append(pol.source.problem((*where, "rules"), "rules are only used with service: builtin"))
