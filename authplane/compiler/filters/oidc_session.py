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
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from google.protobuf import any_pb2

from authplane.compiler.filters.oauth2 import cookie_name
from authplane.compiler.ir import ClusterIR, ListenerIR, OidcIR, RouteIR
from authplane.compiler.pb import pack

NAME = "envoy.filters.http.lua.oidc_session"

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


def script(irs: list[OidcIR]) -> str:
    """The Lua code for the policies ``irs`` (prefixes and header names are plain tokens)."""
    prefixes = sorted({f'"{ir.spec.cookie.prefix}_"' for ir in irs})
    headers = sorted({f'{{"{cookie_name(ir.spec, "id_token")}", "{ir.spec.id_token_header}"}}'
                      for ir in irs if ir.spec.id_token_header})
    return _SCRIPT % (", ".join(prefixes), ", ".join(headers))


def _config(irs: list[OidcIR]) -> dict[str, any_pb2.Any]:
    if not irs:
        return {}
    code = lua_pb2.LuaPerRoute(source_code=base_pb2.DataSource(inline_string=script(irs)))
    return {NAME: pack(rc.FilterConfig(config=pack(code)))}


def http_filters(lst: ListenerIR) -> list[hcm.HttpFilter]:
    if not any(c.oidc for c in lst.all_checks()):
        return []
    return [hcm.HttpFilter(name=NAME, typed_config=pack(lua_pb2.Lua()), disabled=True)]


def vhost_config(lst: ListenerIR) -> dict[str, any_pb2.Any]:
    return _config([lst.checks.oidc] if lst.checks and lst.checks.oidc else [])


def route_config(lst: ListenerIR, route: RouteIR) -> dict[str, any_pb2.Any]:
    if route.checks is None or route.checks.oidc is None:
        return {}  # the virtual host's script (gateway level), if any
    gateway = [lst.checks.oidc] if lst.checks and lst.checks.oidc else []
    return _config([*gateway, route.checks.oidc])


def clusters(lst: ListenerIR) -> list[ClusterIR]:
    return []
