"""envoy.filters.http.ext_authz: instances per level and failure behaviour, enabled per route.

Envoy fixes ``failure_mode_allow`` and ``status_on_error`` per filter instance, so policies with
different failure settings get different instances. Every instance is disabled in the connection
manager and enabled where a policy applies (virtual host for gateway level, route for route level)
with ``ExtAuthzPerRoute``, which also carries the service (per-route override), its timeout and
the context extensions that tell the builtin decision service which policy applies.
"""

from __future__ import annotations

from envoy.config.core.v3 import config_source_pb2, grpc_service_pb2, http_uri_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2 as ea
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import any_pb2

from authplane.compiler.filters.jwt_authn import NAME as JWT_FILTER
from authplane.compiler.ir import ClusterIR, ExtAuthIR, ListenerIR, RouteIR
from authplane.compiler.pb import duration, pack

PREFIX = "envoy.filters.http.ext_authz"


def name(ir: ExtAuthIR) -> str:
    s = ir.spec
    mode = "open" if s.fail_open else f"closed-{s.status_on_error}"
    return f"{PREFIX}.{ir.level}.{s.protocol}.{mode}"


def _service(ir: ExtAuthIR) -> grpc_service_pb2.GrpcService | ea.HttpService:
    s = ir.spec
    if s.protocol == "grpc":
        return grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=ir.cluster),
            timeout=duration(s.timeout))
    http = ea.HttpService(
        server_uri=http_uri_pb2.HttpUri(uri=f"http://{ir.cluster}", cluster=ir.cluster,
                                        timeout=duration(s.timeout)),
        path_prefix=s.path_prefix)
    if s.headers_to_upstream:  # Envoy refuses an empty matcher list
        http.authorization_response.allowed_upstream_headers.patterns.extend(
            string_pb2.StringMatcher(exact=h) for h in s.headers_to_upstream)
    return http


def _filter(ir: ExtAuthIR) -> ea.ExtAuthz:
    s = ir.spec
    cfg = ea.ExtAuthz(
        transport_api_version=config_source_pb2.V3, failure_mode_allow=s.fail_open,
        failure_mode_allow_header_add=s.fail_open,
        status_on_error=http_status_pb2.HttpStatus(code=s.status_on_error),  # type: ignore[arg-type]
        metadata_context_namespaces=[JWT_FILTER],
    )
    svc = _service(ir)
    if isinstance(svc, grpc_service_pb2.GrpcService):
        cfg.grpc_service.CopyFrom(svc)
    else:
        cfg.http_service.CopyFrom(svc)
    return cfg


def _per_route(ir: ExtAuthIR) -> any_pb2.Any:
    settings = ea.CheckSettings(context_extensions={
        "authplane.policy": ir.policy, "authplane.level": ir.level, "authplane.target": ir.target})
    svc = _service(ir)
    if isinstance(svc, grpc_service_pb2.GrpcService):
        settings.grpc_service.CopyFrom(svc)
    else:
        settings.http_service.CopyFrom(svc)
    return pack(rc.FilterConfig(config=pack(ea.ExtAuthzPerRoute(check_settings=settings))))


def _irs(lst: ListenerIR) -> list[ExtAuthIR]:
    return [c.ext_auth for c in lst.all_checks() if c.ext_auth is not None]


def http_filters(lst: ListenerIR) -> list[hcm.HttpFilter]:
    first: dict[str, ExtAuthIR] = {}
    for ir in _irs(lst):
        first.setdefault(name(ir), ir)
    ordered = sorted(first.values(), key=lambda ir: (ir.level != "gateway", name(ir)))
    return [hcm.HttpFilter(name=name(ir), typed_config=pack(_filter(ir)), disabled=True) for ir in ordered]


def vhost_config(lst: ListenerIR) -> dict[str, any_pb2.Any]:
    ir = lst.checks.ext_auth if lst.checks else None
    return {name(ir): _per_route(ir)} if ir else {}


def route_config(lst: ListenerIR, route: RouteIR) -> dict[str, any_pb2.Any]:
    ir = route.checks.ext_auth if route.checks else None
    return {name(ir): _per_route(ir)} if ir else {}


def clusters(lst: ListenerIR) -> list[ClusterIR]:
    return []  # backend and builtin clusters are collected by the translator
