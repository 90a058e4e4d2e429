"""The shape every filter module has."""

from __future__ import annotations

from typing import Protocol

from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from google.protobuf import any_pb2

from authplane.compiler.ir import ClusterIR, ListenerIR, RouteIR


class FilterModule(Protocol):
    def http_filters(self, lst: ListenerIR) -> list[hcm.HttpFilter]:
        """The filter instances this listener's HTTP connection manager needs (may be none)."""
        ...

    def vhost_config(self, lst: ListenerIR) -> dict[str, any_pb2.Any]:
        """Gateway-level per-filter config, set on every virtual host of the listener."""
        ...

    def route_config(self, lst: ListenerIR, route: RouteIR) -> dict[str, any_pb2.Any]:
        """Route-level per-filter config."""
        ...

    def clusters(self, lst: ListenerIR) -> list[ClusterIR]:
        """Extra clusters the filter needs (JWKS hosts ...)."""
        ...
