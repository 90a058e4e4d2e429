"""CEL conditions (``when.cel``): parsed and type-checked at load, with cel-expr-python (the CEL
C++ implementation Envoy also runs, so the parser and the macros are Envoy's own).

The expression sees Envoy's request attributes (``request.*``, ``source.*``, ``destination.*``,
``connection.*``) declared with their types from Envoy's attributes documentation, and ``claims``,
the verified JWT payload (``dyn``: any claim, any type; reading it where neither the policy nor
its route's gateway verifies a JWT is a load error, as it would never be set). The compiler
turns the parsed expression into the ``google.api.expr.v1alpha1.Expr`` Envoy's RBAC evaluates
(``authplane/compiler/cel.py``).
"""

from __future__ import annotations

import functools
import re

from cel.expr import syntax_pb2
from cel_expr_python import cel
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, duration_pb2, timestamp_pb2

from authplane.errors import Problem
from authplane.policy.documents import Located
from authplane.policy.model import AuthPolicy

CLAIMS = "claims"
"""The name that stands for the verified JWT payload."""

_F = descriptor_pb2.FieldDescriptorProto
_TYPES = {"string": _F.TYPE_STRING, "int": _F.TYPE_INT64, "uint": _F.TYPE_UINT64, "bool": _F.TYPE_BOOL}
_MESSAGES = {"timestamp": ".google.protobuf.Timestamp", "duration": ".google.protobuf.Duration"}
_CERT = ("subject", "dns_san", "uri_san")
ATTRIBUTES: dict[str, dict[str, str]] = {
    "request": {
        "path": "string", "url_path": "string", "host": "string", "scheme": "string", "method": "string",
        "headers": "map", "referer": "string", "useragent": "string", "time": "timestamp", "id": "string",
        "protocol": "string", "query": "string", "duration": "duration", "size": "int", "total_size": "int",
    },
    "source": {"address": "string", "port": "int"},
    "destination": {"address": "string", "port": "int"},
    "connection": {
        "id": "uint", "mtls": "bool", "requested_server_name": "string", "tls_version": "string",
        **{f"{c}_{side}_certificate": "string" for c in _CERT for side in ("local", "peer")},
        "sha256_peer_certificate": "string", "transport_failure_reason": "string",
        "termination_details": "string",
    },
}
"""Envoy's attributes available when RBAC runs (request phase), with their CEL types."""

MAX_DENY_RULES = 4
"""``default: deny`` with deny rules that use ``cel``: each allow rule compiles to one RBAC policy
per combination of those deny rules' parts (2^n), so their number is bounded."""

_ERROR = re.compile(r"ERROR: <input>:(\d+):(\d+): (.*)")


def _message(name: str, fields: dict[str, str]) -> descriptor_pb2.DescriptorProto:
    msg = descriptor_pb2.DescriptorProto(name=name)
    for number, (field, kind) in enumerate(fields.items(), start=1):
        if kind == "map":
            entry = msg.nested_type.add(name="HeadersEntry")
            entry.options.map_entry = True
            entry.field.add(name="key", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
            entry.field.add(name="value", number=2, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
            msg.field.add(name=field, number=number, type=_F.TYPE_MESSAGE, label=_F.LABEL_REPEATED,
                          type_name=f".authplane.cel.{name}.HeadersEntry")
        elif kind in _MESSAGES:
            msg.field.add(name=field, number=number, type=_F.TYPE_MESSAGE, label=_F.LABEL_OPTIONAL,
                          type_name=_MESSAGES[kind])
        else:
            msg.field.add(name=field, number=number, type=_TYPES[kind], label=_F.LABEL_OPTIONAL)
    return msg


@functools.cache
def _env() -> cel.Env:
    """Types for the checker only: the attributes as messages of a private descriptor pool."""
    pool = descriptor_pool.DescriptorPool()
    for module in (timestamp_pb2, duration_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        pool.Add(proto)
    attrs = descriptor_pb2.FileDescriptorProto(
        name="authplane/cel_attributes.proto", package="authplane.cel", syntax="proto3",
        dependency=["google/protobuf/timestamp.proto", "google/protobuf/duration.proto"])
    for var, fields in ATTRIBUTES.items():
        attrs.message_type.append(_message(var.capitalize(), fields))
    pool.Add(attrs)
    variables = {var: cel.Type(f"authplane.cel.{var.capitalize()}") for var in ATTRIBUTES}
    return cel.NewEnv(pool, variables={**variables, CLAIMS: cel.Type.DYN})


class CelError(ValueError):
    """A syntax or type error; ``str()`` is one line with the offset in the expression."""


@functools.lru_cache(maxsize=1024)
def parse(text: str) -> syntax_pb2.ParsedExpr:
    """The parsed (macro-expanded) expression, after a full type check; ``CelError`` otherwise."""
    env = _env()
    try:
        checked = env.compile(text)
    except RuntimeError as e:
        found = _ERROR.search(str(e))
        if not found:
            raise CelError(str(e).splitlines()[0]) from None
        line, col, detail = int(found[1]), int(found[2]), found[3]
        where = f"line {line} column {col} of the expression" if "\n" in text.strip() else f"column {col}"
        kind = "syntax error" if detail.startswith("Syntax error: ") else "type error"
        raise CelError(f"{kind} at {where}: {detail.removeprefix('Syntax error: ')}") from None
    result = checked.return_type()
    if result not in (cel.Type.BOOL, cel.Type.DYN):
        raise CelError(f"type error: the expression must be a bool, it is a {result.name().lower()}")
    parsed = any_pb2.Any()
    parsed.ParseFromString(env.compile(text, disable_check=True).serialize())
    out = syntax_pb2.ParsedExpr()
    parsed.Unpack(out)
    return out


def _reads(expr: syntax_pb2.Expr, name: str) -> bool:
    """Whether ``expr`` reads the variable ``name`` (not a comprehension variable of that name)."""
    kind = expr.WhichOneof("expr_kind")
    if kind == "ident_expr":
        return expr.ident_expr.name == name
    if kind == "select_expr":
        return _reads(expr.select_expr.operand, name)
    if kind == "call_expr":
        call = expr.call_expr
        return (call.HasField("target") and _reads(call.target, name)) or any(_reads(a, name) for a in call.args)
    if kind == "list_expr":
        return any(_reads(e, name) for e in expr.list_expr.elements)
    if kind == "struct_expr":
        return any((e.HasField("map_key") and _reads(e.map_key, name)) or _reads(e.value, name)
                   for e in expr.struct_expr.entries)
    if kind == "comprehension_expr":
        c = expr.comprehension_expr
        outer = _reads(c.iter_range, name) or _reads(c.accu_init, name)
        shadowed = name in (c.iter_var, c.iter_var2, c.accu_var)
        return outer or (not shadowed and any(_reads(e, name) for e in (c.loop_condition, c.loop_step, c.result)))
    return False


@functools.lru_cache(maxsize=1024)
def reads_claims(text: str) -> bool:
    """Whether a valid expression reads ``claims`` (the verified JWT payload)."""
    return _reads(parse(text).expr, CLAIMS)


def problems(pol: Located[AuthPolicy], jwt: bool = True) -> list[Problem]:
    """Errors of the policy's ``cel`` conditions, at the position of each expression. ``jwt``:
    whether a level of the policy's target (this policy, or its route's gateway) verifies a JWT;
    without one ``claims`` is never set, so an expression reading it is an error."""
    spec = pol.resource.spec
    out: list[Problem] = []
    if spec.authorization is not None:
        where = ("spec", "authorization", "rules")
        for i, rule in enumerate(spec.authorization.rules):
            if rule.when.cel is not None:
                try:
                    needs_jwt = reads_claims(rule.when.cel)
                except CelError as e:
                    out.append(pol.source.problem((*where, i, "when", "cel"), str(e)))
                else:
                    if needs_jwt and not jwt:
                        out.append(pol.source.problem(
                            (*where, i, "when", "cel"),
                            "claims (the verified JWT payload) needs a jwt or oidc section in this "
                            "policy or on the gateway; without one the expression never sees claims"))
            inner, depth = rule.when.not_, ("not",)
            while inner is not None:
                if inner.cel is not None:
                    out.append(pol.source.problem((*where, i, "when", *depth, "cel"),
                                                  "cel is not supported under not: negate it in the "
                                                  "expression, !(...)"))
                inner, depth = inner.not_, (*depth, "not")
        deny = [r for r in spec.authorization.rules if r.action == "deny" and r.when.cel is not None]
        if spec.authorization.default == "deny" and len(deny) > MAX_DENY_RULES:
            out.append(pol.source.problem(
                where, f"at most {MAX_DENY_RULES} deny rules with cel under default: deny "
                       f"(there are {len(deny)}); combine them into one cel expression"))
    if spec.ext_auth is not None:
        for i, ext_rule in enumerate(spec.ext_auth.rules or []):
            if ext_rule.when.cel is not None:
                out.append(pol.source.problem(("spec", "extAuth", "rules", i, "when", "cel"),
                                              "cel is only supported in authorization rules"))
    return out
