"""envoy.filters.http.header_mutation (``auth_method``): ``satisfy.methodHeader``, the method that passed.

On each ``satisfy: any`` route variant (``compiler/satisfy.py``) the method that satisfies a level
is known from the route match alone, so one ``header_mutation`` instance, disabled in the
connection manager and enabled per variant, sets the header (replacing any client copy) right
after the credential checks: the authorization rules and the decision service see authplane's
value, never the client's. On a public route, where every check is off, the gateway's header is
removed instead.
"""

from __future__ import annotations

from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2 as mutation
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2 as hm
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)

from authplane.compiler.filters.base import Filter, PerFilterConfig, enable, http_filter
from authplane.compiler.ir import Checks, ListenerIR, RouteIR
from authplane.compiler.satisfy import is_any, variant_of


def _header(checks: Checks | None) -> str | None:
    return checks.spec.satisfy.method_header if checks is not None and is_any(checks) else None


def _per_route(mutations: list[mutation.HeaderMutation]) -> PerFilterConfig:
    cfg = hm.HeaderMutationPerRoute(mutations=hm.Mutations(request_mutations=mutations))
    return {FILTER.name("auth_method"): enable(cfg)}


def public_config(lst: ListenerIR) -> PerFilterConfig:
    """A public route's config: the gateway's method header removed (nothing passed on it)."""
    header = _header(lst.checks)
    return _per_route([mutation.HeaderMutation(remove=header)]) if header else {}


class AuthMethod(Filter):
    prefix = "envoy.filters.http.header_mutation"

    def http_filters(self, lst: ListenerIR) -> list[hcm.HttpFilter]:
        if not any(_header(c) for c in lst.all_checks()):
            return []
        return [http_filter(self.name("auth_method"), hm.HeaderMutation(), disabled=True)]

    def route_config(self, lst: ListenerIR, route: RouteIR) -> PerFilterConfig:
        v = variant_of(route)
        if v is None or v.challenges:
            return {}
        passed = dict(v.passed)
        values: dict[str, list[str]] = {}
        for checks in (lst.checks, route.checks):
            header = _header(checks)
            if header and checks is not None:
                values.setdefault(header, []).extend(passed[checks.level])
        overwrite = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
        return _per_route([mutation.HeaderMutation(append=base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=h, value=",".join(dict.fromkeys(ms))), append_action=overwrite))
            for h, ms in sorted(values.items())]) if values else {}


FILTER = AuthMethod()
