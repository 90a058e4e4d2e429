"""envoy.filters.http.ext_authz: instances per level and failure behaviour, enabled per route.

Envoy fixes ``failure_mode_allow`` and ``status_on_error`` per filter instance, so policies with
different failure settings get different instances. Every instance is disabled in the connection
manager and enabled where a policy applies (virtual host for gateway level, route for route level)
with ``ExtAuthzPerRoute``, which also carries the service (per-route override), its timeout and
the context extensions that tell the builtin decision service which policy applies (and carry
the digest of its rules, so a rule edit changes the fleet's version though Envoy never reads them).

``service: builtin`` over HTTP (the default for builtin, see docs/decision-service.md): the policy
travels in the per-route path prefix (``/envoy/<policy>``); Envoy sends the request headers and
adds the client address and the verified JWT payload from its own state (never a client's copy);
only the headers the policy's rules set may reach the upstream or the client.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2, config_source_pb2, grpc_service_pb2, http_uri_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2 as ea
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from authplane.authz import rules as builtin
from authplane.compiler.filters.jwt_authn import NAME as JWT_FILTER
from authplane.compiler.filters.jwt_authn import PAYLOAD_KEY
from authplane.compiler.ir import ClusterIR, ExtAuthIR, ListenerIR, RouteIR
from authplane.compiler.pb import duration, pack

PREFIX = "envoy.filters.http.ext_authz"


def name(ir: ExtAuthIR) -> str:
    s = ir.spec
    mode = "open" if s.fail_open else f"closed-{s.status_on_error}"
    return f"{PREFIX}.{ir.level}.{s.protocol}.{mode}"


def _service(ir: ExtAuthIR, route: bool) -> grpc_service_pb2.GrpcService | ea.HttpService:
    """The service as the filter instance (``route`` False) or one route's override sees it."""
    s = ir.spec
    if s.protocol == "grpc":
        return grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=ir.cluster),
            timeout=duration(s.timeout))
    http = ea.HttpService(
        server_uri=http_uri_pb2.HttpUri(uri=f"http://{ir.cluster}", cluster=ir.cluster,
                                        timeout=duration(s.timeout)),
        path_prefix=s.path_prefix)
    if s.service == "builtin":
        # The instance is shared by several policies: without a route's override it names no
        # policy, and the decision service denies.
        http.path_prefix = f"/envoy/{ir.policy}" if route else "/envoy/"
        http.authorization_request.headers_to_add.extend(_BUILTIN_CHECK_HEADERS)
        if route:
            _exact(http.authorization_response, "allowed_upstream_headers", builtin.upstream_headers(s))
            _exact(http.authorization_response, "allowed_client_headers_on_success",
                   builtin.response_headers(s))
    else:
        _exact(http.authorization_response, "allowed_upstream_headers", s.headers_to_upstream)
    return http


_BUILTIN_CHECK_HEADERS = (
    base_pb2.HeaderValue(key=builtin.CLIENT_IP_HEADER, value="%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"),
    base_pb2.HeaderValue(key=builtin.JWT_PAYLOAD_HEADER, value=f"%DYNAMIC_METADATA({JWT_FILTER}:{PAYLOAD_KEY})%"),
)


def _exact(parent: Message, field: str, names: list[str]) -> None:
    # Envoy refuses an empty matcher list: leave the field unset then.
    if names:
        getattr(parent, field).patterns.extend(string_pb2.StringMatcher(exact=h) for h in names)


def _filter(ir: ExtAuthIR) -> ea.ExtAuthz:
    s = ir.spec
    cfg = ea.ExtAuthz(
        transport_api_version=config_source_pb2.V3, failure_mode_allow=s.fail_open,
        failure_mode_allow_header_add=s.fail_open,
        status_on_error=http_status_pb2.HttpStatus(code=s.status_on_error),  # type: ignore[arg-type]
        metadata_context_namespaces=[JWT_FILTER],
    )
    svc = _service(ir, route=False)
    if isinstance(svc, grpc_service_pb2.GrpcService):
        cfg.grpc_service.CopyFrom(svc)
    else:
        cfg.http_service.CopyFrom(svc)
    if s.service == "builtin" and s.protocol == "http":
        # Envoy takes the request headers to send from the filter instance only (a route's
        # override is ignored there): send them all, as gRPC mode does, except the ones Envoy
        # itself sets for the decision service, so a client can never forge them.
        cfg.allowed_headers.patterns.add().safe_regex.regex = ".*"
        _exact(cfg, "disallowed_headers", [builtin.CLIENT_IP_HEADER, builtin.JWT_PAYLOAD_HEADER])
    return cfg


def _per_route(ir: ExtAuthIR) -> any_pb2.Any:
    settings = ea.CheckSettings(context_extensions={
        "authplane.policy": ir.policy, "authplane.level": ir.level, "authplane.target": ir.target})
    if ir.rules:
        settings.context_extensions["authplane.rules"] = ir.rules
    svc = _service(ir, route=True)
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
