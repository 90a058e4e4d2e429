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
