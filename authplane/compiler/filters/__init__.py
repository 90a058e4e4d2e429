"""One module per Envoy HTTP filter, each with the same four hooks (see ``base.FilterModule``).

``ORDER`` is the one table that fixes the order of the HTTP filter chain:

0. browser sign-in (OIDC, the oauth2 filter): it answers the callback and logout paths and sends
   browsers without a session to sign in before any check can refuse them, and it keeps the ID
   token cookie that the JWT check then verifies;
1. the credential checks: JWT (after which ``oidc_session`` removes the sign-in cookies it read),
   then HTTP Basic, then API keys. They only authenticate; each one
   that applies must pass (401 otherwise). Basic and API keys come after JWT so that every
   identity header they set (user name, client name, replacing any client copy) is in place
   before anything reads headers;
2. the native authorization rules (RBAC), which can therefore match verified claims and the
   user/client headers the credential checks set;
3. external authorization, so the decision service never sees a request the native checks
   refused, and it receives the verified claims and identity headers;
4. the router.
"""

from authplane.compiler.filters import (
    api_key_auth,
    basic_auth,
    ext_authz,
    jwt_authn,
    oauth2,
    oidc_session,
    rbac,
    router,
)
from authplane.compiler.filters.base import FilterModule

ORDER: tuple[FilterModule, ...] = (
    oauth2, jwt_authn, oidc_session, basic_auth, api_key_auth, rbac, ext_authz, router)

__all__ = ["ORDER", "FilterModule"]
