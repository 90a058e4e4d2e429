"""envoy.filters.http.router: always last."""

from __future__ import annotations

from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)

from authplane.compiler.filters.base import Filter, http_filter
from authplane.compiler.ir import ListenerIR


class Router(Filter):
    prefix = "envoy.filters.http.router"

    def http_filters(self, lst: ListenerIR) -> list[hcm.HttpFilter]:
        return [http_filter(self.name(), router_pb2.Router())]


FILTER = Router()
