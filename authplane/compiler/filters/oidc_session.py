"""envoy.filters.http.lua.oidc_session: keeps the sign-in session away from the upstream.

The oauth2 filter forwards its cookies (access, ID and refresh tokens, decrypted) with the
request, and no native filter removes single cookies. Right after the JWT check has read the ID
token cookie, this small Lua script removes every session cookie of the policies that apply
(gateway and route level) and, with ``idTokenHeader``, puts the verified ID token in that header
(removing any client copy). The script travels per virtual host / route (``LuaPerRoute``); the
instance is disabled in the connection manager.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)

from authplane.compiler.filters.base import Filter, PerFilterConfig, enable, http_filter
from authplane.compiler.filters.oauth2 import cookie_name
from authplane.compiler.ir import ListenerIR, RouteIR
from authplane.policy.model import Oidc

_SCRIPT = """\
-- authplane: remove the sign-in session cookies before the request goes upstream
local PREFIXES = {%s}
local ID_HEADERS = {%s}
function envoy_on_request(handle)
  local headers = handle:headers()
  local kept, ours = {}, {}
  for part in string.gmatch(headers:get("cookie") or "", "[^;]+") do
    part = part:match("^%%s*(.-)%%s*$")
    local name, value = part:match("^([^=]+)=(.*)$")
    local mine = false
    for _, prefix in ipairs(PREFIXES) do
      if name and name:sub(1, #prefix) == prefix then mine = true end
    end
    if mine then ours[name] = value elseif part ~= "" then kept[#kept + 1] = part end
  end
  for _, pair in ipairs(ID_HEADERS) do
    if ours[pair[1]] then headers:replace(pair[2], ours[pair[1]]) else headers:remove(pair[2]) end
  end
  if #kept == 0 then headers:remove("cookie") else headers:replace("cookie", table.concat(kept, "; ")) end
end
"""


def script(specs: list[Oidc]) -> str:
    """The Lua code for the ``oidc`` sections ``specs`` (prefixes and header names are plain tokens)."""
    prefixes = sorted({f'"{spec.cookie.prefix}_"' for spec in specs})
    headers = sorted({f'{{"{cookie_name(spec, "id_token")}", "{spec.id_token_header}"}}'
                      for spec in specs if spec.id_token_header})
    return _SCRIPT % (", ".join(prefixes), ", ".join(headers))


def _gateway(lst: ListenerIR) -> list[Oidc]:
    oidc = lst.checks.spec.oidc if lst.checks else None
    return [oidc] if oidc else []


class OidcSession(Filter):
    prefix = "envoy.filters.http.lua.oidc_session"

    def http_filters(self, lst: ListenerIR) -> list[hcm.HttpFilter]:
        if not any(c.spec.oidc for c in lst.all_checks()):
            return []
        return [http_filter(self.name(), lua_pb2.Lua(), disabled=True)]

    def _config(self, specs: list[Oidc]) -> PerFilterConfig:
        if not specs:
            return {}
        code = lua_pb2.LuaPerRoute(source_code=base_pb2.DataSource(inline_string=script(specs)))
        return {self.name(): enable(code)}

    def vhost_config(self, lst: ListenerIR) -> PerFilterConfig:
        return self._config(_gateway(lst))

    def route_config(self, lst: ListenerIR, route: RouteIR) -> PerFilterConfig:
        if route.checks is None or route.checks.spec.oidc is None:
            return {}  # the virtual host's script (gateway level), if any
        return self._config([*_gateway(lst), route.checks.spec.oidc])


FILTER = OidcSession()
