"""envoy.filters.http.router: always last."""

from __future__ import annotations

from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from google.protobuf import any_pb2

from authplane.compiler.ir import ClusterIR, ListenerIR, RouteIR
from authplane.compiler.pb import pack

NAME = "envoy.filters.http.router"


def http_filters(lst: ListenerIR) -> list[hcm.HttpFilter]:
    return [hcm.HttpFilter(name=NAME, typed_config=pack(router_pb2.Router()))]


def vhost_config(lst: ListenerIR) -> dict[str, any_pb2.Any]:
    return {}


def route_config(lst: ListenerIR, route: RouteIR) -> dict[str, any_pb2.Any]:
    return {}


def clusters(lst: ListenerIR) -> list[ClusterIR]:
    return []
