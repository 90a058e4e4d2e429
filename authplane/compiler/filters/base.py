"""The shape every filter module has: one ``Filter`` subclass, one instance (``FILTER``) in ``ORDER``.

Each hook has a no-op default, so a module writes only the ones its Envoy filter needs:

- ``http_filters``: the instances it adds to a listener's HTTP connection manager chain;
- ``vhost_config`` / ``route_config``: its per-filter config on every virtual host (gateway level)
  and on one route (route level); by default both call ``level_config`` with that level's checks;
- ``resources``: the clusters and SDS secrets its config refers to;
- ``extra_routes``: routes the filter must answer on a host (an IR hook, run while building it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import urlsplit

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from authplane.compiler.ir import Checks, ClusterIR, ListenerIR, RouteIR
from authplane.compiler.protos import pack

PerFilterConfig = dict[str, any_pb2.Any]
"""HTTP filter instance name → its ``typed_per_filter_config`` entry."""


@dataclass(frozen=True)
class Needs:
    """The resources a filter's config refers to, besides the listener and routes."""

    clusters: tuple[ClusterIR, ...] = ()
    secrets: tuple[secret_pb2.Secret, ...] = ()


class Filter:
    """One Envoy HTTP filter; subclasses override the hooks they need."""

    prefix: ClassVar[str]
    """The Envoy filter name (``envoy.filters.http.<filter>``) its instance names start with."""

    def name(self, *parts: str) -> str:
        """An instance name: the prefix and the non-empty ``parts`` (level, policy ...)."""
        return ".".join((self.prefix, *(p for p in parts if p)))

    def http_filters(self, lst: ListenerIR) -> list[hcm.HttpFilter]:
        """The instances this listener's HTTP connection manager needs (may be none)."""
        return []

    def vhost_config(self, lst: ListenerIR) -> PerFilterConfig:
        """Gateway-level per-filter config, set on every virtual host of the listener."""
        return self.level_config(lst, lst.checks) if lst.checks else {}

    def route_config(self, lst: ListenerIR, route: RouteIR) -> PerFilterConfig:
        """Route-level per-filter config (never called for public routes)."""
        return self.level_config(lst, route.checks) if route.checks else {}

    def level_config(self, lst: ListenerIR, checks: Checks) -> PerFilterConfig:
        """The per-filter config for one level's checks (``checks.level``)."""
        return {}

    def resources(self, lst: ListenerIR) -> Needs:
        """Clusters (JWKS hosts, token endpoints, decision services) and secrets it refers to."""
        return Needs()

    def extra_routes(self, gateway: Checks | None, members: list[RouteIR]) -> list[RouteIR]:
        """Routes to add to a virtual host whose routes are ``members`` (gateway-level checks
        ``gateway``), for paths the filter itself answers."""
        return []


def http_filter(name: str, config: Message, disabled: bool = False) -> hcm.HttpFilter:
    """A chain entry; ``disabled``: enabled only where a virtual host or route sets ``enable``."""
    return hcm.HttpFilter(name=name, typed_config=pack(config), disabled=disabled)


def enable(config: Message) -> any_pb2.Any:
    """Per-route config that enables a disabled instance with ``config``."""
    return pack(rc.FilterConfig(config=pack(config)))


def disable() -> any_pb2.Any:
    """Per-route config that turns an instance off (public routes, the ambiguous-path guard)."""
    return pack(rc.FilterConfig(disabled=True))


def uri_cluster(uri: str, prefix: str = "jwks") -> ClusterIR:
    """The cluster Envoy reaches a URL's host with: ``<prefix>_<host>_<port>``, TLS for https."""
    parts = urlsplit(uri)
    https = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if https else 80)
    return ClusterIR(f"{prefix}_{host}_{port}", ((host, port),), False, 5.0, https, host if https else None,
                     None)

