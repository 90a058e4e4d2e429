"""Decisions: one request, one compiled policy → allow (with headers) or deny (with a response).

Protocol-neutral: the gRPC servicer, the Envoy HTTP-mode endpoint and the forward-auth endpoint
each turn what they receive into a ``Request`` and a ``Decision`` into their own answer.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote

import re2

from authplane.authz.rules import CompiledPolicy, KeyTable, Matcher, Rule, Values, trim_slash
from authplane.contract import (
    DENIED,
    IDENTITY_HEADERS,
    SHADOW_POLICY_KEY,
    SHADOW_RULE_KEY,
    SHADOW_VERDICT_KEY,
    WOULD_DENY,
)
from authplane.policy.types import re2_options

BROWSER = "text/html"


@dataclass(slots=True)
class Request:
    """What a decision may read. Header names are lowercase; ``claims`` are verified claims."""

    method: str
    path: str
    """Path with the query string."""
    headers: Mapping[str, str]
    source: str = ""
    host: str = ""
    scheme: str = "http"
    claims: dict[str, Any] | None = None
    claims_raw: bytes = b""
    """The verified payload as received (JSON or protobuf bytes): part of the cache key."""

    @property
    def bare_path(self) -> str:
        return self.path.partition("?")[0]

    def url(self) -> str:
        return f"{self.scheme}://{self.host}{self.path}"


@dataclass(frozen=True, slots=True)
class Decision:
    allow: bool
    rule: str
    """The matching rule; ``""`` when none matched or the request could not be decided."""
    status: int = 200
    body: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    """Deny: the response headers; allow: headers added to the client's response."""
    upstream: tuple[tuple[str, str], ...] = ()
    """Allow: headers set on the upstream request."""
    remove: tuple[str, ...] = ()
    """Allow: headers removed from the upstream request."""
    reason: str = ""
    expires: float | None = None
    """The JWT's ``exp``: an allow is never cached beyond it."""
    would_deny: str = ""
    """``mode: shadow``: the policy whose denial (by ``would_deny_rule``) this allow stands for,
    reported to Envoy as ``contract.WOULD_DENY`` (``shadow_report``)."""
    would_deny_rule: str = ""
    """The rule that would have denied (a shadow deny rule, or any rule of a policy in shadow);
    ``""``: no rule matched."""


def deny(reason: str, status: int = 403) -> Decision:
    """A denial the rules did not produce (unknown policy, malformed request): fail closed."""
    return Decision(False, "", status, f"authplane: {reason}\n", (("content-type", "text/plain"),),
                    reason=reason)


def shadow_report(d: Decision) -> dict[str, str]:
    """What a shadow allow tells Envoy about the denial it stands for (``authplane/contract.py``):
    gRPC mode sends it as dynamic metadata, HTTP mode as response headers Envoy turns into it."""
    return {SHADOW_VERDICT_KEY: WOULD_DENY, SHADOW_POLICY_KEY: d.would_deny, SHADOW_RULE_KEY: d.would_deny_rule}


def deny_report(policy: str, d: Decision) -> dict[str, str]:
    """What an enforced denial by a rule of ``policy`` tells Envoy's access log, never the client
    (``contract.DENIED``); empty for an allow or a denial no rule made."""
    if d.allow or not d.rule:
        return {}
    return {SHADOW_VERDICT_KEY: DENIED, SHADOW_POLICY_KEY: policy, SHADOW_RULE_KEY: d.rule}


def api_client(keys: KeyTable, headers: Mapping[str, str]) -> str | None:
    """The client name of a valid key in the request, else None. Never logs or returns the key."""
    value = headers.get(keys.header)
    if not value or not value.startswith(keys.prefix):
        return None
    digest = hashlib.sha256(value[len(keys.prefix):].strip().encode(errors="surrogateescape")).digest()
    found = None
    for stored, name in keys.buckets.get(digest[:8], ()):
        if hmac.compare_digest(digest, stored):
            found = name
    return found


_MISSING = object()


def _claim(claims: dict[str, Any], path: tuple[str, ...]) -> Any:
    """The claim at ``path``, ``_MISSING`` when there is none (``null`` is a value)."""
    value: Any = claims
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


@functools.lru_cache(maxsize=4096)
def _regex(pattern: str) -> Any:
    return re2.compile(pattern.encode(), re2_options())


def _full_match(pattern: str, value: str) -> bool:
    """RE2 over the bytes Envoy sees (a header undecodable as UTF-8 arrives surrogate-escaped)."""
    return _regex(pattern).fullmatch(value.encode(errors="surrogateescape")) is not None


def _string_matches(value: str, wanted: Values) -> bool:
    return (value in wanted.exact or value.startswith(wanted.prefixes)
            or any(_full_match(p, value) for p in wanted.regexes))


def _claim_matches(value: Any, wanted: Values) -> bool:
    """Like Envoy's metadata matchers: ``present`` takes any value; a string claim must match, an
    array claim must hold a string that does. Exact values also take a number or boolean written
    as text (``"true"``, ``"42"``)."""
    if value is _MISSING:
        return False
    if wanted.present:
        return True
    if isinstance(value, list):
        return any(isinstance(v, str) and _string_matches(v, wanted) for v in value)
    if isinstance(value, str):
        return _string_matches(value, wanted)
    if isinstance(value, bool):
        return ("true" if value else "false") in wanted.exact
    return isinstance(value, int | float) and str(value) in wanted.exact


def _header_matches(headers: Mapping[str, str], name: str, wanted: Values) -> bool:
    value = headers.get(name)
    return value is not None and (wanted.present or _string_matches(value, wanted))


def _scopes(value: Any) -> list[str]:
    if isinstance(value, str):
        return value.split(" ")
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _has_scopes(claims: dict[str, Any], scopes: tuple[str, ...]) -> bool:
    """Every scope in the space-delimited string or array ``scope`` or ``scp`` claim."""
    held = {*_scopes(claims.get("scope")), *_scopes(claims.get("scp"))}
    return all(s in held for s in scopes)


def _path_matches(m: Matcher, path: str) -> bool:
    folded = path.lower() if m.ignore_case else path
    return (trim_slash(folded) in m.paths or folded.startswith(m.prefixes)
            or any(_full_match(p, path) for p in m.path_regexes))


def _in_networks(source: str, m: Matcher) -> bool:
    try:
        ip = ipaddress.ip_address(source)
    except ValueError:
        return False
    return any(ip in net for net in m.networks if net.version == ip.version)


def matches(m: Matcher, req: Request, client: str | None) -> bool:
    if m.methods and req.method not in m.methods:
        return False
    if m.checks_path and not _path_matches(m, req.bare_path):
        return False
    for name, values in m.headers:
        if not _header_matches(req.headers, name, values):
            return False
    if m.networks and not _in_networks(req.source, m):
        return False
    if m.api_clients is not None and (client is None or ("*" not in m.api_clients
                                                          and client not in m.api_clients)):
        return False
    if m.authenticated is not None and m.authenticated != (req.claims is not None or client is not None):
        return False
    if m.claims or m.scopes:
        if req.claims is None:
            return False
        for path_, values in m.claims:
            if not _claim_matches(_claim(req.claims, path_), values):
                return False
        if not _has_scopes(req.claims, m.scopes):
            return False
    return m.negate is None or not matches(m.negate, req, client)


def identity(req: Request, client: str | None) -> tuple[str, str, str]:
    """(user, email, groups) from the verified claims, else the API key's client name."""
    c = req.claims or {}
    user = c.get("sub") if isinstance(c.get("sub"), str) else (client or "")
    email = c.get("email") if isinstance(c.get("email"), str) else ""
    groups = c.get("groups")
    if isinstance(groups, list):
        groups = ",".join(g for g in groups if isinstance(g, str))
    return user, email, groups if isinstance(groups, str) else ""


def _allow(pol: CompiledPolicy, rule: Rule, req: Request, client: str | None) -> Decision:
    upstream = dict(rule.upstream)
    if pol.identity_headers:
        for name, value in zip(IDENTITY_HEADERS, identity(req, client), strict=True):
            if value:
                upstream[name] = value
    if pol.keys and pol.keys.client_header and client:
        upstream[pol.keys.client_header] = client
    # Never from the request: a cached decision answers requests carrying other headers.
    remove = (h for h in (*rule.remove, *pol.strip) if h not in upstream)
    exp = (req.claims or {}).get("exp")
    return Decision(True, rule.name, 200, "", rule.response, tuple(sorted(upstream.items())),
                    tuple(dict.fromkeys(remove)), reason=f"allowed by rule {rule.name!r}",
                    expires=float(exp) if isinstance(exp, int | float) else None)


def _deny(pol: CompiledPolicy, rule: Rule, req: Request) -> Decision:
    headers = dict(rule.headers)
    status, body = rule.status, rule.body
    if rule.sign_in and BROWSER in req.headers.get("accept", ""):
        sep = "&" if "?" in rule.sign_in else "?"
        headers["location"] = f"{rule.sign_in}{sep}rd={quote(req.url(), safe='', errors='surrogateescape')}"
        status, body = 302, ""
    elif status == 401 and "www-authenticate" not in headers:
        headers["www-authenticate"] = f'Bearer realm="{pol.name}"'
    return Decision(False, rule.name, status, body, tuple(sorted(headers.items())),
                    reason=f"denied by rule {rule.name!r}")


def _first(pol: CompiledPolicy, req: Request, client: str | None, with_shadow: bool) -> Decision:
    for rule in pol.rules:
        if (with_shadow or not rule.shadow) and matches(rule.match, req, client):
            return _allow(pol, rule, req, client) if rule.allow else _deny(pol, rule, req)
    return deny(f"no rule of policy {pol.name!r} matched")


def decide(pol: CompiledPolicy, req: Request) -> Decision:
    """First matching rule wins; no match denies (403). ``mode: shadow`` rules are skipped, and the
    whole list (with them) is evaluated too: if it denies where the enforced rules allow, the
    allow reports the would-deny. A policy in shadow answers every denial of the whole list as an
    allow that reports it (no headers set: the request passes as it came)."""
    client = api_client(pol.keys, req.headers) if pol.keys else None
    decision = _first(pol, req, client, not pol.shadow_rules)
    full = _first(pol, req, client, True) if pol.shadow_rules else decision
    if pol.shadow:
        if not full.allow:
            return Decision(True, full.rule, reason=f"would deny: {full.reason}", would_deny=pol.name,
                            would_deny_rule=full.rule)
        return decision if decision.allow else Decision(True, full.rule, reason=f"shadow: {full.reason}")
    if decision.allow and not full.allow:
        return replace(decision, reason=f"{decision.reason}; would deny: {full.reason}",
                       would_deny=pol.name, would_deny_rule=full.rule)
    return decision
