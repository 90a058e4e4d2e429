"""envoy.filters.http.api_key_auth: one instance per level, keys carried in RDS.

Like RBAC, one instance checks the gateway level and another the route level, both disabled in the
connection manager and enabled where a policy applies with ``ApiKeyAuthPerRoute`` (keys, key
source, allowed clients, client-name header, hiding), so a key file change reaches open connections.

Hiding: Envoy removes the key right after its own check. When both levels read the key from the
same place, the gateway instance on that route must leave it for the route instance, which then
removes it if either level hides it.
"""

from __future__ import annotations

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.api_key_auth.v3 import api_key_auth_pb2 as ak
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from google.protobuf import any_pb2

from authplane.compiler.ir import ApiKeyIR, ClusterIR, ListenerIR, RouteIR
from authplane.compiler.pb import pack

PREFIX = "envoy.filters.http.api_key_auth"
LEVELS = ("gateway", "route")


def name(level: str) -> str:
    return f"{PREFIX}.{level}"


def _per_route(ir: ApiKeyIR, hide: bool) -> any_pb2.Any:
    kind, source = ir.spec.source
    cfg = ak.ApiKeyAuthPerRoute(
        credentials=[ak.Credential(key=key, client=client) for key, client in ir.credentials],
        key_sources=[ak.KeySource(**{kind: source})],
        allowed_clients=ir.spec.clients,
        forwarding=ak.Forwarding(header=ir.spec.client_header or "", hide_credentials=hide))
    return pack(rc.FilterConfig(config=pack(cfg)))


def http_filters(lst: ListenerIR) -> list[hcm.HttpFilter]:
    levels = {c.level for c in lst.all_checks() if c.api_key is not None}
    return [hcm.HttpFilter(name=name(lvl), disabled=True, typed_config=pack(ak.ApiKeyAuth()))
            for lvl in LEVELS if lvl in levels]


def vhost_config(lst: ListenerIR) -> dict[str, any_pb2.Any]:
    gw = lst.checks.api_key if lst.checks else None
    return {name("gateway"): _per_route(gw, hide=not gw.spec.forward)} if gw else {}


def route_config(lst: ListenerIR, route: RouteIR) -> dict[str, any_pb2.Any]:
    rt = route.checks.api_key if route.checks else None
    if rt is None:
        return {}
    gw = lst.checks.api_key if lst.checks else None
    shared = gw is not None and gw.spec.source == rt.spec.source and not gw.spec.forward
    out = {name("route"): _per_route(rt, hide=not rt.spec.forward or shared)}
    if gw is not None and shared:
        out[name("gateway")] = _per_route(gw, hide=False)
    return out


def clusters(lst: ListenerIR) -> list[ClusterIR]:
    return []
