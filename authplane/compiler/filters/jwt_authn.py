"""envoy.filters.http.jwt_authn: one instance per listener holding every provider.

Requirements are named per policy; a route with both a gateway-level and a route-level JWT
section gets ``requires_all`` of both, set per route in RDS (``PerRouteConfig.requirement_name``),
and the gateway's requirement is set on each virtual host.

``mode: shadow``: the policy's requirement also accepts ``allow_missing_or_failed``, so a missing
or failed token passes; its providers write a failure to ``failed_status_in_metadata``
(``contract.JWT_FAILURE_KEY``), and a recorder (``rbac.shadow_recorder``) right after the filter
notes a would-deny when no verified payload is in the metadata. Native in Envoy, no extra cost;
with an enforcing gateway JWT as well, the gateway's verified payload also satisfies the route's
recorder (one ``jwt_payload`` key for all providers).

The verified payload is written to the dynamic metadata (``payload_in_metadata``) only by the
providers of a policy some check on one of its routes reads it from (``reads_payload``): copying
the payload into every request's metadata is most of a cached token's cost in Envoy
(``bench/datapath.py``). ``serve --decision-log`` keeps it everywhere (the log names ``sub``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from envoy.config.core.v3 import http_uri_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from google.protobuf import empty_pb2

from authplane.compiler.filters.base import Filter, Needs, PerFilterConfig, http_filter, uri_cluster
from authplane.compiler.filters.oauth2 import id_token_check
from authplane.compiler.filters.rbac import metadata_present, recorder_name, shadow_record, shadow_recorder
from authplane.compiler.ir import LEVELS, Checks, ListenerIR, RouteIR
from authplane.compiler.protos import duration, pack
from authplane.compiler.satisfy import Variant, expand, is_any, variant_of
from authplane.contract import JWT_FAILURE_KEY, JWT_FILTER, JWT_PAYLOAD_KEY, MODE_SHADOW
from authplane.policy.model import Jwt


@dataclass(frozen=True)
class JwtCheck:
    """One policy's JWT check: its ``jwt`` section, or with ``oidc`` the check of the ID token."""

    policy: str
    spec: Jwt
    jwks_files: dict[str, str]
    """provider name → JWKS file content (providers with ``jwks.file``)."""
    shadow: bool = False
    """``mode: shadow``: missing or failed tokens pass (``allow_missing_or_failed``), the failure
    is recorded (``failed_status_in_metadata``) and the recorder notes the would-deny."""


def jwt_check(checks: Checks | None) -> JwtCheck | None:
    if checks is None:
        return None
    if checks.spec.oidc is not None:
        return JwtCheck(checks.policy, id_token_check(checks), {})
    if checks.spec.jwt is not None:
        return JwtCheck(checks.policy, checks.spec.jwt, checks.resolved.jwks, checks.spec.mode == MODE_SHADOW)
    return None


def provider_name(policy: str, provider: str) -> str:
    return f"{policy}/{provider}"


def _requirement(ir: JwtCheck) -> jwt.JwtRequirement:
    names = [provider_name(ir.policy, p.name) for p in ir.spec.providers]
    if len(names) == 1 and ir.spec.required and not ir.shadow:
        return jwt.JwtRequirement(provider_name=names[0])
    reqs = [jwt.JwtRequirement(provider_name=n) for n in names]
    if ir.shadow:
        reqs.append(jwt.JwtRequirement(allow_missing_or_failed=empty_pb2.Empty()))
    elif not ir.spec.required:
        reqs.append(jwt.JwtRequirement(allow_missing=empty_pb2.Empty()))
    return jwt.JwtRequirement(requires_any=jwt.JwtRequirementOrList(requirements=reqs))


def _variant_requirement(lst: ListenerIR, route: RouteIR, v: Variant) -> tuple[str, jwt.JwtRequirement] | None:
    """On a ``satisfy: any`` variant, a level's JWT is required only where its other credentials
    are absent; elsewhere it is ``allow_missing`` (``<policy>?``): a presented token is verified."""
    parts = []
    for checks in (lst.checks, route.checks):
        ir = jwt_check(checks)
        if checks is None or ir is None:
            continue
        if is_any(checks) and checks.level not in v.jwt_required:
            optional = replace(ir, spec=ir.spec.model_copy(update={"required": False}))
            parts.append((f"{ir.policy}?", _requirement(optional)))
        else:
            parts.append((ir.policy, _requirement(ir)))
    if len(parts) < 2:
        return parts[0] if parts else None
    return "+".join(n for n, _ in parts), jwt.JwtRequirement(requires_all=jwt.JwtRequirementAndList(
        requirements=[r for _, r in parts]))


def _route_requirement(lst: ListenerIR, route: RouteIR) -> tuple[str, jwt.JwtRequirement] | None:
    v = variant_of(route)
    if v is not None:
        return None if v.challenges else _variant_requirement(lst, route, v)
    gw = jwt_check(lst.checks)
    rt = jwt_check(route.checks)
    if gw and rt:
        both = jwt.JwtRequirement(requires_all=jwt.JwtRequirementAndList(
            requirements=[_requirement(gw), _requirement(rt)]))
        return f"{gw.policy}+{rt.policy}", both
    if rt:
        return rt.policy, _requirement(rt)
    return None


def reads_payload(checks: Checks) -> bool:
    """Whether a level's checks read the verified JWT payload from the dynamic metadata: claim,
    scope or CEL conditions, an extAuth service (sent the payload), a shadow JWT check's recorder."""
    spec = checks.spec
    rules = spec.authorization.rules if spec.authorization else []
    return (spec.ext_auth is not None or (spec.mode == MODE_SHADOW and spec.jwt is not None)
            or any(r.when.uses_jwt() or any(c.cel is not None for c in r.when.nested()) for r in rules))


def _payload_policies(lst: ListenerIR) -> set[str]:
    """The policies whose providers write the payload: those whose JWT check applies on a route
    (or the gateway level) where a check reads it; every one with the decision log."""
    irs = _jwts(lst)
    if lst.env.opts.decision_log_cluster:
        return {ir.policy for ir in irs}
    keep: set[str] = set()
    levels = [[lst.checks] if lst.checks else []]
    levels += [[c for c in (lst.checks, r.checks) if c] for vh in lst.virtual_hosts for r in vh.routes
               if not r.public]
    for applied in levels:
        if any(reads_payload(c) for c in applied):
            keep.update(ir.policy for c in applied if (ir := jwt_check(c)) is not None)
    return keep


def _provider(ir: JwtCheck, name: str, payload: bool = True) -> jwt.JwtProvider:
    prov = next(p for p in ir.spec.providers if p.name == name)
    out = jwt.JwtProvider(
        issuer=prov.issuer or "", audiences=prov.audiences, forward=prov.forward,
        payload_in_metadata=JWT_PAYLOAD_KEY if payload else "", clock_skew_seconds=round(prov.clock_skew),
        claim_to_headers=[jwt.JwtClaimToHeader(header_name=h, claim_name=c)
                          for c, h in sorted(prov.claims_to_headers.items())],
    )
    if ir.shadow:
        out.failed_status_in_metadata = JWT_FAILURE_KEY
    if prov.cache_size:
        out.jwt_cache_config.jwt_cache_size = prov.cache_size
    for src in prov.from_:
        if src.header:
            out.from_headers.append(jwt.JwtHeader(name=src.header, value_prefix=src.prefix or ""))
        elif src.cookie:
            out.from_cookies.append(src.cookie)
        elif src.query:
            out.from_params.append(src.query)
    jwks = prov.jwks
    if jwks.uri:
        remote = out.remote_jwks
        remote.http_uri.CopyFrom(http_uri_pb2.HttpUri(
            uri=jwks.uri, cluster=uri_cluster(jwks.uri).name, timeout=duration(jwks.timeout)))
        remote.cache_duration.CopyFrom(duration(jwks.cache_duration))
        remote.async_fetch.SetInParent()  # fetch at start-up and refresh in the background
        remote.retry_policy.num_retries.value = 3
    elif jwks.inline is not None:
        out.local_jwks.inline_string = json.dumps(jwks.inline, sort_keys=True, separators=(",", ":"))
    else:
        out.local_jwks.inline_string = ir.jwks_files[name]
    return out


def _record(checks: Checks, ir: JwtCheck) -> PerFilterConfig:
    """A shadow JWT check's recorder: would-deny unless a verified payload is in the metadata."""
    if not ir.shadow:
        return {}
    verified = metadata_present(JWT_FILTER, JWT_PAYLOAD_KEY)
    return {recorder_name("jwt", checks.level): shadow_record("jwt", checks, verified)}


def _jwts(lst: ListenerIR) -> list[JwtCheck]:
    return [j for j in map(jwt_check, lst.all_checks()) if j is not None]


class JwtAuthn(Filter):
    prefix = JWT_FILTER

    def http_filters(self, lst: ListenerIR) -> list[hcm.HttpFilter]:
        irs = _jwts(lst)
        if not irs:
            return []
        cfg = jwt.JwtAuthentication()
        payload = _payload_policies(lst)
        for ir in irs:
            for prov in ir.spec.providers:
                cfg.providers[provider_name(ir.policy, prov.name)].CopyFrom(
                    _provider(ir, prov.name, ir.policy in payload))
        gw = jwt_check(lst.checks)
        if gw:
            cfg.requirement_map[gw.policy].CopyFrom(_requirement(gw))
        for vh in lst.virtual_hosts:
            for r in (x for route in vh.routes for x in expand(lst, route)):
                req = None if r.public else _route_requirement(lst, r)
                if req:
                    cfg.requirement_map[req[0]].CopyFrom(req[1])
        recorders = [shadow_recorder(recorder_name("jwt", lvl)) for lvl in LEVELS
                     if any(ir.shadow and c.level == lvl for c in lst.all_checks() if (ir := jwt_check(c)))]
        return [http_filter(self.name(), cfg), *recorders]

    def vhost_config(self, lst: ListenerIR) -> PerFilterConfig:
        gw = jwt_check(lst.checks)
        if lst.checks is None or gw is None:
            return {}
        return {self.name(): pack(jwt.PerRouteConfig(requirement_name=gw.policy)), **_record(lst.checks, gw)}

    def route_config(self, lst: ListenerIR, route: RouteIR) -> PerFilterConfig:
        req = _route_requirement(lst, route)
        rt = jwt_check(route.checks)
        out = _record(route.checks, rt) if route.checks and rt else {}
        return {self.name(): pack(jwt.PerRouteConfig(requirement_name=req[0])), **out} if req else out

    def resources(self, lst: ListenerIR) -> Needs:
        return Needs(clusters=tuple(uri_cluster(p.jwks.uri) for ir in _jwts(lst) for p in ir.spec.providers
                                    if p.jwks.uri))


FILTER = JwtAuthn()
