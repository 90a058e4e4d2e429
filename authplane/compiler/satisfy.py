"""``satisfy: any`` as route variants: one valid credential among ``jwt``, ``apiKey``, ``basicAuth``.

Envoy 1.40 has no "any of these filters" switch: ``jwt_authn`` tolerates a missing token
(``allow_missing``), but ``api_key_auth`` and ``basic_auth`` have no such option and answer 401 to
a request without their credential, and RBAC can only answer 403 (no ``WWW-Authenticate``). So the
choice is made by the route table, which Envoy matches before any filter runs: a route whose
policy (gateway or route level) says ``satisfy: any`` becomes consecutive variants with the same
match plus conditions on which credentials the request carries (a header present, a query
parameter present, a cookie in ``cookie``, ``authorization`` starting with ``Basic ``):

- one variant per set of carried API keys / Basic credentials, largest sets first (first match
  wins, so a later variant implies the earlier ones' credentials are absent); on it each carried
  credential's filter is enabled (a wrong key or password is 401, as always) and the others are
  off; the JWT requirement is ``allow_missing`` (a presented token is still verified: a bad one is
  401 even next to a valid key);
- where a level has no such credential, one variant per place its JWT can be (header, query,
  cookie) with the JWT required;
- last, a direct 401 with a ``WWW-Authenticate`` for each scheme of the levels left without a
  credential (every auth filter off: nothing is checked, nothing reaches the upstream).

Every presented credential is verified, so a wrong credential is never skipped for another
method. The checks other than credentials (RBAC, ext_authz) run on every variant except the 401,
and a gateway level and a route level are each satisfied on their own (layering unchanged).

Cost: no extra filter runs and no call leaves Envoy; the route table grows by at most
``2^k + j + 1`` routes per route (``k`` distinct key/Basic locations, ``j`` JWT locations; 4 for
the usual JWT + API key), and Envoy tries them in order. A credential in a place the route match
does not see (it never does: the conditions mirror each filter's own lookup, and err on the side
of "present") would only make the request fall to a later variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

from authplane.compiler.ir import Checks, ListenerIR, RouteIR

JWT, API_KEY, BASIC = "jwt", "apiKey", "basicAuth"


@dataclass(frozen=True, order=True)
class Carried:
    """Where a request carries a credential: a header (optionally starting with ``prefix``,
    compared ignoring case), a query parameter or a cookie."""

    kind: str  # "header" | "query" | "cookie"
    name: str
    prefix: str = ""

    @property
    def label(self) -> str:
        if self.kind == "header":
            return self.name + (f":{self.prefix.strip().lower()}" if self.prefix else "")
        return f"?{self.name}" if self.kind == "query" else f"cookie:{self.name}"


BASIC_CREDENTIALS = Carried("header", "authorization", "Basic ")
DEFAULT_JWT = (Carried("header", "authorization", "Bearer "), Carried("query", "access_token"))
"""Where Envoy's ``jwt_authn`` looks for a token when a provider names no place."""


@dataclass(frozen=True)
class Variant:
    """One route variant of a ``satisfy: any`` route."""

    carried: tuple[Carried, ...]
    """The credentials the route match requires (in addition to the route's own match)."""
    enabled: frozenset[tuple[str, str]]
    """(level, method) of the API key and Basic checks that run on this variant."""
    jwt_required: frozenset[str]
    """Levels whose JWT must be present (their other credentials are absent); other ``any``
    levels' JWT is ``allow_missing``."""
    passed: tuple[tuple[str, tuple[str, ...]], ...]
    """(level, the methods that satisfy it) for every ``any`` level."""
    challenges: tuple[str, ...] = ()
    """Non-empty: the variant answers 401 with these ``WWW-Authenticate`` values."""


@dataclass(frozen=True)
class VariantRoute(RouteIR):
    """A route of the route table that is one variant of ``RouteIR`` ``name`` (which it copies)."""

    variant: Variant | None = None
    base: str = ""


def is_any(checks: Checks | None) -> bool:
    return checks is not None and checks.spec.satisfy.mode == "any"


def any_levels(lst: ListenerIR, route: RouteIR) -> list[Checks]:
    """The levels of ``route`` that say ``satisfy: any`` (none on a public route)."""
    if route.public:
        return []
    return [c for c in (lst.checks, route.checks) if c is not None and is_any(c)]


def credentials(checks: Checks) -> list[tuple[str, Carried]]:
    """(method, where) of a level's API key and Basic credentials."""
    spec = checks.spec
    out = []
    if spec.api_key is not None:
        kind, name = spec.api_key.source
        out.append((API_KEY, Carried(kind, name)))
    if spec.basic_auth is not None:
        out.append((BASIC, BASIC_CREDENTIALS))
    return out


def jwt_places(checks: Checks) -> list[Carried]:
    jwt = checks.spec.jwt
    if jwt is None:
        return []
    out: set[Carried] = set()
    for prov in jwt.providers:
        if not prov.from_:
            out.update(DEFAULT_JWT)
        for src in prov.from_:
            if src.header:
                out.add(Carried("header", src.header.lower(), src.prefix or ""))
            elif src.query:
                out.add(Carried("query", src.query))
            elif src.cookie:
                out.add(Carried("cookie", src.cookie))
    return sorted(out)


def challenges(levels: list[Checks]) -> tuple[str, ...]:
    """One ``WWW-Authenticate`` per scheme of ``levels`` (realm: the policy)."""
    out: list[str] = []
    for c in levels:
        realm = f'realm="{c.policy}"'
        if c.spec.jwt is not None:
            out.append(f"Bearer {realm}")
        if c.spec.basic_auth is not None:
            out.append(f'Basic {realm}, charset="UTF-8"')
        if c.spec.api_key is not None:
            kind, name = c.spec.api_key.source
            out.append(f'ApiKey {realm}, {kind}="{name}"')
    return tuple(dict.fromkeys(out))


def variants(levels: list[Checks]) -> list[Variant]:
    """The variants of a route whose ``any`` levels are ``levels``, in match order."""
    creds = {c.level: credentials(c) for c in levels}
    places = sorted({where for found in creds.values() for _, where in found})
    out: list[Variant] = []
    for size in range(len(places), -1, -1):
        for combo in combinations(places, size):
            enabled = frozenset((lvl, m) for lvl, found in creds.items() for m, w in found if w in combo)
            passed = {c.level: tuple(m for m, w in creds[c.level] if w in combo) for c in levels}
            unmet = [c for c in levels if not passed[c.level]]
            if not unmet:
                out.append(Variant(combo, enabled, frozenset(), tuple(passed.items())))
                continue
            if all(c.spec.jwt is not None for c in unmet):
                required = frozenset(c.level for c in unmet)
                jwt_passed = tuple((lvl, ms or (JWT,)) for lvl, ms in passed.items())
                taken = {w.name for w in combo if w.kind == "header"}  # e.g. authorization: Basic
                jwt_where = sorted({w for c in unmet for w in jwt_places(c)
                                    if w not in places and not (w.kind == "header" and w.name in taken)})
                out.extend(Variant((*combo, w), enabled, required, jwt_passed) for w in jwt_where)
            out.append(Variant(combo, frozenset(), frozenset(), (), challenges(unmet)))
    return out


def expand(lst: ListenerIR, route: RouteIR) -> list[RouteIR]:
    """``route`` as the route table has it: itself, or its variants when a level says ``any``."""
    levels = any_levels(lst, route)
    if not levels:
        return [route]
    out: list[RouteIR] = []
    for v in variants(levels):
        label = "+".join(w.label for w in v.carried) or "none"
        fields = {f: getattr(route, f) for f in RouteIR.__dataclass_fields__}
        fields["name"] = f"{route.name}[{label}{'/401' if v.challenges else ''}]"
        out.append(VariantRoute(**fields, variant=v, base=route.name))
    return out


def variant_of(route: RouteIR) -> Variant | None:
    return route.variant if isinstance(route, VariantRoute) else None
