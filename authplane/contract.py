"""Names the compiler and the decision service agree on, in one leaf module everything may import.

The compiler writes them into Envoy configuration; the decision service reads them back from the
requests Envoy sends. Nothing here imports any other part of authplane.
"""

from __future__ import annotations

API_VERSION = "authplane.dev/v1alpha1"
"""The ``apiVersion`` of every policy document."""

JWT_FILTER = "envoy.filters.http.jwt_authn"
JWT_PAYLOAD_KEY = "jwt_payload"
"""Dynamic metadata key (namespace ``JWT_FILTER``) holding the verified JWT payload."""

CLIENT_IP_HEADER = "x-authplane-client-ip"
JWT_PAYLOAD_HEADER = "x-authplane-jwt-payload"
"""HTTP mode: Envoy sets these on the check request from its own state (client address, verified
JWT payload), replacing any client copy; they are never read from the client's request."""
RESERVED_HEADERS = (CLIENT_IP_HEADER, JWT_PAYLOAD_HEADER)

IDENTITY_HEADERS = ("x-auth-request-user", "x-auth-request-email", "x-auth-request-groups")
"""Sent upstream on allow (``identityHeaders``), and answered by the forward-auth endpoint."""

POLICY_KEY = "authplane.policy"
LEVEL_KEY = "authplane.level"
TARGET_KEY = "authplane.target"
RULES_KEY = "authplane.rules"
"""ext_authz context extensions: which policy applies (policy, level, target) and the digest of
its builtin rules (so a rule edit changes the fleet's version though Envoy never reads them)."""

BUILTIN_HTTP_PREFIX = "/envoy/"
"""HTTP mode: the decision service reads the policy from the path, ``/envoy/<policy>/<path>``."""
BUILTIN_HTTP_REPORT_PREFIX = "/envoy-report/"
"""The same with the decision log on: the service also names the rule of a denial in response
headers (``DENIED`` below), which that route's config turns into metadata and keeps from the
client. A path prefix, not a request header, so a client can never ask for them."""

NATIVE_DECISION_LOG_PATH = "/authplane.decisions.v1.DecisionLog/Report"
"""The gRPC method (on authplane's xDS port) where authplane's Envoy module sends its decision
log batches (``serve --decision-log-transport native``): the request is the raw batch
(``controlplane/decisions.py``: ``v1 US node US fleet US dropped``, then RS-separated records),
the answer empty."""

# --- shadow mode (issue 12): where each check's would-deny is found in Envoy's state ----------
#
# Every check of a ``mode: shadow`` policy (or a ``mode: shadow`` authorization or builtin extAuth
# rule) records its outcome in one place of Envoy's per-request dynamic metadata, the same for every check type:
# an RBAC instance's shadow result, in the namespace ``RBAC_FILTER`` (Envoy fixes it, whatever
# the instance's name), under the keys ``shadow_prefix(check, level, policy) + RBAC_SHADOW_RESULT``
# (``RBAC_DENIED`` = would-deny, ``RBAC_ALLOWED``) and ``... + RBAC_SHADOW_RULE`` (the rule whose
# match decided it: an authorization rule's name, ``<name>#<n>`` for a CEL deny expansion; absent
# when no rule matched, so on every would-deny but a deny rule's; the other checks' recorders name
# the check itself when it passed). Access log: ``%DYNAMIC_METADATA(envoy.filters.http.rbac:<key>)%``.
# A key is present only when that check is in shadow on the request's route; an enforcing check
# writes none of these. The detail, where Envoy has one, is elsewhere (below).

MODE_ENFORCE = "enforce"
MODE_SHADOW = "shadow"
"""The values of ``mode`` on an AuthPolicy and on an authorization rule (default enforce)."""

RBAC_FILTER = "envoy.filters.http.rbac"
"""Dynamic metadata namespace of every RBAC instance (the shadow results below)."""
RBAC_SHADOW_RESULT = "shadow_engine_result"
RBAC_SHADOW_RULE = "shadow_effective_policy_id"
"""Key suffixes Envoy writes (after the instance's ``shadow_rules_stat_prefix``)."""
RBAC_DENIED = "denied"
RBAC_ALLOWED = "allowed"

SHADOW_PREFIX = "authplane/shadow/"
SHADOW_CHECKS = ("authorization", "jwt", "basicAuth", "apiKey", "extAuth")
"""``check`` in ``shadow_prefix``: the AuthPolicy section names."""


def key_name(policy: str) -> str:
    """A policy name as these keys spell it: no dot (a name may have some, ``~`` for each), since
    Envoy's module interface reads a metadata key as a dotted path (and no colon: the access-log
    ``%DYNAMIC_METADATA(namespace:key)%`` splits there)."""
    return policy.replace(".", "~")


def shadow_prefix(check: str, level: str, policy: str) -> str:
    """The key prefix of one check's shadow result: ``authplane/shadow/<check>/<level>/<policy>/``
    (``level`` gateway or route; the policy as ``key_name``)."""
    return f"{SHADOW_PREFIX}{check}/{level}/{key_name(policy)}/"


# Attribution of enforced RBAC denials (the decision log): Envoy writes, under each instance's
# ``rules_stat_prefix`` = ``enforced_prefix(policy)``, the enforced engine's result and matched
# rule, so a denial names its level's policy even when both levels have ``authorization``. An
# ALLOW engine (``default: deny``) matches no rule when it denies, so such a level also carries,
# with the decision log on and no shadow rules of its own, its deny rules as DENY ``shadow_rules`` under
# ``deny_prefix(level, policy)``: ``... + RBAC_SHADOW_RULE`` is the deny rule that excluded the
# request (``<name>#<n>`` never: the deny rules are not expanded there).
RBAC_ENFORCED_RESULT = "enforced_engine_result"
RBAC_ENFORCED_RULE = "enforced_effective_policy_id"
DENY_PREFIX = "authplane/deny/"


def enforced_prefix(policy: str) -> str:
    return f"{key_name(policy)}/"


def deny_prefix(level: str, policy: str) -> str:
    """``authplane/deny/<level>/<policy>/``: where a ``default: deny`` level's deny rule is named."""
    return f"{DENY_PREFIX}{level}/{key_name(policy)}/"


JWT_FAILURE_KEY = "jwt_failure"
"""Shadow JWT detail: ``JWT_FILTER`` namespace, ``{code, message}`` of a token that was presented
and failed verification (``failed_status_in_metadata``); absent when no token was presented."""

EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
SHADOW_VERDICT_KEY = "authplane_verdict"
SHADOW_POLICY_KEY = "authplane_policy"
SHADOW_RULE_KEY = "authplane_rule"
WOULD_DENY = "would-deny"
"""Shadow builtin ext_authz detail: the decision service answers allow and puts, in its
OkHttpResponse / CheckResponse ``dynamic_metadata`` (namespace ``EXT_AUTHZ_FILTER``),
``{authplane_verdict: would-deny, authplane_policy: <policy>, authplane_rule: <rule or ''>}``
when it would have denied; nothing when it allows. A ``mode: shadow`` rule of an enforcing policy
reports the same on an allow of the enforced rules (``rule``: the shadow deny rule). HTTP mode
sends them as response headers that Envoy copies there (``dynamic_metadata_from_headers``); a
shadow HTTP Backend's Lua call writes the same keys (``rule`` empty) when the service answers
anything but 200."""
DENIED = "deny"
"""An enforced denial by a builtin rule: ``{authplane_verdict: deny, authplane_policy, authplane_rule}``
in the same namespace, so the decision log names the rule (Envoy's response code details say only
``ext_authz_denied``). gRPC mode: the denied CheckResponse's ``dynamic_metadata`` (Envoy 1.40
keeps it on a denial); HTTP mode: response headers of the denial, only on
``BUILTIN_HTTP_REPORT_PREFIX`` paths, that the route copies to metadata
(``dynamic_metadata_from_headers``) and leaves out of the client's answer
(``allowed_client_headers``: names without an underscore, which a client cannot send either:
the connection manager refuses them). No key has a dot: a module's access logger reads a
metadata key as a dotted path."""
