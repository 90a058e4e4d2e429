"""The decision log (``serve --decision-log PATH``): Envoys report every request of a checked route
over Envoy's gRPC access-log service, on authplane's xDS port and connection (the listener's
``envoy.access_loggers.http_grpc``, ``compiler/resources.py``). Each entry is mapped back, with the
revision's IR, to the policy, level, check and rule that decided it, then

- written as one JSON line by a writer thread behind a bounded queue: a slow or stuck file (a
  FIFO nobody reads, a full disk) makes entries drop and be counted, never Envoy's stream wait;
  ``SIGHUP`` makes the writer reopen the path (rotate with ``mv`` then ``kill -HUP``);
- counted in ``authplane_decisions_total{policy,rule,verdict}`` (only names of loaded policies);
- summarised per shadow policy for ``/status``: would-deny count, rate and top identities.

A record names identities only: the JWT ``sub``, the API-key client and Basic user (the headers
authplane's own checks set), the certificate SAN. Envoy sends no token, key, password or cookie
header: the access log adds no request header but those identity headers; the path Envoy always
sends (with its query, which can carry a key) is never read, and the JWT payload in the dynamic
metadata is read for ``sub`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from authplane import contract
from authplane.compiler import satisfy, translate
from authplane.compiler.ir import Checks, CompileOptions
from authplane.compiler.resources import DECISION_LOG_NAME, identity_headers
from authplane.controlplane.metrics import DecisionMetrics
from authplane.controlplane.store import Revision
from authplane.policy.documents import PolicySet

log = logging.getLogger("authplane.decisions")

MAX_QUEUE = 50_000
"""Lines waiting for the writer; beyond it entries are dropped (and counted)."""
TOP_IDENTITIES = 10
TRACKED_IDENTITIES = 100
"""Per shadow policy, the identities it would deny: the top 10 shown, 100 counted (Space-Saving)."""
RETRY_SECONDS = 1.0
"""After a write error the writer drops lines for this long before it reopens the path."""


# -- mapping an entry back to the policies ------------------------------------------------------

@dataclass(frozen=True)
class RouteChecks:
    """What applies on one route of the route table: the gateway and route levels' policies,
    with what each entry of the route needs precomputed (entries arrive by the thousand)."""

    gateway: Checks | None
    route: Checks | None
    challenge: bool = False
    """``satisfy: any`` without any credential: a 401 direct response, nothing checked."""
    header_ids: tuple[tuple[str, str], ...] = field(init=False)
    """(identity kind, header) that the enforcing checks of this route set."""
    shadow: bool = field(init=False)
    allowed: Decision = field(init=False)
    """The decision of a request every check let pass (one object: entries reuse its line parts)."""

    def __post_init__(self) -> None:
        ids: dict[str, str] = {}
        for c in self.levels():
            if getattr(c.spec, "mode", contract.MODE_ENFORCE) != contract.MODE_SHADOW:
                ids.update((h, kind) for kind, h in _identity_headers(c))
        object.__setattr__(self, "header_ids", tuple((kind, h) for h, kind in ids.items()))
        object.__setattr__(self, "shadow", any(in_shadow(c) for c in self.levels()))
        object.__setattr__(self, "allowed", Decision(self.levels()[-1], "", None, "allow"))

    def levels(self) -> list[Checks]:
        return [c for c in (self.gateway, self.route) if c is not None]


def _identity_headers(checks: Checks) -> list[tuple[str, str]]:
    spec, ext = checks.spec, checks.spec.ext_auth
    found = [("user", spec.basic_auth and spec.basic_auth.user_header),
             ("client", spec.api_key and spec.api_key.client_header),
             ("client", ext and ext.api_keys and ext.api_keys.client_header),
             ("user", ext and ext.service == "builtin" and ext.identity_headers and contract.IDENTITY_HEADERS[0])]
    logged = identity_headers(spec)  # what the access log sends (compiler/resources.py)
    return [(kind, h) for kind, h in found if isinstance(h, str) and h in logged]


RouteTable = dict[str, dict[str, RouteChecks]]
"""fleet → route name (as Envoy reports it) → checks."""


def route_table(policies: PolicySet, opts: CompileOptions | None = None) -> RouteTable:
    """Every checked route of every fleet, by the names Envoy's access log reports."""
    out: RouteTable = {}
    for name, fleet in translate.build(policies, opts).items():
        routes = out.setdefault(name, {})
        for lst in fleet.listeners:
            for vh in lst.virtual_hosts:
                for r in vh.routes:
                    if r.public or (lst.checks is None and r.checks is None):
                        continue
                    for x in satisfy.expand(lst, r):
                        v = satisfy.variant_of(x)
                        routes[x.name] = RouteChecks(lst.checks, r.checks, bool(v and v.challenges))
    return out


@dataclass(frozen=True)
class Decision:
    checks: Checks
    check: str
    """``jwt``, ``authorization``, ``basicAuth``, ``apiKey``, ``extAuth``, ``oidc``, ``satisfy``;
    empty for an allow (every check passed)."""
    rule: str | None
    verdict: str
    """``allow``, ``deny`` or ``would-deny`` (a shadow check that would have denied)."""

    @property
    def origin(self) -> str:
        o = self.checks.origin
        return f"{o.path}:{o.line}"


def _authz_rules(checks: Checks) -> set[str]:
    authz = checks.spec.authorization
    return {r.name for r in authz.rules} if authz else set()


def _rule_names(checks: Checks) -> set[str]:
    """The names a record may give as ``rule``: authorization and builtin extAuth rules."""
    authz, ext = checks.spec.authorization, checks.spec.ext_auth
    return {r.name for r in (*(authz.rules if authz else ()), *((ext and ext.rules) or ()))}


def _with(levels: list[Checks], has: Callable[[Checks], object]) -> Checks | None:
    """The level a check failed at: the route's if both have it (the more specific one)."""
    found = [c for c in levels if has(c)]
    return found[-1] if found else None


CHECKS_BY_DETAIL: tuple[tuple[str, str, Callable[[Checks], object]], ...] = (
    ("jwt_authn_access_denied", "jwt", lambda c: c.spec.jwt),
    ("ext_authz", "extAuth", lambda c: c.spec.ext_auth),
    ("basic_auth", "basicAuth", lambda c: c.spec.basic_auth),
    ("api_key", "apiKey", lambda c: c.spec.api_key),
    ("oauth", "oidc", lambda c: c.spec.oidc),
)
"""A word of Envoy's ``response_code_details`` for each filter's local reply (for instance
``jwt_authn_access_denied{Jwt_is_missing}``, ``unknown_api_key``,
``invalid_credential_for_basic_auth``, ``ext_authz_denied``)."""
RBAC_DENIED = "rbac_access_denied_matched_policy["


def _rbac(levels: list[Checks], details: str, meta: Any) -> Decision | None:
    """The level whose RBAC engine denied: the one Envoy wrote ``denied`` for under its policy's
    ``contract.enforced_prefix``, else (an older Envoy) guessed from the rule names. Under
    ``default: deny`` Envoy matches no rule (``[none]``): the deny rule that excluded the request,
    if one did, is the match of the level's ``contract.deny_prefix`` shadow rules."""
    matched = details[len(RBAC_DENIED):].rstrip("]").partition("#")[0]  # "rule#2": CEL variants
    rbac = _fields(meta, contract.RBAC_FILTER)
    at = next((c for c in levels if c.spec.authorization and _string(
        rbac, contract.enforced_prefix(c.policy) + contract.RBAC_ENFORCED_RESULT) == contract.RBAC_DENIED), None)
    if matched == "none":  # default deny: no allow rule matched, or a deny rule excluded the request
        at = at or _with(levels, lambda c: c.spec.authorization and c.spec.authorization.default == "deny")
        if at is None:
            return None
        prefix = contract.deny_prefix(at.level, at.policy)
        rule = _string(rbac, prefix + contract.RBAC_SHADOW_RULE) if _string(
            rbac, prefix + contract.RBAC_SHADOW_RESULT) == contract.RBAC_DENIED else None
        return Decision(at, "authorization", rule if rule in _authz_rules(at) else None, "deny")
    at = at or _with(levels, lambda c: matched in _authz_rules(c)) or _with(levels, lambda c: c.spec.authorization)
    return Decision(at, "authorization", matched if matched in _authz_rules(at) else None, "deny") if at else None


def enforced(rc: RouteChecks, details: str, meta: Any = None) -> Decision | None:
    """The enforcing check that denied the request, from Envoy's response code details (a
    policy in shadow denies nothing: it is never the one)."""
    levels = [c for c in rc.levels() if getattr(c.spec, "mode", contract.MODE_ENFORCE) != contract.MODE_SHADOW]
    if not levels:
        return None
    if rc.challenge:
        at = _with(levels, lambda c: c.spec.satisfy.mode == "any")
        return Decision(at or levels[-1], "satisfy", None, "deny")
    if details.startswith(RBAC_DENIED):
        return _rbac(levels, details, meta)
    for prefix, check, has in CHECKS_BY_DETAIL:
        if prefix in details:
            at = _with(levels, has)
            if at is not None:
                return _ext_denial(levels, at, meta) if check == "extAuth" else Decision(at, check, None, "deny")
    return None


def _ext_denial(levels: list[Checks], at: Checks, meta: Any) -> Decision:
    """An extAuth denial: the level and rule a builtin service's report names
    (``contract.DENIED``), else the level that has extAuth, rule unknown."""
    ext = _fields(meta, contract.EXT_AUTHZ_FILTER)
    if _string(ext, contract.SHADOW_VERDICT_KEY) == contract.DENIED:
        policy = _string(ext, contract.SHADOW_POLICY_KEY)
        at = next((c for c in reversed(levels) if c.policy == policy and c.spec.ext_auth), at)
        rule = _string(ext, contract.SHADOW_RULE_KEY)
        ext_rules = {r.name for r in (at.spec.ext_auth and at.spec.ext_auth.rules) or ()}
        return Decision(at, "extAuth", rule if rule in ext_rules else None, "deny")
    return Decision(at, "extAuth", None, "deny")


def _fields(meta: Any, namespace: str) -> Any:
    """The fields of one namespace of the dynamic metadata (empty if absent), read in place: an
    access-log entry's ``Metadata``, or the ``{namespace: {key: value}}`` of a native record."""
    if meta is None:
        return {}
    if isinstance(meta, dict):
        return meta.get(namespace, {})
    found = meta.filter_metadata.get(namespace)
    return found.fields if found is not None else {}


def _string(fields: Any, key: str) -> str | None:
    value = fields.get(key)
    if value is None or isinstance(value, str):
        return value
    return value.string_value if value.WhichOneof("kind") == "string_value" else None


def _shadow_key(key: str) -> tuple[str, str, str] | None:
    """(check, level, policy) of ``contract.shadow_prefix(...) + RBAC_SHADOW_RESULT``."""
    suffix = "/" + contract.RBAC_SHADOW_RESULT
    if not key.startswith(contract.SHADOW_PREFIX) or not key.endswith(suffix):
        return None
    parts = key[len(contract.SHADOW_PREFIX):-len(suffix)].split("/", 2)
    return (parts[0], parts[1], parts[2].replace("~", ".")) if len(parts) == 3 else None


def shadow_denials(rc: RouteChecks, meta: Any) -> list[Decision]:
    """Shadow checks that would have denied, where ``contract.py`` says Envoy keeps them: the
    RBAC instances' shadow results (every check type), and the builtin ext_authz metadata."""
    by_level = {(c.level, c.policy): c for c in rc.levels()}
    out: list[Decision] = []
    reported: list[Decision] = []
    ext = _fields(meta, contract.EXT_AUTHZ_FILTER)
    if _string(ext, contract.SHADOW_VERDICT_KEY) == contract.WOULD_DENY:
        policy, rule = _string(ext, contract.SHADOW_POLICY_KEY) or "", _string(ext, contract.SHADOW_RULE_KEY) or ""
        checks = next((c for c in reversed(rc.levels()) if c.policy == policy), None)
        if checks is not None:
            reported.append(Decision(checks, "extAuth", rule or None, "would-deny"))
    rbac = _fields(meta, contract.RBAC_FILTER)
    for key in rbac:
        found = _shadow_key(key)
        checks = by_level.get((found[1], found[2])) if found else None
        if found is None or checks is None or _string(rbac, key) != contract.RBAC_DENIED:
            continue
        if found[0] == "extAuth" and any(r.checks is checks for r in reported):
            continue  # the report below is the same would-deny, with the rule
        prefix = contract.shadow_prefix(*found)
        matched = (_string(rbac, prefix + contract.RBAC_SHADOW_RULE) or "").partition("#")[0]
        out.append(Decision(checks, found[0], matched if matched in _authz_rules(checks) else None, "would-deny"))
    return out + reported


def classify(rc: RouteChecks, details: str, meta: Any) -> tuple[Decision, list[Decision]]:
    """The request's decision (an enforcing deny, else a would-deny, else allow) and every
    would-deny of the shadow checks on its path."""
    shadow = shadow_denials(rc, meta) if rc.shadow else []
    denied = enforced(rc, details, meta) if details != "via_upstream" else None
    return denied or (shadow[0] if shadow else rc.allowed), shadow


def identity(rc: RouteChecks, sub: str | None, san: str | None, headers: Any, passed: bool) -> dict[str, str]:
    """The identities the checks established: ``sub`` (the verified JWT payload), ``san`` (the
    verified client certificate), ``client``/``user``: headers authplane's enforcing checks set,
    replacing client copies, so read only when the request ``passed`` them (a denied request, or
    a shadow check that never ran, may carry the client's own copy)."""
    out: dict[str, str] = {}
    if sub:
        out["sub"] = sub
    if passed:
        for kind, header in rc.header_ids:
            value = headers.get(header)
            if value:
                out.setdefault(kind, value)
    if san:
        out["san"] = san
    return out


def _entry_sub(common: accesslog_pb2.AccessLogCommon) -> str | None:
    jwt = common.metadata.filter_metadata.get(contract.JWT_FILTER)
    payload = jwt.fields.get(contract.JWT_PAYLOAD_KEY) if jwt is not None else None
    return _string(payload.struct_value.fields, "sub") if payload is not None and payload.HasField(
        "struct_value") else None


def _entry_san(common: accesslog_pb2.AccessLogCommon) -> str | None:
    if not common.HasField("tls_properties"):
        return None
    cert = common.tls_properties.peer_certificate_properties
    return next((s.uri or s.dns for s in cert.subject_alt_name if s.uri or s.dns), None)


def _label(identity: dict[str, str]) -> str:
    for key in ("sub", "client", "user", "san"):
        if key in identity:
            return f"{key}:{identity[key]}"
    return "anonymous"


# -- shadow summary ---------------------------------------------------------------------------

class TopK:
    """The most frequent keys in bounded memory (Space-Saving: a new key past the bound replaces
    the least counted one and inherits its count, so counts are upper bounds)."""

    def __init__(self, capacity: int = TRACKED_IDENTITIES) -> None:
        self.capacity = capacity
        self.counts: dict[str, int] = {}

    def add(self, key: str) -> None:
        if key in self.counts or len(self.counts) < self.capacity:
            self.counts[key] = self.counts.get(key, 0) + 1
            return
        least = min(self.counts, key=self.counts.__getitem__)
        self.counts[key] = self.counts.pop(least) + 1

    def top(self, k: int = TOP_IDENTITIES) -> list[tuple[str, int]]:
        return sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


@dataclass
class PolicyTally:
    decisions: float = 0
    """Entries, an ``allow`` counting ``1 / --decision-log-sample`` (an estimate when sampled)."""
    would_deny: int = 0
    identities: TopK = field(default_factory=TopK)


def in_shadow(checks: Checks) -> bool:
    """The policy, or one of its authorization or builtin extAuth rules, is ``mode: shadow``."""
    spec = checks.spec
    if getattr(spec, "mode", contract.MODE_ENFORCE) == contract.MODE_SHADOW:
        return True
    rules = [*(spec.authorization.rules if spec.authorization else ()),
             *((spec.ext_auth and spec.ext_auth.rules) or ())]
    return any(getattr(r, "mode", contract.MODE_ENFORCE) == contract.MODE_SHADOW for r in rules)


# -- writer -----------------------------------------------------------------------------------

class LineWriter:
    """JSON lines to a path (``-``: stdout) from a daemon thread. At most ``max_lines`` lines are
    queued or being written; beyond that ``offer`` drops (and counts) them at once."""

    def __init__(self, path: str, metrics: DecisionMetrics, max_lines: int = MAX_QUEUE) -> None:
        self.path = path
        self.metrics = metrics
        self.max_lines = max_lines
        self.reopen = threading.Event()
        self._chunks: deque[list[str]] = deque()
        self._pending = 0
        """Lines queued or in the writer's hands (released once written)."""
        self._closing = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="decision-log", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def offer(self, lines: list[str]) -> int:
        """Queue lines without waiting; returns how many were dropped (no room left)."""
        with self._cond:
            room = max(self.max_lines - self._pending, 0)
            taken = lines if len(lines) <= room else lines[:room]
            if taken:
                self._chunks.append(taken)
                self._pending += len(taken)
                self._cond.notify()
        dropped = len(lines) - len(taken)
        if dropped:
            self.metrics.entries.labels("dropped").inc(dropped)
        return dropped

    def stop(self, timeout: float = 2.0) -> None:
        """Write what is queued; a writer stuck on its file (a FIFO) is left behind (a daemon)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _take(self) -> list[str] | None:
        with self._cond:
            while not self._chunks and not self._closing:
                self._cond.wait()
            if not self._chunks:
                return None
            lines = [line for chunk in self._chunks for line in chunk]
            self._chunks.clear()
            return lines

    def _release(self, n: int) -> None:
        with self._cond:
            self._pending -= n

    def _open(self) -> IO[str]:
        if self.path == "-":
            return sys.stdout
        return open(self.path, "a", encoding="utf-8")  # a FIFO blocks here until read: this thread only

    def _close(self, out: IO[str] | None) -> None:
        if out is not None and out is not sys.stdout:
            out.close()

    def _run(self) -> None:
        out: IO[str] | None = None
        failed_until = 0.0
        while (batch := self._take()) is not None:
            if self.reopen.is_set():
                self.reopen.clear()
                self._close(out)
                out = None
            try:
                if time.monotonic() < failed_until:
                    raise OSError("an earlier write failed")
                if out is None:
                    out = self._open()
                out.write("".join(batch))
                out.flush()
                self.metrics.entries.labels("written").inc(len(batch))
            except (OSError, ValueError) as e:
                self.metrics.entries.labels("failed").inc(len(batch))
                if time.monotonic() >= failed_until:
                    log.error("decision log %s: %s (dropping entries for %.0f s)", self.path, e, RETRY_SECONDS)
                    failed_until = time.monotonic() + RETRY_SECONDS
                self._close(out)
                out = None
            self._release(len(batch))
        self._close(out)


# -- the service ------------------------------------------------------------------------------

_SECOND: list[Any] = [None, ""]
"""The last second formatted by ``_iso`` and its text (entries come in time order)."""


def _iso(ts: Any) -> str:
    """``2026-01-02T03:04:05.678+00:00`` (milliseconds truncated); Envoy's start time, else now."""
    return _iso_ns(ts.seconds, ts.nanos)


def _iso_ns(seconds: int, nanos: int) -> str:
    if not seconds:
        now = time.time_ns()
        seconds, nanos = divmod(now, 1_000_000_000)
    if _SECOND[0] != seconds:
        _SECOND[:] = seconds, datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{_SECOND[1]}.{nanos // 1_000_000:03d}+00:00"


US, RS = b"\x1f", b"\x1e"
"""Separators of the module's batches (``Report``): fields, records; 0x1d joins a name and its value."""
_NAMESPACES = {"r": contract.RBAC_FILTER, "x": contract.EXT_AUTHZ_FILTER}

_str = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]
"""A JSON string, as ``json.dumps`` writes it (the same C function), without building a dict."""


def _json(value: str | None) -> str:
    return "null" if value is None else _str(value)


def _stream(fleet: str, node: str) -> str:
    return f'"fleet":{_str(fleet)},"node":{_str(node)},'


def _identity_json(who: dict[str, str]) -> str:
    return "{" + ",".join(f'"{k}":{_str(v)}' for k, v in who.items()) + "}"


@dataclass(frozen=True)
class Parts:
    """What a decision contributes to a line, encoded once per revision: the decision's fields
    (``"policy":..,"verdict":..``), its origin, its ``would_deny`` item and its metric labels."""

    fields: str
    origin: str
    shadow_item: str
    labels: tuple[str, str, str]
    checks: Checks
    """Kept alive with its parts: the cache key is its ``id``."""


class DecisionLog(als_pb2_grpc.AccessLogServiceServicer):
    """The access-log service and the decision log's state; a component of ``serve``."""

    def __init__(self, path: str, metrics: DecisionMetrics, opts: CompileOptions | None = None,
                 max_queue: int = MAX_QUEUE) -> None:
        self.path = path
        self.opts = opts
        self.metrics = metrics
        self.writer = LineWriter(path, metrics, max_queue)
        self.table: RouteTable = {}
        self.rules: dict[str, set[str]] = {}
        self.tallies: dict[str, PolicyTally] = {}
        self.shadow: set[str] = set()
        self._cache: dict[tuple[int, str, str | None, str], Parts] = {}
        self._allowed: dict[str, dict[str, tuple[str, str, tuple[str, str, str]]]] = {}
        """fleet → route → the parts of its allow lines (``_allowed_parts``)."""
        self._allow_weight = 1 / opts.decision_log_sample if opts else 1.0
        """Envoy reports a sample of the allow entries (``serve --decision-log-sample``)."""
        self.permitted: Callable[[Any], frozenset[str] | None] = lambda context: None
        """mTLS on the xDS port: the fleets the caller's certificate names (None: any fleet)."""

    # -- component ---------------------------------------------------------------------------

    def register(self, server: grpc.aio.Server) -> None:
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(self, server)
        service, _, method = contract.NATIVE_DECISION_LOG_PATH[1:].partition("/")
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {
            method: grpc.unary_unary_rpc_method_handler(self.Report)}),))  # raw bytes both ways

    async def start(self) -> None:
        self.writer.start()
        with contextlib.suppress(RuntimeError, ValueError):  # not the main thread: no SIGHUP
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._reopen)
        log.info("decision log to %s (SIGHUP reopens it; at most %d entries wait, more are dropped)",
                 "stdout" if self.path == "-" else self.path, self.writer.max_lines)

    def _reopen(self) -> None:
        log.info("SIGHUP: reopening the decision log %s before its next write", self.path)
        self.writer.reopen.set()

    async def stop(self) -> None:
        with contextlib.suppress(RuntimeError, ValueError):  # not the main thread: no SIGHUP
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await asyncio.to_thread(self.writer.stop)

    def on_revision(self, rev: Revision) -> None:
        if rev.policies is None:
            return
        self.table = route_table(rev.policies, self.opts)
        checks = [c for routes in self.table.values() for rc in routes.values() for c in rc.levels()]
        self.rules = {c.policy: _rule_names(c) for c in checks}
        self.shadow = {c.policy for c in checks if in_shadow(c)}
        self._cache = {}  # keyed by the id of this revision's checks
        self._allowed = {}
        self.tallies = {p: t for p, t in self.tallies.items() if p in self.rules}

    # -- the access-log stream ---------------------------------------------------------------

    async def StreamAccessLogs(self, request_iterator: Any, context: Any) -> als_pb2.StreamAccessLogsResponse:
        node, fleet = "", ""
        permitted = self.permitted(context)
        async for msg in request_iterator:
            if msg.HasField("identifier"):
                node, fleet = msg.identifier.node.id, msg.identifier.node.cluster
                if msg.identifier.log_name != DECISION_LOG_NAME:
                    fleet = ""  # not ours: ignored
                elif permitted is not None and fleet not in permitted:
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                        f"authplane: the client certificate does not name fleet {fleet!r}")
            self.entries(fleet, node, msg.http_logs.log_entry)
        return als_pb2.StreamAccessLogsResponse()

    def entries(self, fleet: str, node: str, entries: Iterable[accesslog_pb2.HTTPAccessLogEntry]) -> None:
        routes = self.table.get(fleet)
        if routes is None:
            return
        counts: Counter[tuple[str, str, str]] = Counter()
        lines: list[str] = []
        stream = _stream(fleet, node)
        for entry in entries:
            rc = routes.get(entry.common_properties.route_name)
            if rc is None:
                continue  # unchecked, public, the ambiguous-path guard, or no route matched
            lines.append(self.record(stream, rc, entry, counts))
        self._emit(lines, counts)

    def record(self, stream: str, rc: RouteChecks, entry: accesslog_pb2.HTTPAccessLogEntry,
               counts: Counter[tuple[str, str, str]]) -> str:
        """The line of an access-log entry (``line``)."""
        common, response, request = entry.common_properties, entry.response, entry.request
        return self.line(stream, rc, _iso(common.start_time), request.request_id, common.route_name,
                         response.response_code.value, response.response_code_details, common.metadata,
                         _entry_sub(common), _entry_san(common), request.request_headers if rc.header_ids else {},
                         counts)

    def line(self, stream: str, rc: RouteChecks, when: str, request_id: str, route: str, status: int, details: str,
             meta: Any, sub: str | None, san: str | None, headers: Any, counts: Counter[tuple[str, str, str]]) -> str:
        """One JSON line: ``time``, ``fleet``, ``node`` (``stream``), ``request_id``, ``route``,
        ``policy``, ``level``, ``check``, ``rule``, ``verdict``, ``status``, ``details``,
        ``identity``, ``origin`` and, when a shadow check would have denied, ``would_deny``. Written
        as text from parts encoded once per revision (``Parts``): entries come by the thousand."""
        d, shadow = classify(rc, details, meta)
        who = identity(rc, sub, san, headers, d.verdict != "deny")
        parts = self._parts(d)
        counts[parts.labels] += 1
        tail = "}\n"
        if rc.shadow:
            weight = self._allow_weight if d.verdict == "allow" else 1
            for c in {c.policy for c in rc.levels()}:
                self.tallies.setdefault(c, PolicyTally()).decisions += weight
            for s in shadow:
                if s is not d:
                    counts[self._parts(s).labels] += 1
            for policy in {s.checks.policy for s in shadow}:
                tally = self.tallies[policy]
                tally.would_deny += 1
                tally.identities.add(_label(who))
            if shadow:
                tail = ',"would_deny":[' + ",".join(self._parts(s).shadow_item for s in shadow) + "]}\n"
        return (f'{{"time":"{when}",{stream}"request_id":{_str(request_id)},'
                f'"route":{_str(route)},{parts.fields},"status":{status},'
                f'"details":{_str(details)},"identity":{_identity_json(who)},"origin":{parts.origin}{tail}')

    # -- the module's batches (``serve --decision-log-transport native``) ---------------------

    async def Report(self, request: bytes, context: Any) -> bytes:
        """A batch from authplane's Envoy module: ``v1 US node US fleet US dropped``, then records
        (``native``). A fleet the caller's certificate does not name is refused, like on the
        access-log stream."""
        head, _, body = request.partition(RS)
        version, node, fleet, dropped = [*head.split(US), b"", b"", b"", b""][:4]
        if version != b"v1":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "authplane: unknown decision batch version")
        fleet_name, node_name = fleet.decode("utf-8", "replace"), node.decode("utf-8", "replace")
        permitted = self.permitted(context)
        if permitted is not None and fleet_name not in permitted:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"authplane: the client certificate does not name fleet {fleet_name!r}")
        if dropped.isdigit() and int(dropped):
            self.metrics.entries.labels("dropped").inc(int(dropped))  # in Envoy: the module's buffer was full
        if body:
            self.native(fleet_name, node_name, body.decode("utf-8", "replace").split("\x1e"))
        return b""

    def native(self, fleet: str, node: str, records: list[str]) -> None:
        """Records of the module's logger: ``time US request_id US route US status US details
        US sub US san`` (``time`` as the lines have it) then ``name GS value`` fields: ``r:`` and
        ``x:`` RBAC and ext_authz metadata keys, ``h:`` identity headers
        (``compiler/resources.native_logger_config``)."""
        routes, allowed = self.table.get(fleet), self._allowed.get(fleet, {})
        if routes is None:
            return
        counts: Counter[tuple[str, str, str]] = Counter()
        lines: list[str] = []
        stream = _stream(fleet, node)
        for record in records:
            f = record.split("\x1f")
            if len(f) < 7:
                continue
            rc = routes.get(f[2])
            if rc is None:
                continue  # unchecked, public, the ambiguous-path guard, or no route matched
            when = _str(f[0])[1:-1]  # the module writes it (ISO 8601); escaped all the same
            if f[4] == "via_upstream" and not rc.shadow and not rc.header_ids:  # most entries: an allow
                head, tail, labels = allowed.get(f[2]) or self._allowed_parts(fleet, rc, f[2])
                counts[labels] += 1
                sub, san = f[5], f[6]
                who = ('{"sub":' + _str(sub) + "}" if sub else "{}") if not san else _identity_json(
                    identity(rc, sub or None, san, {}, True))
                lines.append(f'{{"time":"{when}",{stream}"request_id":{_str(f[1])}{head}'
                             f'{f[3] if f[3].isdigit() else 0},"details":"via_upstream","identity":{who}{tail}')
                continue
            meta: dict[str, dict[str, str]] = {}
            headers: dict[str, str] = {}
            if len(f) > 7:
                for pair in f[7:]:
                    name, _, value = pair.partition("\x1d")
                    kind, _, key = name.partition(":")
                    if kind == "h":
                        headers[key] = value
                    elif kind in _NAMESPACES:
                        meta.setdefault(_NAMESPACES[kind], {})[key] = value
            lines.append(self.line(stream, rc, when, f[1], f[2],
                                   int(f[3]) if f[3].isdigit() else 0, f[4], meta, f[5] or None, f[6] or None,
                                   headers, counts))
        self._emit(lines, counts)

    def _emit(self, lines: list[str], counts: Counter[tuple[str, str, str]]) -> None:
        if lines:
            self.writer.offer(lines)
        for labels, n in counts.items():  # once per message: a counter's lock is not free
            self.metrics.decisions.labels(*labels).inc(n)

    def _allowed_parts(self, fleet: str, rc: RouteChecks, route: str) -> tuple[str, str, tuple[str, str, str]]:
        """What ``line`` writes around the time, request id, status and identity of an allowed
        request on ``route``, kept per revision: most entries are allows (``native``)."""
        parts = self._parts(rc.allowed)
        found = self._allowed.setdefault(fleet, {})[route] = (
            f',"route":{_str(route)},{parts.fields},"status":', f',"origin":{parts.origin}}}\n', parts.labels)
        return found

    def _parts(self, d: Decision) -> Parts:
        known = self._rule(d)
        key = (id(d.checks), d.check, known, d.verdict)  # loaded names only: bounded, whatever Envoy sends
        found = self._cache.get(key)
        if found is None:
            c, rule = d.checks, _json(known)
            head = f'"policy":{_str(c.policy)},"level":{_str(c.level)},"check":'
            found = self._cache[key] = Parts(
                f'{head}{_json(d.check or None)},"rule":{rule},"verdict":{_str(d.verdict)}', _str(d.origin),
                f'{{{head}{_str(d.check)},"rule":{rule},"origin":{_str(d.origin)}}}',
                (c.policy, known or "", d.verdict), c)
        return found

    def _rule(self, d: Decision) -> str | None:
        """The rule if the policy has it (a metric label must be a loaded name)."""
        return d.rule if d.rule in self.rules.get(d.checks.policy, ()) else None

    def status(self) -> dict[str, Any]:
        """``/status`` ``shadow``: per policy in shadow, what it would have denied."""
        out = {}
        for policy in sorted(self.shadow | {p for p, t in self.tallies.items() if t.would_deny}):
            t = self.tallies.get(policy, PolicyTally())
            out[policy] = {"decisions": round(t.decisions), "would_deny": t.would_deny,
                           "rate": round(t.would_deny / t.decisions, 4) if t.decisions else 0.0,
                           "top_identities": [{"identity": k, "would_deny": n} for k, n in t.identities.top()]}
        return out

