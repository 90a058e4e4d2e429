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

``mode: shadow`` (on the policy, or on one builtin rule): the builtin decision service answers
allow and reports the would-deny in the check response (``authplane/contract.py``); a recorder
(RBAC shadow rules, after the checks) notes it. Envoy's ext_authz has no way to let a denial pass,
so a Backend service in shadow is not given to it: a Lua instance (``_BYO_SHADOW``) calls the
service over HTTP with the request's headers, ignores its answer but for recording a non-200 as
the same would-deny report. The cost: a Lua call per request, the service's headers never reach
the upstream, and a gRPC Backend cannot be shadowed (the policy is refused: Lua speaks no gRPC).

The service's cluster (``resources``) is authplane's own decision service, at the address of
``CompileOptions``, or the cluster of the Backend the policy names.
"""

from __future__ import annotations

import hashlib
import json

from envoy.config.core.v3 import base_pb2, config_source_pb2, grpc_service_pb2, http_uri_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2 as ea
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.type.matcher.v3 import metadata_pb2, string_pb2, value_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from authplane.addresses import split_address
from authplane.compiler.filters.base import Filter, Needs, PerFilterConfig, enable, http_filter
from authplane.compiler.filters.dynamic_module import native
from authplane.compiler.filters.rbac import recorder_name, shadow_record, shadow_recorder
from authplane.compiler.ir import LEVELS, Checks, ClusterIR, ListenerIR
from authplane.compiler.protos import duration
from authplane.compiler.tls import FLEET_CERT_SECRET
from authplane.contract import (
    BUILTIN_HTTP_PREFIX,
    BUILTIN_HTTP_REPORT_PREFIX,
    CLIENT_IP_HEADER,
    EXT_AUTHZ_FILTER,
    JWT_FILTER,
    JWT_PAYLOAD_HEADER,
    JWT_PAYLOAD_KEY,
    LEVEL_KEY,
    MODE_SHADOW,
    POLICY_KEY,
    RESERVED_HEADERS,
    RULES_KEY,
    SHADOW_POLICY_KEY,
    SHADOW_RULE_KEY,
    SHADOW_VERDICT_KEY,
    TARGET_KEY,
    WOULD_DENY,
)
from authplane.policy.documents import TlsMaterial
from authplane.policy.model import AuthPolicySpec, ExtAuth

BUILTIN_GRPC = "authplane_authz_grpc"
BUILTIN_GRPC_STREAMS = 16
BUILTIN_HTTP = "authplane_authz_http"


def _spec(checks: Checks) -> ExtAuth:
    spec = checks.spec.ext_auth
    assert spec is not None
    return spec


def _cluster_name(s: ExtAuth) -> str:
    if s.service != "builtin":
        return s.service  # a Backend: its cluster has its name
    return BUILTIN_GRPC if s.protocol == "grpc" else BUILTIN_HTTP


def _cluster(lst: ListenerIR, s: ExtAuth) -> ClusterIR:
    if s.service != "builtin":
        return lst.env.backends[s.service]
    grpc = s.protocol == "grpc"
    address = lst.env.opts.authz_grpc if grpc else lst.env.opts.authz_http
    endpoint, tls = split_address(address), lst.env.opts.authz_tls
    # gRPC: a few streams per connection, so Envoy's checks spread over the connections (and
    # ``--authz-workers`` processes) instead of one HTTP/2 connection per Envoy thread
    streams = BUILTIN_GRPC_STREAMS if grpc else None
    if tls is None:
        return ClusterIR(_cluster_name(s), (endpoint,), grpc, 1.0, False, None, None, streams)
    # over TLS (compiler/tls.py): the service's CA over SDS (or the system store), its name checked
    return ClusterIR(_cluster_name(s), (endpoint,), grpc, 1.0, True, tls.server_name or endpoint[0], None, streams,
                     TlsMaterial(ca=tls.ca) if tls.ca is not None else None,
                     FLEET_CERT_SECRET if tls.client_cert else None)


def rules_digest(spec: AuthPolicySpec, ext_keys: str | None) -> str:
    """A hash of what a builtin policy's decisions depend on besides the Envoy config (its rules,
    the API key file): it goes in the routes' ext_authz settings, so a rule edit changes the
    fleet's snapshot version like any other change. Fields left at their defaults are not hashed,
    so a new policy field does not change the digest of policies that do not use it."""
    ext = spec.ext_auth
    assert ext is not None
    digest = hashlib.sha256(spec.model_dump_json(by_alias=True, exclude_defaults=True).encode())
    if ext.api_keys:
        digest.update(b"\0" + (ext_keys or "").encode())
    return digest.hexdigest()[:12]


def _service(checks: Checks, route: bool, log: bool = False) -> grpc_service_pb2.GrpcService | ea.HttpService:
    """The service as the filter instance (``route`` False) or one route's override sees it;
    ``log``: the decision log is on (HTTP mode: a denial names its rule, ``contract.DENIED``)."""
    s = _spec(checks)
    cluster = _cluster_name(s)
    if s.protocol == "grpc":
        return grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=cluster),
            timeout=duration(s.timeout))
    http = ea.HttpService(
        server_uri=http_uri_pb2.HttpUri(uri=f"http://{cluster}", cluster=cluster,
                                        timeout=duration(s.timeout)),
        path_prefix=s.path_prefix)
    if s.service == "builtin":
        # The instance is shared by several policies: without a route's override it names no
        # policy, and the decision service denies.
        prefix = BUILTIN_HTTP_REPORT_PREFIX if log else BUILTIN_HTTP_PREFIX
        http.path_prefix = f"{prefix}{checks.policy}" if route else BUILTIN_HTTP_PREFIX
        http.authorization_request.headers_to_add.extend(_BUILTIN_CHECK_HEADERS)
        if route:
            _exact(http.authorization_response, "allowed_upstream_headers", s.upstream_headers())
            _exact(http.authorization_response, "allowed_client_headers_on_success",
                   s.response_headers())
            if _reports(checks) or log:
                # The shadow or denial report (response headers) becomes metadata.
                _exact(http.authorization_response, "dynamic_metadata_from_headers", list(_REPORT))
            if _reports(checks) and not s.upstream_headers():  # and never goes upstream
                _exact(http.authorization_response, "allowed_upstream_headers", [_NO_HEADER])
            if log:  # nor to the client: the report's names have an underscore, a denial's headers none
                denial = http.authorization_response.allowed_client_headers.patterns
                denial.add().safe_regex.regex = _NO_UNDERSCORE
                _exact(http.authorization_response, "allowed_client_headers",
                       sorted({h for r in s.rules or () for h in r.deny.headers if "_" in h}))
    else:
        _exact(http.authorization_response, "allowed_upstream_headers", s.headers_to_upstream)
    return http


_REPORT = (SHADOW_VERDICT_KEY, SHADOW_POLICY_KEY, SHADOW_RULE_KEY)
_NO_UNDERSCORE = "[^_]*"
_NO_HEADER = "x-authplane-no-header"
"""Matches no header the decision service sets: Envoy sends every response header upstream when
``allowed_upstream_headers`` is unset."""


def _recorded(checks: Checks) -> PerFilterConfig:
    """A shadow ``service: builtin`` level: the recorder notes the decision service's would-deny."""
    report = metadata_pb2.MetadataMatcher(
        filter=EXT_AUTHZ_FILTER, path=[metadata_pb2.MetadataMatcher.PathSegment(key=SHADOW_VERDICT_KEY)],
        value=value_pb2.ValueMatcher(string_match=string_pb2.StringMatcher(exact=WOULD_DENY)))
    would_deny = rbac.Principal(sourced_metadata=rbac.SourcedMetadata(metadata_matcher=report))
    return {recorder_name("extAuth", checks.level): shadow_record("extAuth", checks, rbac.Principal(not_id=would_deny))}


_LUA = "envoy.filters.http.lua.shadow.extAuth"
_LUA_IDLE = "function envoy_on_request(handle) end\n"
_BYO_SHADOW = """\
-- authplane: a shadow check of the ext_authz service {cluster} (policy {policy}); never denies
function envoy_on_request(handle)
  local call = {{}}
  for name, value in pairs(handle:headers()) do
    if string.sub(name, 1, 1) ~= ":" and name ~= "content-length" then call[name] = value end
  end
  call[":method"] = handle:headers():get(":method")
  call[":path"] = {prefix} .. handle:headers():get(":path")
  call[":authority"] = {cluster}
  local ok, headers = pcall(handle.httpCall, handle, {cluster}, call, "", {timeout_ms})
  if not ok or headers[":status"] ~= "200" then
    local metadata = handle:streamInfo():dynamicMetadata()
    metadata:set({namespace}, {verdict_key}, {verdict})
    metadata:set({namespace}, {policy_key}, {policy})
    metadata:set({namespace}, {rule_key}, "")
  end
end
"""


def _lua(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid Lua string literal for these names


def _byo_shadow(checks: Checks) -> PerFilterConfig:
    """A shadow Backend service: the Lua instance calls it and records a would-deny."""
    s = _spec(checks)
    script = _BYO_SHADOW.format(
        cluster=_lua(s.service), policy=_lua(checks.policy), prefix=_lua(s.path_prefix or ""),
        timeout_ms=round(s.timeout * 1000), namespace=_lua(EXT_AUTHZ_FILTER),
        verdict_key=_lua(SHADOW_VERDICT_KEY), verdict=_lua(WOULD_DENY), policy_key=_lua(SHADOW_POLICY_KEY),
        rule_key=_lua(SHADOW_RULE_KEY))
    per_route = lua_pb2.LuaPerRoute(source_code=base_pb2.DataSource(inline_string=script))
    return {f"{_LUA}.{checks.level}": enable(per_route)}


def _reports(checks: Checks) -> bool:
    """A level whose builtin service may report a would-deny: the policy, or one of its rules,
    is ``mode: shadow``."""
    s = checks.spec.ext_auth
    return s is not None and (checks.spec.mode == MODE_SHADOW or any(r.mode == MODE_SHADOW for r in s.rules or ()))


def _byo(checks: Checks) -> bool:
    """A Backend service of a policy in shadow (run by Lua, not by an ext_authz instance)."""
    return checks.spec.mode == MODE_SHADOW and _spec(checks).service != "builtin"


_BUILTIN_CHECK_HEADERS = (
    base_pb2.HeaderValue(key=CLIENT_IP_HEADER, value="%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"),
    base_pb2.HeaderValue(key=JWT_PAYLOAD_HEADER, value=f"%DYNAMIC_METADATA({JWT_FILTER}:{JWT_PAYLOAD_KEY})%"),
)


def _set_service(parent: ea.ExtAuthz | ea.CheckSettings, svc: grpc_service_pb2.GrpcService | ea.HttpService) -> None:
    """The filter instance and a route's override both have a ``grpc_service``/``http_service`` oneof."""
    getattr(parent, "grpc_service" if isinstance(svc, grpc_service_pb2.GrpcService) else "http_service").CopyFrom(svc)


def _exact(parent: Message, field: str, names: list[str]) -> None:
    # Envoy refuses an empty matcher list: leave the field unset then.
    if names:
        getattr(parent, field).patterns.extend(string_pb2.StringMatcher(exact=h) for h in names)


def _filter(checks: Checks) -> ea.ExtAuthz:
    s = _spec(checks)
    cfg = ea.ExtAuthz(
        transport_api_version=config_source_pb2.V3, failure_mode_allow=s.fail_open,
        failure_mode_allow_header_add=s.fail_open,
        status_on_error=http_status_pb2.HttpStatus(code=s.status_on_error),  # type: ignore[arg-type]
        metadata_context_namespaces=[JWT_FILTER],
    )
    _set_service(cfg, _service(checks, route=False))
    if s.service == "builtin" and s.protocol == "http":
        # Envoy takes the request headers to send from the filter instance only (a route's
        # override is ignored there): send them all, as gRPC mode does, except the ones Envoy
        # itself sets for the decision service, so a client can never forge them.
        cfg.allowed_headers.patterns.add().safe_regex.regex = ".*"
        _exact(cfg, "disallowed_headers", list(RESERVED_HEADERS))
    return cfg


def _per_route(checks: Checks, log: bool) -> any_pb2.Any:
    s = _spec(checks)
    settings = ea.CheckSettings(context_extensions={
        POLICY_KEY: checks.policy, LEVEL_KEY: checks.level, TARGET_KEY: checks.target})
    if s.service == "builtin":
        settings.context_extensions[RULES_KEY] = rules_digest(checks.spec, checks.resolved.ext_keys)
    _set_service(settings, _service(checks, route=True, log=log))
    return enable(ea.ExtAuthzPerRoute(check_settings=settings))


def _ext(lst: ListenerIR) -> list[Checks]:
    return [c for c in lst.all_checks() if c.spec.ext_auth is not None and not native(c)]


class ExtAuthz(Filter):
    prefix = "envoy.filters.http.ext_authz"

    def _instance(self, checks: Checks) -> str:
        """Instances per level, protocol and failure behaviour (fixed per instance by Envoy)."""
        s = _spec(checks)
        mode = "open" if s.fail_open else f"closed-{s.status_on_error}"
        return self.name(checks.level, s.protocol or "", mode)

    def http_filters(self, lst: ListenerIR) -> list[hcm.HttpFilter]:
        first: dict[str, Checks] = {}
        for checks in _ext(lst):
            if not _byo(checks):
                first.setdefault(self._instance(checks), checks)
        ordered = sorted(first.items(), key=lambda kv: (kv[1].level != "gateway", kv[0]))
        shadow = {c.level for c in _ext(lst) if _reports(c)}
        byo = {c.level for c in _ext(lst) if _byo(c)}
        idle = lua_pb2.Lua(default_source_code=base_pb2.DataSource(inline_string=_LUA_IDLE))
        return [*(http_filter(n, _filter(checks), disabled=True) for n, checks in ordered),
                *(http_filter(f"{_LUA}.{lvl}", idle, disabled=True) for lvl in LEVELS if lvl in byo),
                *(shadow_recorder(recorder_name("extAuth", lvl)) for lvl in LEVELS if lvl in shadow)]

    def level_config(self, lst: ListenerIR, checks: Checks) -> PerFilterConfig:
        if not checks.spec.ext_auth or native(checks):  # engine: native: compiled by dynamic_module
            return {}
        log = bool(lst.env.opts.decision_log_cluster)
        if not _reports(checks):
            return {self._instance(checks): _per_route(checks, log)}
        if _byo(checks):
            return {**_byo_shadow(checks), **_recorded(checks)}
        return {self._instance(checks): _per_route(checks, log), **_recorded(checks)}

    def resources(self, lst: ListenerIR) -> Needs:
        """The decision services: authplane's own (builtin) or the Backend a policy names."""
        return Needs(clusters=tuple(_cluster(lst, _spec(c)) for c in _ext(lst)))


FILTER = ExtAuthz()
