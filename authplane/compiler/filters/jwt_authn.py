"""envoy.filters.http.jwt_authn: one instance per listener holding every provider.

Requirements are named per policy; a route with both a gateway-level and a route-level JWT
section gets ``requires_all`` of both, set per route in RDS (``PerRouteConfig.requirement_name``),
and the gateway's requirement is set on each virtual host.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from envoy.config.core.v3 import http_uri_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from google.protobuf import any_pb2, empty_pb2

from authplane.compiler.ir import Checks, ClusterIR, JwtIR, ListenerIR, RouteIR
from authplane.compiler.pb import duration, pack

NAME = "envoy.filters.http.jwt_authn"
PAYLOAD_KEY = "jwt_payload"
"""Dynamic metadata key (namespace ``envoy.filters.http.jwt_authn``) holding the verified payload."""


def provider_name(policy: str, provider: str) -> str:
    return f"{policy}/{provider}"


def _requirement(ir: JwtIR) -> jwt.JwtRequirement:
    names = [provider_name(ir.policy, p.name) for p in ir.spec.providers]
    if len(names) == 1 and ir.spec.required:
        return jwt.JwtRequirement(provider_name=names[0])
    reqs = [jwt.JwtRequirement(provider_name=n) for n in names]
    if not ir.spec.required:
        reqs.append(jwt.JwtRequirement(allow_missing=empty_pb2.Empty()))
    return jwt.JwtRequirement(requires_any=jwt.JwtRequirementOrList(requirements=reqs))


def _route_requirement(lst: ListenerIR, checks: Checks | None) -> tuple[str, jwt.JwtRequirement] | None:
    gw = lst.checks.jwt if lst.checks else None
    rt = checks.jwt if checks else None
    if gw and rt:
        both = jwt.JwtRequirement(requires_all=jwt.JwtRequirementAndList(
            requirements=[_requirement(gw), _requirement(rt)]))
        return f"{gw.policy}+{rt.policy}", both
    if rt:
        return rt.policy, _requirement(rt)
    return None


def uri_cluster(uri: str, prefix: str = "jwks") -> ClusterIR:
    """The cluster Envoy reaches a URL's host with: ``<prefix>_<host>_<port>``, TLS for https."""
    parts = urlsplit(uri)
    https = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if https else 80)
    return ClusterIR(f"{prefix}_{host}_{port}", ((host, port),), False, 5.0, https, host if https else None,
                     None)


def _provider(ir: JwtIR, name: str) -> jwt.JwtProvider:
    prov = next(p for p in ir.spec.providers if p.name == name)
    out = jwt.JwtProvider(
        issuer=prov.issuer or "", audiences=prov.audiences, forward=prov.forward,
        payload_in_metadata=PAYLOAD_KEY, clock_skew_seconds=round(prov.clock_skew),
        claim_to_headers=[jwt.JwtClaimToHeader(header_name=h, claim_name=c)
                          for c, h in sorted(prov.claims_to_headers.items())],
    )
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


def _jwts(lst: ListenerIR) -> list[JwtIR]:
    return [c.jwt for c in lst.all_checks() if c.jwt is not None]


def http_filters(lst: ListenerIR) -> list[hcm.HttpFilter]:
    irs = _jwts(lst)
    if not irs:
        return []
    cfg = jwt.JwtAuthentication()
    for ir in irs:
        for prov in ir.spec.providers:
            cfg.providers[provider_name(ir.policy, prov.name)].CopyFrom(_provider(ir, prov.name))
    if lst.checks and lst.checks.jwt:
        cfg.requirement_map[lst.checks.jwt.policy].CopyFrom(_requirement(lst.checks.jwt))
    for vh in lst.virtual_hosts:
        for r in vh.routes:
            req = None if r.public else _route_requirement(lst, r.checks)
            if req:
                cfg.requirement_map[req[0]].CopyFrom(req[1])
    return [hcm.HttpFilter(name=NAME, typed_config=pack(cfg))]


def vhost_config(lst: ListenerIR) -> dict[str, any_pb2.Any]:
    if lst.checks and lst.checks.jwt:
        return {NAME: pack(jwt.PerRouteConfig(requirement_name=lst.checks.jwt.policy))}
    return {}


def route_config(lst: ListenerIR, route: RouteIR) -> dict[str, any_pb2.Any]:
    req = _route_requirement(lst, route.checks)
    return {NAME: pack(jwt.PerRouteConfig(requirement_name=req[0]))} if req else {}


def clusters(lst: ListenerIR) -> list[ClusterIR]:
    return [uri_cluster(p.jwks.uri) for ir in _jwts(lst) for p in ir.spec.providers if p.jwks.uri]
