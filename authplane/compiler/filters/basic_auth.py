"""envoy.filters.http.basic_auth: instances per level, users carried in RDS.

Like RBAC, one instance checks the gateway level (users set per virtual host) and another the route
level (users set per route), so a route with both requires a user known to both files. Envoy fixes
the user-name header per instance, so policies forwarding the user under different headers get
different instances. Every instance is disabled in the connection manager and enabled where a policy
applies with ``BasicAuthPerRoute``: the users travel in RDS and a changed file reaches open
connections.

Envoy's filter leaves the ``Authorization`` header in place; unless a policy says ``forward: true``,
a ``header_mutation`` instance right after the checks removes it (per virtual host and per route;
Envoy applies both levels, so the header is removed if either level asks for it).
"""

from __future__ import annotations

from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2 as mutation
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.basic_auth.v3 import basic_auth_pb2 as ba
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2 as hm
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from google.protobuf import any_pb2

from authplane.compiler.ir import BasicAuthIR, Checks, ClusterIR, ListenerIR, RouteIR
from authplane.compiler.pb import pack

PREFIX = "envoy.filters.http.basic_auth"
STRIP = "envoy.filters.http.header_mutation.basic_auth"
"""Removes the ``Authorization`` header after the checks."""
_NO_USERS = base_pb2.DataSource(inline_string="# users are set per virtual host and route\n")
"""Envoy refuses an instance without a users source; the instance is never used without a route's."""


def name(level: str, ir: BasicAuthIR) -> str:
    header = ir.spec.user_header
    return f"{PREFIX}.{level}" + (f".{header}" if header else "")


def _levels(lst: ListenerIR) -> list[tuple[str, BasicAuthIR]]:
    return [(c.level, c.basic_auth) for c in lst.all_checks() if c.basic_auth is not None]


def http_filters(lst: ListenerIR) -> list[hcm.HttpFilter]:
    found = _levels(lst)
    instances = {name(level, ir): ir.spec.user_header for level, ir in found}
    out = [hcm.HttpFilter(name=n, disabled=True, typed_config=pack(ba.BasicAuth(
               users=_NO_USERS, forward_username_header=h or "")))
           for n, h in sorted(instances.items(), key=lambda kv: (".route" in kv[0], kv[0]))]
    if any(not ir.spec.forward for _, ir in found):
        out.append(hcm.HttpFilter(name=STRIP, disabled=True, typed_config=pack(hm.HeaderMutation())))
    return out


def _config(checks: Checks | None) -> dict[str, any_pb2.Any]:
    ir = checks.basic_auth if checks else None
    if checks is None or ir is None:
        return {}
    users = ba.BasicAuthPerRoute(users=base_pb2.DataSource(inline_string=ir.htpasswd))
    out = {name(checks.level, ir): pack(rc.FilterConfig(config=pack(users)))}
    if not ir.spec.forward:
        strip = hm.HeaderMutationPerRoute(mutations=hm.Mutations(
            request_mutations=[mutation.HeaderMutation(remove="authorization")]))
        out[STRIP] = pack(rc.FilterConfig(config=pack(strip)))
    return out


def vhost_config(lst: ListenerIR) -> dict[str, any_pb2.Any]:
    return _config(lst.checks)


def route_config(lst: ListenerIR, route: RouteIR) -> dict[str, any_pb2.Any]:
    return _config(route.checks)


def clusters(lst: ListenerIR) -> list[ClusterIR]:
    return []
