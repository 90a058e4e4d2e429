"""``when.cel`` → the ``google.api.expr.v1alpha1.Expr`` an RBAC policy's ``condition`` takes (pure).

The parsed expression comes from ``authplane/policy/cel.py`` (``cel.expr`` protos, wire-identical
to ``v1alpha1``). ``claims`` becomes the JWT payload in Envoy's dynamic metadata,
``metadata.filter_metadata['envoy.filters.http.jwt_authn']['jwt_payload']``, unless a macro
(``exists(claims, ...)``) binds that name itself. Ids are renumbered so that expressions combined
with ``all_of``/``negate`` keep unique ids.
"""

from __future__ import annotations

from cel.expr import syntax_pb2 as cel_syntax
from google.api.expr.v1alpha1 import syntax_pb2 as v1alpha1

from authplane.contract import JWT_FILTER, JWT_PAYLOAD_KEY
from authplane.policy.cel import CLAIMS, parse


def _index(operand: v1alpha1.Expr, key: str) -> v1alpha1.Expr:
    return v1alpha1.Expr(call_expr=v1alpha1.Expr.Call(
        function="_[_]", args=[operand, v1alpha1.Expr(const_expr=v1alpha1.Constant(string_value=key))]))


def _payload() -> v1alpha1.Expr:
    metadata = v1alpha1.Expr(select_expr=v1alpha1.Expr.Select(
        operand=v1alpha1.Expr(ident_expr=v1alpha1.Expr.Ident(name="metadata")), field="filter_metadata"))
    return _index(_index(metadata, JWT_FILTER), JWT_PAYLOAD_KEY)


def _rewrite(e: v1alpha1.Expr, bound: frozenset[str]) -> None:
    """Replace free ``claims`` identifiers in place."""
    kind = e.WhichOneof("expr_kind")
    if kind == "ident_expr":
        if e.ident_expr.name == CLAIMS and CLAIMS not in bound:
            e.CopyFrom(_payload())
    elif kind == "select_expr":
        _rewrite(e.select_expr.operand, bound)
    elif kind == "call_expr":
        if e.call_expr.HasField("target"):
            _rewrite(e.call_expr.target, bound)
        for arg in e.call_expr.args:
            _rewrite(arg, bound)
    elif kind == "list_expr":
        for item in e.list_expr.elements:
            _rewrite(item, bound)
    elif kind == "struct_expr":
        for entry in e.struct_expr.entries:
            if entry.HasField("map_key"):
                _rewrite(entry.map_key, bound)
            _rewrite(entry.value, bound)
    elif kind == "comprehension_expr":
        c = e.comprehension_expr
        _rewrite(c.iter_range, bound)
        _rewrite(c.accu_init, bound)
        inner = bound | {c.iter_var, c.accu_var}
        for part in (c.loop_condition, c.loop_step, c.result):
            _rewrite(part, inner)


def _renumber(e: v1alpha1.Expr, start: int = 1) -> int:
    """Pre-order ids from ``start``; returns the next free id."""
    e.id = start
    start += 1
    for field, value in e.ListFields():
        if field.message_type is None or field.name == "const_expr":
            continue
        for child in _children(value):
            start = _renumber(child, start)
    return start


def _children(kind: object) -> list[v1alpha1.Expr]:
    if isinstance(kind, v1alpha1.Expr.Select):
        return [kind.operand]
    if isinstance(kind, v1alpha1.Expr.Call):
        return ([kind.target] if kind.HasField("target") else []) + list(kind.args)
    if isinstance(kind, v1alpha1.Expr.CreateList):
        return list(kind.elements)
    if isinstance(kind, v1alpha1.Expr.CreateStruct):
        return [x for en in kind.entries for x in ([en.map_key] if en.HasField("map_key") else []) + [en.value]]
    if isinstance(kind, v1alpha1.Expr.Comprehension):
        return [kind.iter_range, kind.accu_init, kind.loop_condition, kind.loop_step, kind.result]
    return []


def expression(text: str) -> v1alpha1.Expr:
    """The Envoy expression of a ``when.cel`` text (already checked at load)."""
    parsed: cel_syntax.ParsedExpr = parse(text)
    out = v1alpha1.Expr.FromString(parsed.expr.SerializeToString(deterministic=True))
    _rewrite(out, frozenset())
    _renumber(out)
    return out


def negate(e: v1alpha1.Expr) -> v1alpha1.Expr:
    return v1alpha1.Expr(call_expr=v1alpha1.Expr.Call(function="!_", args=[e]))


def all_of(exprs: list[v1alpha1.Expr]) -> v1alpha1.Expr | None:
    """``a && b && ...`` (None for no expression), ids renumbered; the inputs are not changed."""
    if not exprs:
        return None
    out = v1alpha1.Expr()
    out.CopyFrom(exprs[0])
    for e in exprs[1:]:
        out = v1alpha1.Expr(call_expr=v1alpha1.Expr.Call(function="_&&_", args=[out, e]))
    _renumber(out)
    return out
