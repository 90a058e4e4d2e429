"""Static checks of a valid policy set: warnings, not errors (``validate --strict`` fails on them).

Conservative by design: a warning is reported only when the condition structure proves it, never
from a guess about what a regex or a CEL expression matches. ``implies(a, b)`` is the core: every
request matching ``a`` matches ``b`` (a sufficient, syntactic test: values compared as written).

* a condition set that can never match (``present`` and ``not present`` of one header ...);
* a rule shadowed by another: builtin ``extAuth.rules`` (first match wins) after an earlier rule
  it implies; native ``authorization`` rules (no order: deny wins) implied by a deny rule, or by
  another rule with the same action;
* an ``allow`` rule under ``default: allow``;
* a route reachable with no credential at all although its gateway has checks.

``anonymous(spec)`` (can a request without any credential pass one policy?) also feeds
``authplane validate --report``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Literal

from authplane.errors import Problem
from authplane.policy.documents import Located, PolicySet
from authplane.policy.model import AuthorizationRule, AuthPolicy, AuthPolicySpec, Conditions
from authplane.policy.types import PathMatch, StringMatch
from authplane.policy.yamlpos import Path

Verdict = Literal["yes", "no", "maybe"]


# --- implication ---------------------------------------------------------------------------------


def _value_implies(a: StringMatch, b: StringMatch) -> bool:
    return a == b or b.present is True


def _values_imply(a: list[StringMatch], b: list[StringMatch]) -> bool:
    """Any of ``a`` matching means one of ``b`` does."""
    return all(any(_value_implies(x, y) for y in b) for x in a)


def _path_implies(a: PathMatch, b: PathMatch) -> bool:
    if a == b:
        return True
    if a.path is None or b.path is None or not b.path.endswith("/*"):
        return False
    base = b.path[:-2]  # "/x/*" matches /x, /x/ and everything below
    inner = a.path.removesuffix("/*").rstrip("/") or "/"
    return inner == base or inner.startswith(base + "/") or base == ""


def _networks_imply(a: list[str], b: list[str]) -> bool:
    nets = [ipaddress.ip_network(n) for n in b]
    for text in a:
        net = ipaddress.ip_network(text)
        if not any(net.version == n.version and net.subnet_of(n) for n in nets):  # type: ignore[arg-type]
            return False
    return True


KNOWN = frozenset({"claims", "headers", "source_cidrs", "methods", "paths", "scopes", "cel", "not_",
                   "api_keys", "authenticated"})
"""The condition kinds ``implies`` reasons about; any other kind set on the wider side proves nothing."""


def implies(a: Conditions, b: Conditions) -> bool:
    """Every request matching ``a`` matches ``b`` (provably, from the structure alone)."""
    if any(name not in KNOWN for name in b.model_fields_set):
        return False
    for key, values in b.claims.items():
        if key not in a.claims or not _values_imply(a.claims[key], values):
            return False
    for name, values in b.headers.items():
        if name not in a.headers or not _values_imply(a.headers[name], values):
            return False
    if b.source_cidrs and not (a.source_cidrs and _networks_imply(a.source_cidrs, b.source_cidrs)):
        return False
    if b.methods and not (a.methods and set(a.methods) <= set(b.methods)):
        return False
    if b.paths and not (a.paths and all(any(_path_implies(x, y) for y in b.paths) for x in a.paths)):
        return False
    if not set(b.scopes) <= set(a.scopes):
        return False
    if b.cel is not None and a.cel != b.cel:
        return False
    if b.not_ is not None and a.not_ != b.not_:
        return False
    b_keys: list[str] = getattr(b, "api_keys", [])
    a_keys: list[str] = getattr(a, "api_keys", [])
    if b_keys and not (a_keys and ("*" in b_keys or set(a_keys) <= set(b_keys))):
        return False
    b_auth = getattr(b, "authenticated", None)
    a_auth = getattr(a, "authenticated", None)
    return b_auth is None or a_auth == b_auth or (b_auth is True and bool(a_keys))


def never_matches(c: Conditions) -> str | None:
    """Why ``c`` can never match, when provable (a ``not`` that never matches only is useless)."""
    if c.not_ is not None and implies(c.model_copy(update={"not_": None}), c.not_):
        return "its conditions contradict their own 'not' (whatever matches them matches the 'not')"
    if getattr(c, "authenticated", None) is False and (c.claims or c.scopes or getattr(c, "api_keys", [])):
        return "authenticated: false next to claims, scopes or apiKeys (which need a credential)"
    return None


# --- rules ---------------------------------------------------------------------------------------


def _shadow(x: object) -> bool:
    """``mode: shadow`` (a policy or a rule): evaluated and recorded, never enforced."""
    return getattr(x, "mode", "enforce") == "shadow"


def _enforced(rules: list[AuthorizationRule]) -> list[AuthorizationRule]:
    return [r for r in rules if not _shadow(r)]



def _rule_warnings(item: Located[AuthPolicy]) -> Iterator[Problem]:
    spec = item.resource.spec
    src = item.source
    if spec.authorization is not None:
        auth = spec.authorization
        rules = _enforced(auth.rules)  # a shadow rule only records: it neither shadows nor is shadowed
        for i, r in enumerate(rules):
            at: Path = ("spec", "authorization", "rules", auth.rules.index(r))
            why = never_matches(r.when)
            if why:
                yield src.problem((*at, "when"), f"rule {r.name!r} can never match: {why}")
                continue
            if r.action == "allow" and auth.default == "allow":
                yield src.problem((*at, "action"), f"allow rule {r.name!r} has no effect under "
                                  "default: allow (what no deny rule matches is allowed anyway)")
                continue
            wider = [(j, o) for j, o in enumerate(rules)
                     if j != i and not never_matches(o.when) and implies(r.when, o.when)]
            deny = next((o for _, o in wider if r.action == "allow" and o.action == "deny"), None)
            same = next((o for j, o in wider if o.action == r.action and (j < i or not implies(o.when, r.when))),
                        None)
            if deny is not None:
                yield src.problem(at, f"allow rule {r.name!r} never allows: deny rule {deny.name!r} "
                                  "matches every request it matches (deny rules win)")
            elif same is not None:
                yield src.problem(at, f"rule {r.name!r} is shadowed by rule {same.name!r} (same "
                                  "action, matches every request this one matches)")
    ext = spec.ext_auth
    if ext is not None and ext.rules:
        for i, r in enumerate(ext.rules):
            at = ("spec", "extAuth", "rules", i)
            why = never_matches(r.when)
            if why:
                yield src.problem((*at, "when"), f"rule {r.name!r} can never match: {why}")
                continue
            for other in ext.rules[:i]:  # enforcement skips a shadow rule: it hides only shadow rules
                if (not _shadow(other) or _shadow(r)) and not never_matches(other.when) and implies(r.when, other.when):
                    yield src.problem(at, f"rule {r.name!r} is never reached: the earlier rule "
                                      f"{other.name!r} ({other.action}) matches every request it "
                                      "matches (the first match wins)")
                    break


# --- anonymous access ----------------------------------------------------------------------------


def anonymous(spec: AuthPolicySpec) -> tuple[Verdict, str]:
    """Whether a request with no credential at all passes this policy's checks, and why."""
    if spec.public:
        return "yes", "public"
    if _shadow(spec):
        return "yes", "mode: shadow (checks recorded, not enforced)"
    credentials = [name for name, on in (("jwt", spec.jwt is not None and spec.jwt.required),
                                         ("apiKey", spec.api_key is not None),
                                         ("basicAuth", spec.basic_auth is not None)) if on]
    if spec.satisfy.mode == "any" and (spec.jwt or spec.api_key or spec.basic_auth):
        return "no", "satisfy: any needs one valid credential"
    if credentials:
        return "no", f"{credentials[0]} required"
    auth = spec.authorization
    rules = _enforced(auth.rules) if auth is not None else []
    if auth is not None and auth.default == "deny" and all(
            r.when.claims or r.when.scopes for r in rules if r.action == "allow"):
        return "no", "authorization allows only requests with a verified JWT"
    if spec.oidc is not None:
        if spec.oidc.pass_through_paths:
            return "maybe", "oidc passes some paths through without a session"
        return "no", "oidc session required"
    if spec.ext_auth is not None:
        return "maybe", "extAuth decides"
    if auth is not None:
        denies = [r for r in rules if r.action == "deny"]
        allows_all = auth.default == "allow" or any(r.action == "allow" and r.when.is_empty() for r in rules)
        if denies or not allows_all:
            return "maybe", "authorization rules decide"
    if spec.jwt is not None:
        return "yes", "jwt.required: false and no rule needs a credential"
    return "yes", "no credential check"


def combine(levels: list[tuple[Verdict, str]]) -> tuple[Verdict, str]:
    """Both levels are enforced: one that refuses anonymous requests is enough."""
    for wanted in ("no", "maybe"):
        for verdict, why in levels:
            if verdict == wanted:
                return verdict, why
    return "yes", "; ".join(why for _, why in levels) or "no AuthPolicy"


def _policy_for(p: PolicySet) -> dict[tuple[str, str, str | None], Located[AuthPolicy]]:
    return {(x.resource.spec.target_ref.kind, x.resource.spec.target_ref.name,
             x.resource.spec.target_ref.rule): x for x in p.auth_policies.values()}


def _anonymous_routes(p: PolicySet) -> Iterator[Problem]:
    policy_for = _policy_for(p)
    for route in p.routes.values():
        spec = route.resource.spec
        gw_pol = policy_for.get(("Gateway", spec.gateway, None))
        if gw_pol is None or _shadow(gw_pol.resource.spec):  # a dry run: its checks enforce nothing yet
            continue
        gw_verdict = anonymous(gw_pol.resource.spec)
        for i, (rule, rule_name) in enumerate(zip(spec.rules, spec.rule_names(), strict=True)):
            pol = (policy_for.get(("Route", route.name, rule.name)) if rule.name else None) or policy_for.get(
                ("Route", route.name, None))
            if pol is not None and pol.resource.spec.public:
                yield pol.source.problem(("spec", "public"), f"route {route.name}/{rule_name} is reachable "
                                         f"with no credential: public turns off the checks of gateway "
                                         f"{spec.gateway!r} (AuthPolicy {gw_pol.name!r})")
                continue
            levels = [gw_verdict] + ([anonymous(pol.resource.spec)] if pol else [])
            verdict, why = combine(levels)
            if verdict == "yes":
                yield route.source.problem(("spec", "rules", i), f"route {route.name}/{rule_name} is reachable "
                                           f"with no credential although gateway {spec.gateway!r} has "
                                           f"checks (AuthPolicy {gw_pol.name!r}): {why}")


def lint(p: PolicySet) -> list[Problem]:
    """Every warning of a valid policy set, in file order."""
    out: list[Problem] = []
    for item in p.auth_policies.values():
        out += _rule_warnings(item)
    out += _anonymous_routes(p)
    return sorted(set(out), key=lambda w: (w.path, w.line, w.col, w.field, w.message))
