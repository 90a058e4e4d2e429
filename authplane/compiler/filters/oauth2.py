"""envoy.filters.http.oauth2: browser sign-in, one instance per ``oidc`` policy, first in the chain.

Envoy fixes the whole OAuth configuration per filter instance, so each policy gets its own
instance (``envoy.filters.http.oauth2.<policy>``), disabled in the connection manager and enabled
per virtual host (gateway level) or route (route level). It comes first: it must answer the
callback and logout paths and send browsers to sign in before any check can refuse them, and the
JWT check after it reads the ID token cookie it keeps (decrypted, HMAC-protected).

Browsers (``Accept`` with ``text/html``) without a valid session get a 302 to the provider; other
clients (``X-Requested-With``, ``Accept: application/json``, no ``Accept``) get 401
(``deny_redirect_matcher``). The client secret and the cookie HMAC key travel over SDS
(``Secret`` resources named ``<policy>/oidc-client-secret`` and ``<policy>/oidc-hmac``).
"""

from __future__ import annotations

import re

from envoy.config.core.v3 import http_uri_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.oauth2.v3 import oauth_pb2 as oauth
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.type.matcher.v3 import path_pb2, regex_pb2, string_pb2
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from authplane.compiler.filters.jwt_authn import uri_cluster
from authplane.compiler.ir import Checks, ClusterIR, ListenerIR, OidcIR, RouteIR
from authplane.compiler.pb import ads_source, duration, pack
from authplane.policy.model import Oidc


def _per_route_class() -> type[Message]:
    """``OAuth2PerRoute`` (Envoy 1.38+: a whole ``OAuth2Config`` for one virtual host or route),
    defined here when the installed xds-protos predates it."""
    name = "envoy.extensions.filters.http.oauth2.v3.OAuth2PerRoute"
    pool = descriptor_pool.Default()
    try:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto(
        name="authplane/envoy/oauth2_per_route.proto", package="envoy.extensions.filters.http.oauth2.v3",
        syntax="proto3", dependency=[oauth.DESCRIPTOR.name])
    file.message_type.add(name="OAuth2PerRoute").field.add(
        name="config", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        type_name=".envoy.extensions.filters.http.oauth2.v3.OAuth2Config", json_name="config")
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))


OAuth2PerRoute = _per_route_class()
PREFIX = "envoy.filters.http.oauth2"
_COOKIES = {"bearer_token": "access", "oauth_hmac": "hmac", "oauth_expires": "expires", "id_token": "id",
            "refresh_token": "refresh", "oauth_nonce": "nonce", "code_verifier": "verifier"}
_SAME_SITE = {"lax": oauth.CookieConfig.LAX, "strict": oauth.CookieConfig.STRICT,
              "none": oauth.CookieConfig.NONE, "disabled": oauth.CookieConfig.DISABLED}


def name(ir: OidcIR) -> str:
    return f"{PREFIX}.{ir.policy}"


def cookie_name(spec: Oidc, kind: str) -> str:
    """Envoy's cookie ``kind`` (``id_token``, ``oauth_hmac`` ...) under the policy's prefix."""
    return f"{spec.cookie.prefix}_{_COOKIES[kind]}"


def secret_names(ir: OidcIR) -> tuple[str, str]:
    return f"{ir.policy}/oidc-client-secret", f"{ir.policy}/oidc-hmac"


def _sds(secret: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(name=secret, sds_config=ads_source())


def _path_matcher(pattern: str) -> rc.HeaderMatcher:
    """``:path`` (query included) matching an exact path or a ``/prefix/*``."""
    if pattern.endswith("/*"):
        m = string_pb2.StringMatcher(prefix=pattern[:-1])
    else:
        m = string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=f"^{re.escape(pattern)}(\\?.*)?$"))
    return rc.HeaderMatcher(name=":path", string_match=m)


_API_CLIENTS = (
    rc.HeaderMatcher(name="x-requested-with", present_match=True),
    rc.HeaderMatcher(name="accept", string_match=string_pb2.StringMatcher(contains="text/html"),
                     invert_match=True, treat_missing_header_as_empty=True),
)
"""Requests that get 401 instead of a redirect to sign in: XHR and clients not asking for HTML."""


def config(ir: OidcIR) -> oauth.OAuth2Config:
    s = ir.spec
    client_secret, hmac_secret = secret_names(ir)
    exact = {p: path_pb2.PathMatcher(path=string_pb2.StringMatcher(exact=p)) for p in (s.redirect_path, s.logout_path)}
    same_site = oauth.CookieConfig(same_site=_SAME_SITE[s.cookie.same_site])
    cfg = oauth.OAuth2Config(
        token_endpoint=http_uri_pb2.HttpUri(uri=ir.endpoints.token, cluster=uri_cluster(ir.endpoints.token).name,
                                            timeout=duration(5)),
        authorization_endpoint=ir.endpoints.authorization,
        end_session_endpoint=ir.endpoints.end_session or "",
        credentials=oauth.OAuth2Credentials(
            client_id=s.client_id, token_secret=_sds(client_secret), hmac_secret=_sds(hmac_secret),
            cookie_names=oauth.OAuth2Credentials.CookieNames(**{k: cookie_name(s, k) for k in _COOKIES}),
            cookie_domain=s.cookie.domain or ""),
        redirect_uri=f"%REQ(x-forwarded-proto)%://%REQ(:authority)%{s.redirect_path}",
        redirect_path_matcher=exact[s.redirect_path],
        signout_path=exact[s.logout_path],
        forward_bearer_token=s.forward_access_token,
        pass_through_matcher=[_path_matcher(p) for p in s.pass_through_paths],
        auth_scopes=["openid", *(x for x in s.scopes if x != "openid")],
        deny_redirect_matcher=_API_CLIENTS,
        cookie_configs=oauth.CookieConfigs(**{f"{k}_cookie_config": same_site for k in (
            "bearer_token", "oauth_hmac", "oauth_expires", "id_token", "refresh_token", "oauth_nonce",
            "code_verifier")}),
        stat_prefix=f"{ir.policy}.",
    )
    return cfg


def _irs(lst: ListenerIR) -> list[OidcIR]:
    return [c.oidc for c in lst.all_checks() if c.oidc is not None]


def http_filters(lst: ListenerIR) -> list[hcm.HttpFilter]:
    return [hcm.HttpFilter(name=name(ir), typed_config=pack(oauth.OAuth2(config=config(ir))), disabled=True)
            for ir in _irs(lst)]


def _enable(checks: Checks | None) -> dict[str, any_pb2.Any]:
    ir = checks.oidc if checks else None
    return {name(ir): pack(rc.FilterConfig(config=pack(OAuth2PerRoute(config=config(ir)))))} if ir else {}


def vhost_config(lst: ListenerIR) -> dict[str, any_pb2.Any]:
    return _enable(lst.checks)


def route_config(lst: ListenerIR, route: RouteIR) -> dict[str, any_pb2.Any]:
    return _enable(route.checks)


def clusters(lst: ListenerIR) -> list[ClusterIR]:
    return [uri_cluster(ir.endpoints.token) for ir in _irs(lst)]


def secrets(lst: ListenerIR) -> list[secret_pb2.Secret]:
    """The SDS ``Secret`` resources the listener's oauth2 instances read."""
    out = []
    for ir in _irs(lst):
        for secret, value in zip(secret_names(ir), (ir.client_secret, ir.hmac_secret), strict=True):
            out.append(secret_pb2.Secret(name=secret, generic_secret=secret_pb2.GenericSecret(
                secret={"inline_bytes": value})))
    return out
