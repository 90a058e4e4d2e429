"""``authplane validate --report``: per fleet, listener, host and route (in the order Envoy tries
them, from the IR ``translate.build`` gives the Envoy translators), the checks each level applies
with their ``file:line``, and whether a request without any credential gets through."""

from __future__ import annotations

from authplane.compiler.filters.dynamic_module import native
from authplane.compiler.ir import Checks, FleetIR, ListenerIR, RouteIR
from authplane.policy.documents import PolicySet
from authplane.policy.lint import Verdict, anonymous, combine
from authplane.policy.model import RouteMatch

SECTIONS = (("jwt", "jwt"), ("api_key", "apiKey"), ("basic_auth", "basicAuth"), ("oidc", "oidc"),
            ("authorization", "authorization"), ("ext_auth", "extAuth"))


def _match(m: RouteMatch) -> str:
    if m.path is not None:
        out = f"path {m.path}"
    elif m.path_regex is not None:
        out = f"pathRegex {m.path_regex}"
    else:
        out = f"pathPrefix {m.path_prefix or '/'}"
    if m.methods:
        out += f" methods {','.join(m.methods)}"
    for name, value in sorted(m.headers.items()):
        out += f" header {name}={value}"
    return out


def _section(name: str, checks: Checks) -> str:
    spec = checks.spec
    if name == "jwt" and spec.jwt is not None:
        return "jwt" + ("" if spec.jwt.required else " (optional)")
    if name == "authorization" and spec.authorization is not None:
        a = spec.authorization
        return f"authorization (default {a.default}, {len(a.rules)} rule{'' if len(a.rules) == 1 else 's'})"
    if name == "extAuth" and spec.ext_auth is not None:
        ext = spec.ext_auth
        where = "; decided in Envoy by the native module" if native(checks) else ""
        if ext.engine == "auto" and not native(checks):
            where = f"; engine auto: decided by the decision service: {checks.resolved.engine_reason}"
        return f"extAuth {ext.service}" + (f" ({len(ext.rules)} rules{where})" if ext.rules else "")
    return name


def _checks(p: PolicySet, checks: Checks) -> str:
    item = p.auth_policies.get(checks.policy)
    parts = []
    for attr, name in SECTIONS:
        if getattr(checks.spec, attr) is None:
            continue
        where = ""
        if item is not None:
            line, _ = item.source.at(("spec", name), key=True)
            where = f" {item.source.path}:{line}"
        parts.append(_section(name, checks) + where)
    if checks.spec.satisfy.mode == "any":
        parts.append("satisfy any")
    if checks.spec.filters:  # dynamic modules (compiler/filters/dynamic_module.py)
        parts.append("filters " + ", ".join(f"{f.name} ({f.place})" if f.enabled else f"{f.name} (off)"
                                            for f in checks.spec.filters))
    o = checks.origin
    return f"AuthPolicy {checks.policy} ({o.path}:{o.line}): " + (", ".join(parts) or "no checks")


def route_anonymous(lst: ListenerIR, r: RouteIR) -> tuple[Verdict, str]:
    """Whether the route takes requests with no credential, both levels considered."""
    if r.public:
        return "yes", "public"
    levels = [c for c in (lst.checks, r.checks) if c is not None]
    return combine([anonymous(c.spec) for c in levels])


def _public(p: PolicySet, r: RouteIR) -> str:
    route, _, rule = r.name.partition("/")
    for x in sorted(p.auth_policies.values(), key=lambda x: x.resource.spec.target_ref.rule is None):
        ref = x.resource.spec.target_ref
        if x.resource.spec.public and ref.kind == "Route" and ref.name == route and ref.rule in (rule, None):
            line, _ = x.source.at(("spec", "public"), key=True)
            return f"AuthPolicy {x.name} ({x.source.path}:{line}): public (every check off)"
    return "public (every check off)"


def report(p: PolicySet, fleets: dict[str, FleetIR]) -> str:
    lines: list[str] = []
    for fleet in fleets.values():
        lines.append(f"fleet {fleet.name}")
        for lst in fleet.listeners:
            lines.append(f"  listener {lst.name} ({lst.address}:{lst.port})")
            for vh in lst.virtual_hosts:
                lines.append(f"    host {vh.name}")
                for r in vh.routes:
                    lines.append(f"      route {r.name}: {_match(r.match)} -> {r.cluster} "
                                 f"({r.origin.path}:{r.origin.line})")
                    gw = "off (public)" if r.public and lst.checks else (
                        _checks(p, lst.checks) if lst.checks else "none")
                    lines.append(f"        gateway: {gw}")
                    level = _public(p, r) if r.public else _checks(p, r.checks) if r.checks else "none"
                    lines.append(f"        route: {level}")
                    verdict, why = route_anonymous(lst, r)
                    lines.append(f"        anonymous: {verdict} ({why})")
    return "\n".join(lines) + "\n"
