"""envoy.filters.http.dynamic_modules: a policy's ``filters`` (your modules) and ``extAuth.engine:
native`` (authplane's own module deciding the builtin rules inside Envoy).

``filters``: the entries of each place run at one slot of ``ORDER``: ``modules_first`` (before
authentication), ``modules_between`` (after authentication, then before authorization) and this
module's ``FILTER`` (after authorization, right after ext_authz). One instance per distinct entry
(module, filter name, configuration: the instance name ends with their digest), disabled in the
connection manager and enabled where its policy applies (every virtual host for gateway level,
the route for route level). A route-level entry named like one of its gateway's turns that
instance off on the route and, unless ``enabled: false``, enables its own. The module gets its
configuration (a string as is, anything else as compact sorted JSON, in a
``google.protobuf.StringValue``) as the filter's and, where enabled, as the per-route one (Envoy
turns a disabled instance on only with one).

Native rules (``FILTER``, before that slot's modules): per level, a header mutation that sets the
client address and the verified JWT payload (the very values ext_authz sends the decision
service, replacing any client copy) and the ``authplane_rules`` module instance, both disabled
and enabled per virtual host or route with the policy's rule table as the module's per-route
configuration (``DynamicModuleFilterPerRoute``): a rule edit is a route update, like any other.
The table is ``rule_table``: the meaning of ``authplane/authz/rules.py`` for what
``policy/modules.native_obstacles`` lets through. See docs/dynamic-modules.md.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar

from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2 as mr
from envoy.config.core.v3 import base_pb2
from envoy.extensions.dynamic_modules.v3 import dynamic_modules_pb2 as dm
from envoy.extensions.filters.http.dynamic_modules.v3 import dynamic_modules_pb2 as dmf
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2 as hm
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from google.protobuf import any_pb2, wrappers_pb2

from authplane.compiler.filters.base import Filter, PerFilterConfig, disable, enable, http_filter
from authplane.compiler.ir import LEVELS, Checks, ListenerIR, RouteIR
from authplane.compiler.protos import pack
from authplane.contract import CLIENT_IP_HEADER, JWT_FILTER, JWT_PAYLOAD_HEADER, JWT_PAYLOAD_KEY
from authplane.policy.model import ExtAuth, ExtAuthConditions, ExtAuthRule, ModuleFilter
from authplane.policy.modules import NATIVE_RULES, module_name
from authplane.policy.types import StringMatch

PREFIX = "envoy.filters.http.dynamic_modules"


def _config_text(config: Any) -> str:
    if config is None:
        return ""
    return config if isinstance(config, str) else json.dumps(config, sort_keys=True, separators=(",", ":"))


def _enable(f: ModuleFilter) -> any_pb2.Any:
    """Turns the instance on where the policy applies. Envoy wants a per-route configuration to
    do so: the same one (the module gets it in ``on_http_filter_per_route_config_new``)."""
    assert f.module is not None
    return enable(dmf.DynamicModuleFilterPerRoute(
        dynamic_module_config=dm.DynamicModuleConfig(name=module_name(f.module)),
        filter_config=pack(wrappers_pb2.StringValue(value=_config_text(f.config)))))


def _module_filter(f: ModuleFilter) -> dmf.DynamicModuleFilter:
    assert f.module is not None
    return dmf.DynamicModuleFilter(
        dynamic_module_config=dm.DynamicModuleConfig(name=module_name(f.module)),
        filter_name=f.filter_name or f.name,
        filter_config=pack(wrappers_pb2.StringValue(value=_config_text(f.config))))


class Modules(Filter):
    """The ``filters`` entries of some places (``places``, in chain order) at one slot of ``ORDER``."""

    places: ClassVar[tuple[str, ...]]

    def _instance(self, f: ModuleFilter) -> str:
        key = json.dumps([f.module, f.filter_name or f.name, _config_text(f.config)]).encode()
        return self.name(f.place, f.name, hashlib.sha256(key).hexdigest()[:8])

    def _entries(self, checks: Checks | None) -> list[ModuleFilter]:
        if checks is None:
            return []
        return sorted((f for f in checks.spec.filters if f.place in self.places),
                      key=lambda f: self.places.index(f.place))

    def http_filters(self, lst: ListenerIR) -> list[hcm.HttpFilter]:
        out: dict[str, hcm.HttpFilter] = {}
        for place in self.places:
            for checks in lst.all_checks():  # gateway level first, then route policies by name
                for f in self._entries(checks):
                    if f.enabled and f.place == place:
                        name = self._instance(f)
                        out.setdefault(name, http_filter(name, _module_filter(f), disabled=True))
        return list(out.values())

    def vhost_config(self, lst: ListenerIR) -> PerFilterConfig:
        return {self._instance(f): _enable(f) for f in self._entries(lst.checks) if f.enabled}

    def route_config(self, lst: ListenerIR, route: RouteIR) -> PerFilterConfig:
        if route.checks is None:
            return {}
        out: PerFilterConfig = {}
        own = {f.name for f in route.checks.spec.filters}
        for f in self._entries(lst.checks):
            if f.enabled and f.name in own:
                out[self._instance(f)] = disable()
        for f in self._entries(route.checks):
            if f.enabled:
                out[self._instance(f)] = _enable(f)
        return out


# --- native builtin rules --------------------------------------------------------------------


def _values(values: list[StringMatch]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "exact": sorted({v.exact for v in values if v.exact is not None}),
        "prefixes": [v.prefix for v in values if v.prefix is not None]}
    if any(v.present for v in values):
        out["present"] = True
    return out


def _trim(path: str) -> str:
    return path[:-1] if len(path) > 1 and path.endswith("/") else path


def _when(c: ExtAuthConditions, ignore_case: bool) -> dict[str, Any]:
    """``rules.Matcher.build`` as JSON (regexes, API keys and CEL never get here)."""
    plain = [p.path.lower() if ignore_case else p.path for p in c.paths if p.path is not None]
    out: dict[str, Any] = {
        "claims": [[k.split("."), _values(v)] for k, v in sorted(c.claims.items())],
        "headers": [[k.lower(), _values(v)] for k, v in sorted(c.headers.items())],
        "cidrs": list(c.source_cidrs), "methods": sorted(set(c.methods)),
        "paths": sorted({_trim(p.removesuffix("*")) for p in plain}),
        "prefixes": [p[:-1] for p in plain if p.endswith("/*")],
        "scopes": sorted(set(c.scopes)), "ignoreCase": ignore_case,
    }
    if c.authenticated is not None:
        out["authenticated"] = c.authenticated
    if c.not_ is not None:
        out["not"] = _when(c.not_, ignore_case)
    return {k: v for k, v in out.items() if v not in ([], False)}


def _pairs(headers: dict[str, str]) -> list[list[str]]:
    return [[k.lower(), v] for k, v in sorted(headers.items())]


def _rule(policy: str, r: ExtAuthRule, ignore_case: bool) -> dict[str, Any]:
    headers = {k.lower(): v for k, v in r.deny.headers.items()}
    if r.deny.status == 401 and "www-authenticate" not in headers:
        headers["www-authenticate"] = f'Bearer realm="{policy}"'
    return {"name": r.name, "action": r.action, "when": _when(r.when, ignore_case),
            "upstream": _pairs(r.upstream_headers), "remove": [h.lower() for h in r.remove_headers],
            "response": _pairs(r.response_headers),
            "deny": {"status": r.deny.status, "body": r.deny.body, "headers": _pairs(headers)}}


def rule_table(policy: str, ext: ExtAuth, ignore_case: bool = False) -> str:
    """The module's per-route configuration: one policy's rules (version 1 of the format)."""
    table = {
        "version": "1", "rules": [_rule(policy, r, ignore_case) for r in ext.rules or []],
        "identityHeaders": ext.identity_headers, "strip": [h.lower() for h in ext.upstream_headers()],
        "noMatch": {"status": 403, "body": f"authplane: no rule of policy {policy!r} matched\n",
                    "headers": [["content-type", "text/plain"]]},
    }
    return json.dumps(table, sort_keys=True, separators=(",", ":"))


def native(checks: Checks | None) -> bool:
    """Checks whose builtin rules Envoy decides itself: ``extAuth.engine: native``, or ``auto``
    where the resolve stage found the module and rules it can decide (``Resolved.native_rules``)."""
    ext = checks.spec.ext_auth if checks else None
    if ext is None or ext.service != "builtin":
        return False
    assert checks is not None
    return ext.engine == "native" or (ext.engine == "auto" and checks.resolved.native_rules)


_INPUTS = mr.HeaderMutation


def _inputs() -> hm.Mutations:
    """The decision inputs Envoy knows, as the HTTP decision service receives them."""
    overwrite = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    values = ((CLIENT_IP_HEADER, "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"),
              (JWT_PAYLOAD_HEADER, f"%DYNAMIC_METADATA({JWT_FILTER}:{JWT_PAYLOAD_KEY})%"))
    out = hm.Mutations(request_mutations=[_INPUTS(remove=h) for h, _ in values])
    out.request_mutations.extend(_INPUTS(append=base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=h, value=v), append_action=overwrite)) for h, v in values)
    return out


def _native_names(level: str) -> tuple[str, str]:
    return f"envoy.filters.http.header_mutation.{NATIVE_RULES}.{level}", f"{PREFIX}.{NATIVE_RULES}.{level}"


def _native_filters(lst: ListenerIR) -> list[hcm.HttpFilter]:
    levels = {c.level for c in lst.all_checks() if native(c)}
    module = dmf.DynamicModuleFilter(
        dynamic_module_config=dm.DynamicModuleConfig(name=NATIVE_RULES), filter_name=NATIVE_RULES,
        filter_config=pack(wrappers_pb2.StringValue(value="{}")))
    out: list[hcm.HttpFilter] = []
    for level in LEVELS:
        if level in levels:
            inputs, rules = _native_names(level)
            out += [http_filter(inputs, hm.HeaderMutation(), disabled=True),
                    http_filter(rules, module, disabled=True)]
    return out


def _native_config(lst: ListenerIR, checks: Checks | None) -> PerFilterConfig:
    if not native(checks):
        return {}
    assert checks is not None and checks.spec.ext_auth is not None
    inputs, rules = _native_names(checks.level)
    table = rule_table(checks.policy, checks.spec.ext_auth, not lst.case_sensitive)
    per_route = dmf.DynamicModuleFilterPerRoute(
        dynamic_module_config=dm.DynamicModuleConfig(name=NATIVE_RULES),
        filter_config=pack(wrappers_pb2.StringValue(value=table)))
    return {inputs: enable(hm.HeaderMutationPerRoute(mutations=_inputs())), rules: enable(per_route)}


class AfterChecks(Modules):
    """Right after ext_authz: the native rules (``engine: native``), then the modules placed
    ``afterAuthorization``."""

    prefix = PREFIX
    places = ("afterAuthorization",)

    def http_filters(self, lst: ListenerIR) -> list[hcm.HttpFilter]:
        return _native_filters(lst) + super().http_filters(lst)

    def vhost_config(self, lst: ListenerIR) -> PerFilterConfig:
        return {**_native_config(lst, lst.checks), **super().vhost_config(lst)}

    def route_config(self, lst: ListenerIR, route: RouteIR) -> PerFilterConfig:
        return {**_native_config(lst, route.checks), **super().route_config(lst, route)}


FILTER = AfterChecks()
