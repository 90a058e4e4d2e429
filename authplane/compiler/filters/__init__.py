"""One module per Envoy HTTP filter, each with the same four hooks (see ``base.FilterModule``).

``ORDER`` is the one table that fixes the order of the HTTP filter chain: JWT first, then the
native authorization rules, then external authorization, so the decision service never sees a
request the native checks refused, and it receives the verified claims.
"""

from authplane.compiler.filters import ext_authz, jwt_authn, rbac, router
from authplane.compiler.filters.base import FilterModule

ORDER: tuple[FilterModule, ...] = (jwt_authn, rbac, ext_authz, router)

__all__ = ["ORDER", "FilterModule"]
