"""One module per Envoy HTTP filter, each a ``base.Filter`` subclass with one instance ``FILTER``.

``ORDER`` is the one table that registers them and fixes the order of the HTTP filter chain. The
credential checks only authenticate; each one that applies must pass (401 otherwise), or with
``satisfy: any`` one of them (the route variants of ``compiler/satisfy.py`` choose which run).
"""

from authplane.compiler.filters import (
    api_key_auth,
    auth_method,
    basic_auth,
    dynamic_module,
    ext_authz,
    jwt_authn,
    modules_between,
    modules_first,
    oauth2,
    oidc_session,
    rbac,
    router,
)
from authplane.compiler.filters.base import Filter

ORDER: tuple[Filter, ...] = (
    # Dynamic modules (a policy's ``filters``) placed ``beforeAuthentication``: before every check.
    modules_first.FILTER,
    # Browser sign-in (OIDC) first: it answers the callback and logout paths and sends browsers
    # without a session to sign in before any check can refuse them; it keeps the ID token cookie
    # that the JWT check then verifies.
    oauth2.FILTER,
    # JWT: bearer tokens, and the ID token cookie of a sign-in session.
    jwt_authn.FILTER,
    # Right after the JWT check has read them, the sign-in cookies are removed (never upstream).
    oidc_session.FILTER,
    # HTTP Basic and API keys after JWT, so every identity header they set (user name, client
    # name, replacing any client copy) is in place before anything reads headers.
    basic_auth.FILTER,
    api_key_auth.FILTER,
    # satisfy: any: the method that passed (methodHeader), set after the credential checks and
    # before anything that reads headers, so rules see authplane's value, never a client's copy.
    auth_method.FILTER,
    # Dynamic modules placed after the credential checks, then those placed before authorization.
    modules_between.FILTER,
    # The native authorization rules, after every credential check: they can match verified
    # claims and the user/client headers the checks set.
    rbac.FILTER,
    # External authorization after the native checks: the decision service never sees a request
    # they refused, and it receives the verified claims and identity headers.
    ext_authz.FILTER,
    # extAuth.engine: native (the builtin rules decided inside Envoy, where ext_authz would be),
    # then the dynamic modules placed ``afterAuthorization``: after every check, before the router.
    dynamic_module.FILTER,
    # The router, always last.
    router.FILTER,
)

__all__ = ["ORDER", "Filter"]
