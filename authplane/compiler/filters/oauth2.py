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
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from authplane.compiler.filters.base import Filter, Needs, PerFilterConfig, enable, http_filter, uri_cluster
from authplane.compiler.ir import Checks, ListenerIR, RouteIR, specificity
from authplane.compiler.protos import ads_source, duration
from authplane.errors import CompileError
from authplane.policy.model import Jwks, Jwt, JwtProvider, Oidc, RouteMatch, TokenSource
from authplane.policy.oidc import ResolvedOidc, authorization_url


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
_COOKIES = {"bearer_token": "access", "oauth_hmac": "hmac", "oauth_expires": "expires", "id_token": "id",
            "refresh_token": "refresh", "oauth_nonce": "nonce", "code_verifier": "verifier"}
_AUTH_TYPE = {"client_secret_post": oauth.OAuth2Config.URL_ENCODED_BODY,
              "client_secret_basic": oauth.OAuth2Config.BASIC_AUTH}
_SAME_SITE = {"lax": oauth.CookieConfig.LAX, "strict": oauth.CookieConfig.STRICT,
              "none": oauth.CookieConfig.NONE, "disabled": oauth.CookieConfig.DISABLED}


def cookie_name(spec: Oidc, kind: str) -> str:
    """Envoy's cookie ``kind`` (``id_token``, ``oauth_hmac`` ...) under the policy's prefix."""
    return f"{spec.cookie.prefix}_{_COOKIES[kind]}"


def secret_names(policy: str) -> tuple[str, str]:
    return f"{policy}/oidc-client-secret", f"{policy}/oidc-hmac"


def _spec(checks: Checks) -> tuple[Oidc, ResolvedOidc]:
    """The ``oidc`` section and what discovery and the secret files gave for it."""
    spec, found = checks.spec.oidc, checks.resolved.oidc
    if spec is None or found is None:
        raise CompileError(f"{checks.origin}: the oidc section was not resolved")
    return spec, found


def id_token_check(checks: Checks) -> Jwt:
    """The JWT check of the ID token cookie the oauth2 filter keeps (HMAC-protected with it): so
    authorization rules see its claims and its claims reach the upstream as headers. With
    pass-through paths the check lets requests without the cookie through (the oauth2 filter
    already sent every other one to sign in)."""
    spec, found = _spec(checks)
    return Jwt(required=not spec.pass_through_paths, providers=[JwtProvider(
        name="oidc", issuer=spec.issuer, audiences=[spec.client_id], jwks=Jwks(uri=found.endpoints.jwks),
        from_=[TokenSource(cookie=cookie_name(spec, "id_token"))], forward=True,
        claims_to_headers=spec.claims_to_headers)])


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


def config(checks: Checks) -> oauth.OAuth2Config:
    s, found = _spec(checks)
    endpoints = found.endpoints
    client_secret, hmac_secret = secret_names(checks.policy)
    exact = {p: path_pb2.PathMatcher(path=string_pb2.StringMatcher(exact=p)) for p in (s.redirect_path, s.logout_path)}
    same_site = oauth.CookieConfig(same_site=_SAME_SITE[s.cookie.same_site])
    cfg = oauth.OAuth2Config(
        token_endpoint=http_uri_pb2.HttpUri(uri=endpoints.token, cluster=uri_cluster(endpoints.token).name,
                                            timeout=duration(5)),
        authorization_endpoint=authorization_url(checks.spec.oidc, checks.spec.authorization,
                                                 endpoints.authorization),
        auth_type=_AUTH_TYPE[s.token_endpoint_auth],
        end_session_endpoint=endpoints.end_session or "",
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
        stat_prefix=f"{checks.policy}.",
    )
    return cfg


def _oidc(lst: ListenerIR) -> list[Checks]:
    return [c for c in lst.all_checks() if c.spec.oidc is not None]


class OAuth2(Filter):
    prefix = "envoy.filters.http.oauth2"

    def http_filters(self, lst: ListenerIR) -> list[hcm.HttpFilter]:
        return [http_filter(self.name(c.policy), oauth.OAuth2(config=config(c)), disabled=True) for c in _oidc(lst)]

    def level_config(self, lst: ListenerIR, checks: Checks) -> PerFilterConfig:
        if checks.spec.oidc is None:
            return {}
        return {self.name(checks.policy): enable(OAuth2PerRoute(config=config(checks)))}

    def resources(self, lst: ListenerIR) -> Needs:
        """The token endpoints' clusters, and the SDS ``Secret`` resources the instances read."""
        clusters, secrets = [], []
        for checks in _oidc(lst):
            _, found = _spec(checks)
            clusters.append(uri_cluster(found.endpoints.token))
            for secret, value in zip(secret_names(checks.policy), (found.client_secret, found.hmac_secret),
                                     strict=True):
                secrets.append(secret_pb2.Secret(name=secret, generic_secret=secret_pb2.GenericSecret(
                    secret={"inline_bytes": value})))
        return Needs(tuple(clusters), tuple(secrets))

    def extra_routes(self, gateway: Checks | None, members: list[RouteIR]) -> list[RouteIR]:
        """Routes for the callback and logout paths on a host, so the instance that must answer
        them is enabled there whatever the user's routes match."""
        policies = [(c, None) for c in [gateway] if c is not None and c.spec.oidc is not None and members]
        policies += [(r.checks, r) for r in members if r.checks is not None and r.checks.spec.oidc is not None]
        out: dict[str, RouteIR] = {}
        for checks, route in policies:
            spec, _ = _spec(checks)
            for what, path in (("callback", spec.redirect_path), ("logout", spec.logout_path)):
                owner = out.get(path)
                if owner is not None and (owner.checks.policy if owner.checks else None) != (
                        route.checks.policy if route and route.checks else None):
                    raise CompileError(f"{path} is the oidc {what} path of two policies on the same host "
                                       f"({checks.origin} and {owner.origin}); give one another path")
                match = RouteMatch(path=path)
                out.setdefault(path, RouteIR(
                    name=f"oidc/{checks.policy}/{what}", match=match, cluster=(route or members[0]).cluster,
                    timeout=None, checks=route.checks if route else None, public=False, origin=checks.origin,
                    specificity=specificity(match)))
        return list(out.values())


FILTER = OAuth2()
