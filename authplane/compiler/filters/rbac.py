"""envoy.filters.http.rbac: one instance per level (gateway, route), rules carried in RDS.

Both instances sit in the HTTP connection manager with no rules (pass-through); the rules travel
per virtual host (gateway level) and per route (route level) as ``RBACPerRoute``, so a rule change
is a route update that reaches kept-alive connections. Each level compiles to a single RBAC
policy set: with ``default: deny`` an ALLOW action whose policies are "this allow rule and no
deny rule"; with ``default: allow`` a DENY action with the deny rules. Deny rules win either way.

``mode: shadow`` is Envoy's own ``shadow_rules``: a shadow policy's level carries the whole rule
set as shadow rules and no enforced rules; a shadow rule is left out of the enforced rules (as if
it were not there) and kept in the shadow rules, the whole policy. Envoy evaluates them on every
request and writes the result under ``shadow_rules_stat_prefix`` = ``contract.shadow_prefix``
(cost: one more engine evaluation per request). The other checks reuse this to record what they
cannot run in shadow themselves: ``shadow_recorder`` instances, placed by their modules right
after their own filters, hold only shadow rules (``shadow_record``) saying "this check passed".
"""

from __future__ import annotations

import functools

from envoy.config.core.v3 import address_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.type.matcher.v3 import metadata_pb2, path_pb2, regex_pb2, string_pb2, value_pb2
from google.api.expr.v1alpha1 import syntax_pb2 as expr_pb2
from google.protobuf import any_pb2

from authplane.compiler import cel
from authplane.compiler.filters.base import Filter, PerFilterConfig, http_filter
from authplane.compiler.ir import LEVELS, Checks, ListenerIR
from authplane.compiler.protos import pack
from authplane.contract import JWT_FILTER, JWT_PAYLOAD_KEY, MODE_SHADOW, deny_prefix, enforced_prefix, shadow_prefix
from authplane.policy.model import Authorization, Conditions
from authplane.policy.types import PathMatch, StringMatch, scope_regex


def _any_of(principals: list[rbac.Principal]) -> rbac.Principal:
    if len(principals) == 1:
        return principals[0]
    return rbac.Principal(or_ids=rbac.Principal.Set(ids=principals))


def _all_of(principals: list[rbac.Principal]) -> rbac.Principal:
    flat: list[rbac.Principal] = []
    for p in principals:
        flat.extend(p.and_ids.ids if p.HasField("and_ids") else [p])
    principals = [p for p in flat if not p.any] or principals[:0]
    if not principals:
        return rbac.Principal(any=True)
    if len(principals) == 1:
        return principals[0]
    return rbac.Principal(and_ids=rbac.Principal.Set(ids=principals))


def _exact(value: str) -> string_pb2.StringMatcher:
    return string_pb2.StringMatcher(exact=value)


@functools.lru_cache(maxsize=1024)
def _segments(path: str) -> tuple[metadata_pb2.MetadataMatcher.PathSegment, ...]:
    return tuple(metadata_pb2.MetadataMatcher.PathSegment(key=k) for k in (JWT_PAYLOAD_KEY, *path.split(".")))


def _string(value: StringMatch) -> string_pb2.StringMatcher:
    if value.prefix is not None:
        return string_pb2.StringMatcher(prefix=value.prefix)
    if value.regex is not None:
        return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=value.regex))
    assert value.exact is not None
    return _exact(value.exact)


def _metadata(path: str, value: value_pb2.ValueMatcher) -> rbac.Principal:
    matcher = metadata_pb2.MetadataMatcher(filter=JWT_FILTER, path=_segments(path), value=value)
    return rbac.Principal(sourced_metadata=rbac.SourcedMetadata(metadata_matcher=matcher))


def _string_or_list(path: str, string: string_pb2.StringMatcher) -> rbac.Principal:
    """A claim may be a string or an array of strings: match either shape."""
    return _any_of([
        _metadata(path, value_pb2.ValueMatcher(string_match=string)),
        _metadata(path, value_pb2.ValueMatcher(list_match=value_pb2.ListMatcher(
            one_of=value_pb2.ValueMatcher(string_match=string)))),
    ])


def _claim(path: str, value: StringMatch) -> rbac.Principal:
    if value.present:
        return _metadata(path, value_pb2.ValueMatcher(present_match=True))
    return _string_or_list(path, _string(value))


def _scope(scope: str) -> rbac.Principal:
    """One scope in ``scope`` or ``scp``, either a space-delimited string or an array."""
    words = string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=scope_regex(scope)))
    return _any_of([
        p for claim in ("scope", "scp") for p in (
            _metadata(claim, value_pb2.ValueMatcher(string_match=words)),
            _metadata(claim, value_pb2.ValueMatcher(list_match=value_pb2.ListMatcher(
                one_of=value_pb2.ValueMatcher(string_match=_exact(scope))))))])


def _header(header: str, value: str | StringMatch) -> rbac.Principal:
    if isinstance(value, str):
        return rbac.Principal(header=rc.HeaderMatcher(name=header, string_match=_exact(value)))
    if value.present:
        return rbac.Principal(header=rc.HeaderMatcher(name=header, present_match=True))
    return rbac.Principal(header=rc.HeaderMatcher(name=header, string_match=_string(value)))


def _path(match: PathMatch, ignore_case: bool) -> list[rbac.Principal]:
    """Exact ``/x`` (or ``/x/``) matches ``/x`` and ``/x/``; ``/x/*`` matches ``/x`` and below; a
    regex matches the whole path (``ignore_case`` has no effect on Envoy regexes: ``(?i)`` does)."""
    def url(**match: str) -> rbac.Principal:
        m = string_pb2.StringMatcher(ignore_case=ignore_case, **match)
        return rbac.Principal(url_path=path_pb2.PathMatcher(path=m))

    if match.regex is not None:
        regex = regex_pb2.RegexMatcher(regex=("(?i)" if ignore_case else "") + match.regex)
        return [rbac.Principal(url_path=path_pb2.PathMatcher(path=string_pb2.StringMatcher(safe_regex=regex)))]
    pattern = match.path
    assert pattern is not None
    base = pattern.removesuffix("*").rstrip("/")
    if not base:  # "/" or "/*"
        return [url(prefix="/") if pattern == "/*" else url(exact="/")]
    return [url(exact=base), url(prefix=base + "/") if pattern.endswith("/*") else url(exact=base + "/")]


def _san(pattern: str) -> rbac.Principal:
    """The verified client certificate names ``pattern`` (``x*``: a prefix; ``*``: any name).
    Envoy's ``authenticated`` principal tries the URI SANs, then the DNS SANs, then the subject; a
    connection without a verified certificate matches none (``.+`` keeps ``*`` from matching the
    empty subject of no certificate)."""
    if pattern == "*":
        matcher = string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=".+"))
    elif pattern.endswith("*"):
        matcher = string_pb2.StringMatcher(prefix=pattern[:-1])
    else:
        matcher = _exact(pattern)
    return rbac.Principal(authenticated=rbac.Principal.Authenticated(principal_name=matcher))


def _cidr(cidr: str) -> rbac.Principal:
    ip, _, plen = cidr.partition("/")
    return rbac.Principal(remote_ip=address_pb2.CidrRange(address_prefix=ip, prefix_len={"value": int(plen)}))


@functools.lru_cache(maxsize=256)
def _methods(methods: tuple[str, ...]) -> rbac.Principal:
    """Cached: the same few method sets recur in every policy. Callers copy it (protobuf
    constructors and ``extend`` copy messages), never change it."""
    return _any_of([_header(":method", m) for m in methods])


def conditions(when: Conditions, ignore_case: bool = False) -> rbac.Principal:
    """All kinds must match; any value within a kind matches; every scope must be there; ``not``
    must not match."""
    parts: list[rbac.Principal] = []
    for claim, values in sorted(when.claims.items()):
        parts.append(_any_of([_claim(claim, v) for v in values]))
    for header, values in sorted(when.headers.items()):
        parts.append(_any_of([_header(header, v) for v in values]))
    if when.source_cidrs:
        parts.append(_any_of([_cidr(c) for c in when.source_cidrs]))
    if when.methods:
        parts.append(_methods(tuple(when.methods)))
    if when.paths:
        parts.append(_any_of([m for p in when.paths for m in _path(p, ignore_case)]))
    parts.extend(_scope(s) for s in sorted(set(when.scopes)))
    if when.client_cert is not None:
        parts.append(_any_of([_san(s) for s in when.client_cert.sans]))
    if when.not_ is not None:
        parts.append(rbac.Principal(not_id=conditions(when.not_, ignore_case)))
    return _all_of(parts)


def _policy(principal: rbac.Principal, condition: expr_pb2.Expr | None) -> rbac.Policy:
    policy = rbac.Policy(permissions=[rbac.Permission(any=True)], principals=[principal])
    if condition is not None:
        policy.condition.CopyFrom(condition)
    return policy


def _cel(when: Conditions) -> list[expr_pb2.Expr]:
    return [cel.expression(when.cel)] if when.cel is not None else []


def _unless(deny: list[tuple[rbac.Principal, expr_pb2.Expr]]) -> list[tuple[list[rbac.Principal], list[expr_pb2.Expr]]]:
    """The ways to match none of the (principal, cel) deny rules: for each, its principal does not
    match or its expression is false. A policy's ``condition`` cannot sit inside a principal, so
    each way becomes one RBAC policy (2^n ways at most, see ``policy.cel.MAX_DENY_RULES``)."""
    ways: list[tuple[list[rbac.Principal], list[expr_pb2.Expr]]] = [([], [])]
    for principal, expr in deny:
        ways = ([([*p, rbac.Principal(not_id=principal)], e) for p, e in ways if not principal.any]
                + [(p, [*e, cel.negate(expr)]) for p, e in ways])
    return ways


def rules(authz: Authorization, ignore_case: bool = False) -> rbac.RBAC:
    deny = [r for r in authz.rules if r.action == "deny"]
    allow = [r for r in authz.rules if r.action == "allow"]
    if authz.default == "allow":
        return rbac.RBAC(action=rbac.RBAC.DENY, policies={
            r.name: _policy(conditions(r.when, ignore_case), cel.all_of(_cel(r.when))) for r in deny})
    plain = [conditions(r.when, ignore_case) for r in deny if r.when.cel is None]
    denied = [rbac.Principal(not_id=_any_of(plain))] if plain else []
    with_cel = [(conditions(r.when, ignore_case), cel.expression(r.when.cel))
                for r in deny if r.when.cel is not None]
    policies: dict[str, rbac.Policy] = {}
    for r in allow:
        for n, (principals, exprs) in enumerate(_unless(with_cel)):
            policies[r.name if n == 0 else f"{r.name}#{n + 1}"] = _policy(
                _all_of([conditions(r.when, ignore_case), *denied, *principals]),
                cel.all_of([*_cel(r.when), *exprs]))
    return rbac.RBAC(action=rbac.RBAC.ALLOW, policies=policies)


class Rbac(Filter):
    prefix = "envoy.filters.http.rbac"

    def http_filters(self, lst: ListenerIR) -> list[hcm.HttpFilter]:
        levels = {c.level for c in lst.all_checks() if c.spec.authorization}
        return [http_filter(self.name(lvl), rbac_filter.RBAC()) for lvl in LEVELS if lvl in levels]

    def level_config(self, lst: ListenerIR, checks: Checks) -> PerFilterConfig:
        authz = checks.spec.authorization
        if authz is None:
            return {}
        ignore_case = not lst.case_sensitive
        cfg = rbac_filter.RBAC()
        shadowed = [r for r in authz.rules if r.mode == MODE_SHADOW]
        if checks.spec.mode != MODE_SHADOW:
            enforced = authz.model_copy(update={"rules": [r for r in authz.rules if r.mode != MODE_SHADOW]})
            cfg.rules.CopyFrom(rules(enforced, ignore_case))
            cfg.rules_stat_prefix = enforced_prefix(checks.policy)
        if checks.spec.mode == MODE_SHADOW or shadowed:
            cfg.shadow_rules.CopyFrom(rules(authz, ignore_case))
            cfg.shadow_rules_stat_prefix = shadow_prefix("authorization", checks.level, checks.policy)
        elif lst.env.opts.decision_log_cluster and authz.default == "deny" and any(
                r.action == "deny" for r in authz.rules):
            # Only to name the deny rule of a denial in the decision log (contract.deny_prefix):
            # one more evaluation of the deny rules per request, so only when the log is on.
            cfg.shadow_rules.CopyFrom(rules(authz.model_copy(update={"default": "allow"}), ignore_case))
            cfg.shadow_rules_stat_prefix = deny_prefix(checks.level, checks.policy)
        return {self.name(checks.level): pack(rbac_filter.RBACPerRoute(rbac=cfg))}


def recorder_name(check: str, level: str) -> str:
    """The name of a level's recorder instance for ``check`` (``envoy.filters.http.rbac.shadow.*``)."""
    return FILTER.name("shadow", check, level)


def shadow_recorder(name: str) -> hcm.HttpFilter:
    """An RBAC instance that only records (``shadow_rules`` set per virtual host and route): how a
    check Envoy cannot run in shadow itself records its would-deny (``authplane/contract.py``)."""
    return http_filter(name, rbac_filter.RBAC())


def shadow_record(check: str, checks: Checks, passed: rbac.Principal) -> any_pb2.Any:
    """A recorder's per-route config: ``allowed`` when ``passed`` matches, ``denied`` otherwise."""
    shadow = rbac.RBAC(action=rbac.RBAC.ALLOW, policies={check: _policy(passed, None)})
    return pack(rbac_filter.RBACPerRoute(rbac=rbac_filter.RBAC(
        shadow_rules=shadow, shadow_rules_stat_prefix=shadow_prefix(check, checks.level, checks.policy))))


def header_regex(header: str, regex: str) -> rbac.Principal:
    """Matches when the whole value of ``header`` matches ``regex`` (RE2)."""
    m = string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=regex))
    return rbac.Principal(header=rc.HeaderMatcher(name=header, string_match=m))


def metadata_present(namespace: str, key: str) -> rbac.Principal:
    """Matches when dynamic metadata ``namespace``/``key`` is set."""
    matcher = metadata_pb2.MetadataMatcher(filter=namespace, path=[metadata_pb2.MetadataMatcher.PathSegment(key=key)],
                                           value=value_pb2.ValueMatcher(present_match=True))
    return rbac.Principal(sourced_metadata=rbac.SourcedMetadata(metadata_matcher=matcher))


FILTER = Rbac()
