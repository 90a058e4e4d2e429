"""IR → Envoy v3 resources (Listener, RouteConfiguration, Cluster, ClusterLoadAssignment)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2, grpc_service_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2 as cel_filter
from envoy.extensions.access_loggers.grpc.v3 import als_pb2 as grpc_als
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as upstream_http
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, wrappers_pb2
from google.protobuf.message import Message

from authplane.compiler import satisfy, tls
from authplane.compiler.filters import ORDER, auth_method, router
from authplane.compiler.filters.base import disable
from authplane.compiler.ir import ClusterIR, FleetIR, ListenerIR, Origin, RouteIR
from authplane.compiler.module_protos import DynamicModuleAccessLog
from authplane.compiler.protos import ads_source, duration, pack, socket_address
from authplane.contract import (
    IDENTITY_HEADERS,
    MODE_SHADOW,
    RBAC_DENIED,
    RBAC_ENFORCED_RESULT,
    RBAC_FILTER,
    RBAC_SHADOW_RESULT,
    RBAC_SHADOW_RULE,
    SHADOW_POLICY_KEY,
    SHADOW_RULE_KEY,
    SHADOW_VERDICT_KEY,
    deny_prefix,
    enforced_prefix,
    shadow_prefix,
)
from authplane.policy.model import AuthPolicySpec
from authplane.policy.modules import NATIVE_RULES

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
TYPE_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET)
"""The order Envoy needs: clusters and their endpoints before the listeners and routes using them.
Secrets (SDS, requested by name like routes and endpoints) are read by listeners' filters, which
wait for them while the listener warms."""


def http_filters(lst: ListenerIR) -> list[hcm.HttpFilter]:
    return [f for filt in ORDER for f in filt.http_filters(lst)]


DECISION_LOG_NAME = "authplane.decisions"
"""The ``log_name`` of the decision log's access logger (``serve --decision-log``)."""
DECISION_LOG_BUFFER = 64 * 1024
"""Bytes of entries an Envoy worker buffers before a send (else once a second): fewer, larger
messages than Envoy's 16 KiB default cost both sides less per entry."""


def identity_headers(spec: AuthPolicySpec) -> list[str]:
    """Request headers carrying the identity a policy's checks established (Basic user, API-key
    client, the builtin service's user): what the decision log reads, never a credential."""
    names = {spec.basic_auth.user_header if spec.basic_auth else None,
             spec.api_key.client_header if spec.api_key else None}
    ext = spec.ext_auth
    if ext is not None and ext.service == "builtin":
        names.add(IDENTITY_HEADERS[0] if ext.identity_headers else None)
        names.add(ext.api_keys.client_header if ext.api_keys else None)
    return sorted(n for n in names if n)


VERDICTS = ("allow", "deny", "would-deny")
_UPSTREAM = "response.code_details == 'via_upstream'"
"""The upstream answered: every check let the request pass (else a check's local reply denied it)."""
SAMPLE_RUNTIME_KEY = "authplane.decision_log.allow_sample"


def shadow_result_keys(lst: ListenerIR) -> list[str]:
    """The dynamic metadata keys where the listener's shadow checks record their result (a superset:
    a key a route never writes is just absent there)."""
    keys = set()
    for c in lst.all_checks():
        spec = c.spec
        for check, section in (("authorization", spec.authorization), ("jwt", spec.jwt),
                               ("basicAuth", spec.basic_auth), ("apiKey", spec.api_key), ("extAuth", spec.ext_auth)):
            rules = getattr(section, "rules", None) or ()
            if section is not None and (spec.mode == MODE_SHADOW or any(r.mode == MODE_SHADOW for r in rules)):
                keys.add(shadow_prefix(check, c.level, c.policy) + RBAC_SHADOW_RESULT)
    return sorted(keys)


def _shadow_denied(keys: list[str]) -> str:
    """CEL: some shadow check recorded a would-deny (``contract.py``: every check type records one
    under one of ``keys``). Envoy's CEL has no comprehensions: the keys are spelled out."""
    if not keys:
        return "false"
    ns = f"metadata.filter_metadata[{json.dumps(RBAC_FILTER)}]"
    found = " || ".join(f"({json.dumps(k)} in {ns} && {ns}[{json.dumps(k)}] == {json.dumps(RBAC_DENIED)})"
                        for k in keys)
    return f"({json.dumps(RBAC_FILTER)} in metadata.filter_metadata && ({found}))"


def _cel(expression: str) -> accesslog_pb2.AccessLogFilter:
    return accesslog_pb2.AccessLogFilter(extension_filter=accesslog_pb2.ExtensionFilter(
        name="envoy.access_loggers.extension_filters.cel", typed_config=pack(cel_filter.ExpressionFilter(
            expression=expression))))


def verdict_filter(verdicts: tuple[str, ...], sample: float, shadow_keys: list[str],
                   ) -> accesslog_pb2.AccessLogFilter | None:
    """The entries Envoy reports (``serve --decision-log-verdicts``/``--decision-log-sample``),
    told apart as the decision log does (``controlplane/decisions.py``): ``deny`` a check's local
    reply, ``would-deny`` a shadow record, ``allow`` the rest, of which a runtime filter keeps
    ``sample`` (by request id). None: every entry (the default, no filter evaluated)."""
    if set(verdicts) >= set(VERDICTS) and sample >= 1:
        return None
    shadow = _shadow_denied(shadow_keys)
    allow = f"{_UPSTREAM} && !{shadow}"
    parts = ([f"!({_UPSTREAM})"] if "deny" in verdicts else []) + (
        [f"{_UPSTREAM} && {shadow}"] if "would-deny" in verdicts and shadow_keys else [])
    if "allow" in verdicts and sample >= 1:
        parts.append(allow)
    filters = [_cel(" || ".join(f"({p})" for p in parts))] if parts else []
    if "allow" in verdicts and sample < 1:
        share = percent_pb2.FractionalPercent(numerator=round(sample * 1_000_000),
                                              denominator=percent_pb2.FractionalPercent.MILLION)
        sampled = accesslog_pb2.RuntimeFilter(runtime_key=SAMPLE_RUNTIME_KEY, percent_sampled=share)
        filters.append(accesslog_pb2.AccessLogFilter(and_filter=accesslog_pb2.AndFilter(
            filters=[_cel(allow), accesslog_pb2.AccessLogFilter(runtime_filter=sampled)])))
    if len(filters) <= 1:
        return filters[0] if filters else _cel("false")  # nothing of these verdicts on this listener
    return accesslog_pb2.AccessLogFilter(or_filter=accesslog_pb2.OrFilter(filters=filters))


NATIVE_LOGGER = "decision_log"
"""The access logger and bootstrap extension of authplane's module (``native/authplane_rules``)
that report decisions in compact batches (``serve --decision-log-transport native``)."""


def native_logger_config(lst: ListenerIR) -> str:
    """What the module's logger reads of each request besides route, status, details, request id,
    start time, JWT ``sub`` and certificate SAN: the RBAC and ext_authz metadata keys the decision
    log classifies with (``controlplane/decisions.py``) and the identity headers (no credential)."""
    rbac: set[str] = set()
    for c in lst.all_checks():
        authz = c.spec.authorization
        if authz is None:
            continue
        if c.spec.mode != MODE_SHADOW:  # what filters/rbac.py writes, and only that: each is a lookup
            rbac.add(enforced_prefix(c.policy) + RBAC_ENFORCED_RESULT)
        if authz.default == "deny" and any(r.action == "deny" for r in authz.rules) and not (
                c.spec.mode == MODE_SHADOW or any(r.mode == MODE_SHADOW for r in authz.rules)):
            rbac.update(deny_prefix(c.level, c.policy) + k for k in (RBAC_SHADOW_RESULT, RBAC_SHADOW_RULE))
    for key in shadow_result_keys(lst):
        rbac.update((key, key[:-len(RBAC_SHADOW_RESULT)] + RBAC_SHADOW_RULE))
    ext = [SHADOW_VERDICT_KEY, SHADOW_POLICY_KEY, SHADOW_RULE_KEY] if any(
        c.spec.ext_auth is not None for c in lst.all_checks()) else []
    headers = sorted({h for c in lst.all_checks() for h in identity_headers(c.spec)})
    return json.dumps({"rbac": sorted(rbac), "ext_authz": ext, "headers": headers}, separators=(",", ":"))


def decision_log(lst: ListenerIR, cluster: str) -> accesslog_pb2.AccessLog:
    """Envoy's gRPC access log to authplane: route, response code details and dynamic metadata
    (the JWT payload, shadow results) come with every entry; of the request headers only the
    identity headers the listener's checks set are added (no ``authorization``, key or cookie).
    The verdict filter, if any, runs in Envoy: unwanted entries are never built nor sent."""
    cfg = grpc_als.HttpGrpcAccessLogConfig(
        common_config=grpc_als.CommonGrpcAccessLogConfig(
            log_name=DECISION_LOG_NAME, transport_api_version=config_source_pb2.V3,
            buffer_size_bytes={"value": DECISION_LOG_BUFFER},
            grpc_service=grpc_service_pb2.GrpcService(
                envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=cluster))),
        additional_request_headers_to_log=sorted({h for c in lst.all_checks() for h in identity_headers(c.spec)}))
    opts = lst.env.opts
    found = verdict_filter(opts.decision_log_verdicts, opts.decision_log_sample, shadow_result_keys(lst))
    if opts.decision_log_native:  # the module's logger: a few fields, shipped by its bootstrap extension
        native = DynamicModuleAccessLog(logger_name=NATIVE_LOGGER)
        native.dynamic_module_config.name = NATIVE_RULES
        native.logger_config.CopyFrom(pack(wrappers_pb2.StringValue(value=native_logger_config(lst))))
        return accesslog_pb2.AccessLog(name="envoy.access_loggers.dynamic_modules", typed_config=pack(native),
                                       filter=found)
    return accesslog_pb2.AccessLog(name="envoy.access_loggers.http_grpc", typed_config=pack(cfg), filter=found)


def listener(lst: ListenerIR, filters: list[hcm.HttpFilter]) -> listener_pb2.Listener:
    manager = hcm.HttpConnectionManager(
        stat_prefix=lst.name.replace("/", "_"),
        rds=hcm.Rds(config_source=ads_source(), route_config_name=lst.route_config_name),
        http_filters=filters,
        # Hardening: the client address is the TCP peer unless trusted proxies are declared;
        # paths are normalised before any path rule sees them.
        use_remote_address={"value": True},
        xff_num_trusted_hops=lst.xff_num_trusted_hops,
        merge_slashes=True,
        path_with_escaped_slashes_action=hcm.HttpConnectionManager.UNESCAPE_AND_REDIRECT,
        common_http_protocol_options=protocol_pb2.HttpProtocolOptions(
            headers_with_underscores_action=protocol_pb2.HttpProtocolOptions.REJECT_REQUEST),
        request_headers_timeout=duration(10),
    )
    manager.normalize_path.value = True  # BoolValue: unset means "runtime default"
    if lst.env.opts.decision_log_cluster:
        manager.access_log.append(decision_log(lst, lst.env.opts.decision_log_cluster))
    out = listener_pb2.Listener(
        name=lst.name,
        address=socket_address(lst.address, lst.port),
        filter_chains=[listener_components_pb2.FilterChain(filters=[listener_components_pb2.Filter(
            name="envoy.filters.network.http_connection_manager", typed_config=pack(manager))])],
    )
    if lst.tls is not None:
        tls.https_listener(out, lst)
    return out


AMBIGUOUS_PATH = r".*(?:;|%3[Bb]|\.$|\./).*"
"""A path (normalised, without the query) with a path parameter or a segment ending in a dot. Envoy
keeps ``;`` and ``%3B`` and resolves only the ``.`` and ``..`` segments, while backends such as
Tomcat or IIS serve ``/a;x``, ``/a.`` and ``/a./b`` as ``/a`` and ``/a/b``: refused, so that no path
rule is dodged with them."""
GUARD_ROUTE = "authplane:ambiguous-path"


def _match(route: RouteIR, case_sensitive: bool) -> rc.RouteMatch:
    """Route paths as path rules read them: an exact path also matches with a trailing slash (else
    ``/x/`` would fall through to a route without the policy of ``/x``)."""
    m = route.match
    out = rc.RouteMatch()
    flags = "" if case_sensitive else "(?i)"
    if m.path is not None and m.path != "/":
        out.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex=f"{flags}{re.escape(m.path.rstrip('/'))}/?"))
    elif m.path is not None:
        out.path = "/"
    elif m.path_regex is not None:
        out.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex=flags + m.path_regex))
    elif m.path_prefix in (None, "/"):
        out.prefix = "/"
    else:
        out.path_separated_prefix = (m.path_prefix or "").rstrip("/")
    if not case_sensitive and out.HasField("path_separated_prefix"):
        out.case_sensitive.value = False
    for header, value in sorted(m.headers.items()):
        out.headers.append(rc.HeaderMatcher(name=header, string_match=string_pb2.StringMatcher(exact=value)))
    if m.methods:
        methods = sorted(set(m.methods))
        matcher = (string_pb2.StringMatcher(exact=methods[0]) if len(methods) == 1 else
                   string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex="|".join(methods))))
        out.headers.append(rc.HeaderMatcher(name=":method", string_match=matcher))
    return out


def _carried(match: rc.RouteMatch, carried: tuple[satisfy.Carried, ...]) -> None:
    """Add to ``match`` that the request carries these credentials (``satisfy: any`` variants)."""
    for w in carried:
        if w.kind == "query":
            match.query_parameters.append(rc.QueryParameterMatcher(name=w.name, present_match=True))
        elif w.kind == "cookie":
            cookie = string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(
                regex=f"(.*;)?\\s*{re.escape(w.name)}=.*"))
            match.headers.append(rc.HeaderMatcher(name="cookie", string_match=cookie))
        elif w.prefix:
            match.headers.append(rc.HeaderMatcher(name=w.name, string_match=string_pb2.StringMatcher(
                prefix=w.prefix, ignore_case=True)))
        else:
            match.headers.append(rc.HeaderMatcher(name=w.name, present_match=True))


RouteKey = tuple[str, str]
"""(virtual host, route IR name) within one listener."""


@dataclass
class RouteMemo:
    """One fleet's route table entries of the last compile, reused by the next one.

    A route's entries (its ``satisfy: any`` variants, matches, per-filter configs) are built from
    the route IR and the listener's context alone: its gateway-level checks, path matching, Env
    and HTTP filter chain (filter hooks' ``route_config`` read no other route). The next compile
    reuses them where both are equal (dataclass equality: documents of unchanged files are the
    same objects, so comparing is mostly identity checks). Only what the last compile used is
    kept, so memory stays that of one revision."""

    listeners: dict[str, tuple[tuple[Any, ...], dict[RouteKey, tuple[RouteIR, list[rc.Route]]]]] = field(
        default_factory=dict)
    reused: int = 0
    built: int = 0


def _route_entries(lst: ListenerIR, route: RouteIR, auth_filters: list[str]) -> list[rc.Route]:
    out: list[rc.Route] = []
    for r in satisfy.expand(lst, route):
        v = satisfy.variant_of(r)
        match = _match(r, lst.case_sensitive)
        if v is not None:
            _carried(match, v.carried)
        if v is not None and v.challenges:
            # satisfy: any, no credential: 401 with every scheme's challenge, nothing checked.
            entry = rc.Route(name=r.name, match=match, direct_response=rc.DirectResponseAction(
                status=401, body=base_pb2.DataSource(inline_string="authplane: credentials required\n")))
            entry.response_headers_to_add.extend(base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key="www-authenticate", value=c),
                append_action=base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD) for c in v.challenges)
            for f in auth_filters:
                entry.typed_per_filter_config[f].CopyFrom(disable())
            out.append(entry)
            continue
        action = rc.RouteAction(cluster=r.cluster)
        if r.timeout is not None:
            action.timeout.CopyFrom(duration(r.timeout))
        entry = rc.Route(name=r.name, match=match, route=action)
        per: dict[str, any_pb2.Any] = {}
        if r.public:
            per = {f: disable() for f in auth_filters}
            per.update(auth_method.public_config(lst))
        else:
            for filt in ORDER:
                per.update(filt.route_config(lst, r))
        for key in sorted(per):
            entry.typed_per_filter_config[key].CopyFrom(per[key])
        out.append(entry)
    return out


def route_configuration(lst: ListenerIR, filters: list[hcm.HttpFilter], memo: RouteMemo | None = None,
                        last: RouteMemo | None = None) -> route_pb2.RouteConfiguration:
    """The listener's route table; with ``memo`` its route entries are recorded there, and those
    of ``last`` (the previous compile's) reused where their inputs are equal (see ``RouteMemo``)."""
    auth_filters = [f.name for f in filters if f.name != router.FILTER.name()]
    vhost_cfg: dict[str, any_pb2.Any] = {}
    for filt in ORDER:
        vhost_cfg.update(filt.vhost_config(lst))
    out = route_pb2.RouteConfiguration(name=lst.route_config_name)
    if lst.redirect_port is not None:
        return tls.redirect_routes(out, lst.redirect_port)
    context = (lst.checks, lst.case_sensitive, lst.env, tuple(auth_filters))
    before: dict[RouteKey, tuple[RouteIR, list[rc.Route]]] = {}
    if last is not None and (found := last.listeners.get(lst.name)) is not None and found[0] == context:
        before = found[1]
    now: dict[RouteKey, tuple[RouteIR, list[rc.Route]]] = {}
    if memo is not None:
        memo.listeners[lst.name] = (context, now)
    for vh in lst.virtual_hosts:
        vhost = out.virtual_hosts.add(name=vh.name, domains=vh.domains)
        for key in sorted(vhost_cfg):
            vhost.typed_per_filter_config[key].CopyFrom(vhost_cfg[key])
        if lst.reject_ambiguous:
            # First route of every host, no check on it: refused before any filter could let it by.
            guard = vhost.routes.add(
                name=GUARD_ROUTE, match=rc.RouteMatch(safe_regex=regex_pb2.RegexMatcher(regex=AMBIGUOUS_PATH)),
                direct_response=rc.DirectResponseAction(status=400, body=base_pb2.DataSource(
                    inline_string="authplane: ambiguous path (a ';' or a segment ending in '.')\n")))
            for f in auth_filters:
                guard.typed_per_filter_config[f].CopyFrom(disable())
        for route in vh.routes:
            rkey = (vh.name, route.name)
            cached = before.get(rkey)
            if cached is not None and cached[0] == route:
                entries = cached[1]
                if memo is not None:
                    memo.reused += 1
            else:
                entries = _route_entries(lst, route, auth_filters)
                if memo is not None:
                    memo.built += 1
            if memo is not None:
                now[rkey] = (route, entries)
            vhost.routes.extend(entries)  # copies: the cached messages are never changed
    return out


def cluster(c: ClusterIR, eds: bool = True) -> cluster_pb2.Cluster:
    out = cluster_pb2.Cluster(name=c.name, connect_timeout=duration(c.connect_timeout))
    if eds and c.static_ips:
        out.type = cluster_pb2.Cluster.EDS
        out.eds_cluster_config.eds_config.CopyFrom(ads_source())
    else:
        out.type = cluster_pb2.Cluster.STATIC if c.static_ips else cluster_pb2.Cluster.STRICT_DNS
        out.load_assignment.CopyFrom(load_assignment(c))
        if not c.static_ips:
            out.dns_lookup_family = cluster_pb2.Cluster.V4_PREFERRED
    if c.http2:
        h2 = protocol_pb2.Http2ProtocolOptions()
        if c.max_streams:
            h2.max_concurrent_streams.value = c.max_streams
        opts = upstream_http.HttpProtocolOptions(explicit_http_config=upstream_http.HttpProtocolOptions.
                                                 ExplicitHttpConfig(http2_protocol_options=h2))
        out.typed_extension_protocol_options[
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].CopyFrom(pack(opts))
    if c.tls:
        out.transport_socket.CopyFrom(tls.upstream_socket(c))
    return out


def load_assignment(c: ClusterIR) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=c.name, endpoints=[
        endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[
            endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
                address=socket_address(host, port))) for host, port in c.endpoints])])


class Resources:
    """The Envoy resources of one fleet, per type URL, with the policy object behind each one."""

    def __init__(self) -> None:
        self.by_type: dict[str, dict[str, Message]] = {t: {} for t in TYPE_ORDER}
        self.origins: dict[tuple[str, str], list[Origin]] = {}

    def add(self, type_url: str, name: str, msg: Message, *origins: Origin | None) -> None:
        self.by_type[type_url][name] = msg
        found = self.origins.setdefault((type_url, name), [])
        found.extend(dict.fromkeys(o for o in origins if o is not None and o not in found))


def fleet_resources(fleet: FleetIR, memo: RouteMemo | None = None, last: RouteMemo | None = None) -> Resources:
    """With ``memo``/``last``: route entries are recorded in ``memo`` and reused from ``last``
    (``route_configuration``); the same bytes either way."""
    res = Resources()
    clusters: dict[str, ClusterIR] = dict(fleet.clusters)
    for lst in fleet.listeners:
        filters = http_filters(lst)
        origins = [lst.origin, *(c.origin for c in lst.all_checks())]
        res.add(LISTENER, lst.name, listener(lst, filters), *origins)
        route_origins = list(dict.fromkeys(
            origins + [r.origin for vh in lst.virtual_hosts for r in vh.routes]))
        res.add(ROUTE, lst.route_config_name, route_configuration(lst, filters, memo, last), *route_origins)
        for filt in ORDER:
            needs = filt.resources(lst)
            for c in needs.clusters:
                clusters.setdefault(c.name, c)
            for secret in needs.secrets:
                res.add(SECRET, secret.name, secret, *origins)
        for secret in tls.listener_secrets(lst):
            res.add(SECRET, secret.name, secret, lst.origin)
    for name in sorted(clusters):
        c = clusters[name]
        res.add(CLUSTER, name, cluster(c), c.origin)
        for secret in tls.cluster_secrets(c):
            res.add(SECRET, secret.name, secret, c.origin)
        if c.static_ips:
            res.add(ENDPOINT, name, load_assignment(c), c.origin)
    for type_url in TYPE_ORDER:
        res.by_type[type_url] = dict(sorted(res.by_type[type_url].items()))
    return res
