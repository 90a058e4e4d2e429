"""envoy.filters.http.basic_auth: instances per level, users carried in RDS.

Like RBAC, one instance checks the gateway level (users set per virtual host) and another the route
level (users set per route), so a route with both requires a user known to both files. Envoy fixes
the user-name header per instance, so policies forwarding the user under different headers get
different instances. Every instance is disabled in the connection manager and enabled where a policy
applies with ``BasicAuthPerRoute``: the users travel in RDS and a changed file reaches open
connections.

``mode: shadow``: Envoy's basic_auth filter always denies a bad credential, so the level's
instance stays off and a recorder (an RBAC instance with shadow rules only, before the header is
removed) notes a would-deny unless the request carries ``Authorization: Basic`` for a user of the
file. The cost: RBAC cannot hash, so the password itself is not verified in shadow (a known user
with a wrong password is recorded as allowed), and ``userHeader`` is not set.

Envoy's filter leaves the ``Authorization`` header in place; unless a policy says ``forward: true``,
a ``header_mutation`` instance right after the checks removes it (per virtual host and per route;
Envoy applies both levels, so the header is removed if either level asks for it).
"""

from __future__ import annotations

import base64
import re
import string

from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2 as mutation
from envoy.config.core.v3 import base_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac
from envoy.extensions.filters.http.basic_auth.v3 import basic_auth_pb2 as ba
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2 as hm
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)

from authplane.compiler.filters.base import Filter, PerFilterConfig, disable, enable, http_filter
from authplane.compiler.filters.rbac import header_regex, recorder_name, shadow_record, shadow_recorder
from authplane.compiler.ir import LEVELS, Checks, ListenerIR, RouteIR
from authplane.compiler.satisfy import BASIC, is_any, variant_of
from authplane.contract import MODE_SHADOW
from authplane.policy.model import BasicAuth

STRIP = "envoy.filters.http.header_mutation.basic_auth"
"""Removes the ``Authorization`` header after the checks."""
_NO_USERS = base_pb2.DataSource(inline_string="# users are set per virtual host and route\n")
"""Envoy refuses an instance without a users source; the instance is never used without a route's."""


def _levels(lst: ListenerIR) -> list[tuple[str, BasicAuth]]:
    return [(c.level, c.spec.basic_auth) for c in lst.all_checks() if c.spec.basic_auth is not None]


_B64 = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"


def _b64_prefix(data: bytes) -> str:
    """A regex for the base64 text of every string that starts with ``data``."""
    full = len(data) // 3 * 3
    head = re.escape(base64.b64encode(data[:full]).decode())
    rest = data[full:]
    if not rest:
        return head
    b0 = rest[0]
    if len(rest) == 1:
        return head + re.escape(_B64[b0 >> 2]) + "[" + re.escape(_B64[(b0 & 3) << 4:((b0 & 3) << 4) + 16]) + "]"
    b1 = rest[1]
    second = _B64[((b0 & 3) << 4) | (b1 >> 4)]
    third = _B64[(b1 & 15) << 2:((b1 & 15) << 2) + 4]
    return head + re.escape(_B64[b0 >> 2] + second) + "[" + re.escape(third) + "]"


def _known_user(checks: Checks) -> rbac.Principal:
    """An ``Authorization: Basic`` credential whose user is in the file (password not checked)."""
    users = "|".join(_b64_prefix(f"{u.name}:".encode()) for u in checks.resolved.users)
    return header_regex("authorization", f"[Bb][Aa][Ss][Ii][Cc] +(?:{users or '$^'}).*")


class BasicAuthFilter(Filter):
    prefix = "envoy.filters.http.basic_auth"

    def http_filters(self, lst: ListenerIR) -> list[hcm.HttpFilter]:
        found = _levels(lst)
        instances = {self.name(level, spec.user_header or ""): spec.user_header for level, spec in found}
        out = [http_filter(n, ba.BasicAuth(users=_NO_USERS, forward_username_header=h or ""), disabled=True)
               for n, h in sorted(instances.items(), key=lambda kv: (".route" in kv[0], kv[0]))]
        shadow = {c.level for c in lst.all_checks() if c.spec.basic_auth is not None and c.spec.mode == MODE_SHADOW}
        out.extend(shadow_recorder(recorder_name("basicAuth", lvl)) for lvl in LEVELS if lvl in shadow)
        if any(not spec.forward for _, spec in found):
            out.append(http_filter(STRIP, hm.HeaderMutation(), disabled=True))
        return out

    def level_config(self, lst: ListenerIR, checks: Checks) -> PerFilterConfig:
        spec = checks.spec.basic_auth
        if spec is None:
            return {}
        # The users as Envoy reads them: ``user:{SHA}<hash>`` lines, comments dropped.
        if checks.spec.mode == MODE_SHADOW:
            out = {recorder_name("basicAuth", checks.level): shadow_record("basicAuth", checks, _known_user(checks))}
        else:
            htpasswd = "".join(f"{u.name}:{u.secret}\n" for u in checks.resolved.users)
            users = ba.BasicAuthPerRoute(users=base_pb2.DataSource(inline_string=htpasswd))
            out = {self.name(checks.level, spec.user_header or ""): enable(users)}
        if not spec.forward:
            strip = hm.HeaderMutationPerRoute(mutations=hm.Mutations(
                request_mutations=[mutation.HeaderMutation(remove="authorization")]))
            out[STRIP] = enable(strip)
        return out

    def route_config(self, lst: ListenerIR, route: RouteIR) -> PerFilterConfig:
        v = variant_of(route)
        if v is None:
            return super().route_config(lst, route)

        def on(c: Checks | None) -> bool:  # satisfy: any: only where the variant's match found Basic
            return c is not None and c.spec.basic_auth is not None and (not is_any(c) or (c.level, BASIC) in v.enabled)

        out: PerFilterConfig = {}
        gw, rt = lst.checks, route.checks
        if gw is not None and gw.spec.basic_auth is not None and not on(gw):
            out[self.name("gateway", gw.spec.basic_auth.user_header or "")] = disable()
            if not gw.spec.basic_auth.forward and not (on(rt) and rt is not None and rt.spec.basic_auth
                                                       and not rt.spec.basic_auth.forward):
                out[STRIP] = disable()
        if on(rt) and rt is not None:
            out.update(self.level_config(lst, rt))
        return out


FILTER = BasicAuthFilter()
