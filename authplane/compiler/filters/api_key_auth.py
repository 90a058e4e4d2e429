"""envoy.filters.http.api_key_auth: one instance per level, keys carried in RDS.

Like RBAC, one instance checks the gateway level and another the route level, both disabled in the
connection manager and enabled where a policy applies with ``ApiKeyAuthPerRoute`` (keys, key
source, allowed clients, client-name header, hiding), so a key file change reaches open connections.

``mode: shadow``: Envoy's filter always denies a missing or unknown key, so the level's instance
stays off and a recorder (an RBAC instance with shadow rules only) notes a would-deny unless the
request carries a key of an allowed client where the policy reads it (the keys are matched in
RBAC as they already travel in the filter's RDS config). The cost: in shadow the key is neither
hidden nor is ``clientHeader`` set.

Hiding: Envoy removes the key right after its own check. When both levels read the key from the
same place, the gateway instance on that route must leave it for the route instance, which then
removes it if either level hides it.
"""

from __future__ import annotations

import re

from envoy.extensions.filters.http.api_key_auth.v3 import api_key_auth_pb2 as ak
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from google.protobuf import any_pb2

from authplane.compiler.filters.base import Filter, PerFilterConfig, disable, enable, http_filter
from authplane.compiler.filters.rbac import header_regex, recorder_name, shadow_record, shadow_recorder
from authplane.compiler.ir import LEVELS, Checks, ListenerIR, RouteIR
from authplane.compiler.satisfy import API_KEY, is_any, variant_of
from authplane.contract import MODE_SHADOW
from authplane.policy.model import ApiKey


def _api_key(checks: Checks | None) -> ApiKey | None:
    """The level's enforced ``apiKey`` section (a shadow one is only recorded, ``_record``)."""
    return checks.spec.api_key if checks and checks.spec.mode != MODE_SHADOW else None


def _shadow(checks: Checks | None) -> bool:
    return checks is not None and checks.spec.api_key is not None and checks.spec.mode == MODE_SHADOW


def _record(checks: Checks) -> PerFilterConfig:
    """A shadow ``apiKey`` level: allowed when the request carries a key of an allowed client."""
    spec = checks.spec.api_key
    assert spec is not None
    keys = [re.escape(k.secret) for k in checks.resolved.keys if not spec.clients or k.name in spec.clients]
    key = f"(?:{'|'.join(keys) or '$^'})"
    kind, name = spec.source
    if kind == "header":
        passed = header_regex(name, f"(?:[Bb]earer )?{key}")
    elif kind == "query":
        passed = header_regex(":path", f"[^?]*\\?(?:.*&)?{re.escape(name)}={key}(?:&.*)?")
    else:
        passed = header_regex("cookie", f"(?:.*; *)?{re.escape(name)}={key}(?:;.*)?")
    return {recorder_name("apiKey", checks.level): shadow_record("apiKey", checks, passed)}


def _per_route(checks: Checks, hide: bool) -> any_pb2.Any:
    spec = checks.spec.api_key
    assert spec is not None
    kind, source = spec.source
    cfg = ak.ApiKeyAuthPerRoute(
        credentials=[ak.Credential(key=k.secret, client=k.name) for k in checks.resolved.keys],
        key_sources=[ak.KeySource(**{kind: source})],
        allowed_clients=spec.clients,
        forwarding=ak.Forwarding(header=spec.client_header or "", hide_credentials=hide))
    return enable(cfg)


class ApiKeyAuth(Filter):
    prefix = "envoy.filters.http.api_key_auth"

    def http_filters(self, lst: ListenerIR) -> list[hcm.HttpFilter]:
        levels = {c.level for c in lst.all_checks() if c.spec.api_key is not None and not _shadow(c)}
        shadow = {c.level for c in lst.all_checks() if _shadow(c)}
        return [*(http_filter(self.name(lvl), ak.ApiKeyAuth(), disabled=True) for lvl in LEVELS if lvl in levels),
                *(shadow_recorder(recorder_name("apiKey", lvl)) for lvl in LEVELS if lvl in shadow)]

    def vhost_config(self, lst: ListenerIR) -> PerFilterConfig:
        gw = _api_key(lst.checks)
        if lst.checks is not None and _shadow(lst.checks):
            return _record(lst.checks)
        if lst.checks is None or gw is None:
            return {}
        return {self.name("gateway"): _per_route(lst.checks, hide=not gw.forward)}

    def route_config(self, lst: ListenerIR, route: RouteIR) -> PerFilterConfig:
        rt = _api_key(route.checks)
        gw = _api_key(lst.checks)
        out: PerFilterConfig = {}
        v = variant_of(route)
        if v is not None:  # satisfy: any: only the keys the variant's route match found are checked
            if gw is not None and is_any(lst.checks) and ("gateway", API_KEY) not in v.enabled:
                gw = None
                out[self.name("gateway")] = disable()
            if rt is not None and is_any(route.checks) and ("route", API_KEY) not in v.enabled:
                rt = None
        if route.checks is not None and _shadow(route.checks):
            out.update(_record(route.checks))
        if route.checks is None or rt is None:
            return out
        shared = gw is not None and gw.source == rt.source and not gw.forward
        out[self.name("route")] = _per_route(route.checks, hide=not rt.forward or shared)
        if lst.checks is not None and shared:
            out[self.name("gateway")] = _per_route(lst.checks, hide=False)
        return out


FILTER = ApiKeyAuth()
