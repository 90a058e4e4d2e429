"""TLS of listeners (HTTPS, client certificates, the redirect from http) and of upstream clusters.

Certificates, keys and CAs never sit in a listener or cluster: each is an SDS ``Secret`` resource
(served over ADS like the oauth2 secrets) that the transport sockets name. A rotated file is a new
``Secret`` under the same name, so Envoy serves it to new connections without touching (or
draining) the listener. An ``https`` listener gets one filter chain per certificate, matched by
SNI on the certificate's DNS names, and the first certificate as its default chain.
"""

from __future__ import annotations

import ipaddress

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2

from authplane.compiler.ir import ClusterIR, ListenerIR
from authplane.compiler.protos import ads_source, pack
from authplane.errors import CompileError
from authplane.policy.documents import KeyPair

SOCKET = "envoy.transport_sockets.tls"
SYSTEM_TRUST = "/etc/ssl/certs/ca-certificates.crt"
REDIRECT_ROUTE = "authplane:redirect-to-https"
FLEET_CERT_SECRET = "authplane:fleet-certificate"
"""A static secret of the bootstrap (``authplane bootstrap --xds-client-cert``): the Envoy's fleet
certificate and key as paths it reads, presented to the decision service (``--authz-client-ca``)."""
_VERSIONS = {"1.2": common_pb2.TlsParameters.TLSv1_2, "1.3": common_pb2.TlsParameters.TLSv1_3}


def _sds(name: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(name=name, sds_config=ads_source())


def _socket(ctx: tls_pb2.DownstreamTlsContext | tls_pb2.UpstreamTlsContext) -> base_pb2.TransportSocket:
    return base_pb2.TransportSocket(name=SOCKET, typed_config=pack(ctx))


def cert_secret_name(owner: str, index: int | None = None) -> str:
    return f"{owner}/tls-cert" + ("" if index is None else f"-{index}")


def ca_secret_name(owner: str) -> str:
    return f"{owner}/tls-ca"


def _backend_owner(c: ClusterIR) -> str:
    return f"backend/{c.name}"


def _cert_secret(name: str, pair: KeyPair) -> secret_pb2.Secret:
    return secret_pb2.Secret(name=name, tls_certificate=common_pb2.TlsCertificate(
        certificate_chain=base_pb2.DataSource(inline_string=pair.cert),
        private_key=base_pb2.DataSource(inline_string=pair.key)))


def _ca_secret(name: str, ca: str) -> secret_pb2.Secret:
    return secret_pb2.Secret(name=name, validation_context=common_pb2.CertificateValidationContext(
        trusted_ca=base_pb2.DataSource(inline_string=ca)))


def _downstream(lst: ListenerIR, index: int) -> tls_pb2.DownstreamTlsContext:
    assert lst.tls is not None
    spec = lst.tls.spec
    ctx = tls_pb2.DownstreamTlsContext()
    common = ctx.common_tls_context
    common.tls_params.tls_minimum_protocol_version = _VERSIONS[spec.min_version]
    common.alpn_protocols.extend(["h2", "http/1.1"])
    common.tls_certificate_sds_secret_configs.append(_sds(cert_secret_name(lst.name, index)))
    if spec.client_validation is not None:
        common.validation_context_sds_secret_config.CopyFrom(_sds(ca_secret_name(lst.name)))
        ctx.require_client_certificate.value = spec.client_validation.mode == "require"
    return ctx


def https_listener(out: listener_pb2.Listener, lst: ListenerIR) -> None:
    """Turn ``out`` (one plain filter chain) into the HTTPS listener of ``lst``: a chain per
    certificate matched by SNI, the first certificate's chain as the default, the client
    certificate header sanitised (or set from the verified certificate)."""
    assert lst.tls is not None
    pairs = lst.tls.material.certificates
    if not pairs:
        raise CompileError(f"{lst.origin}: listener {lst.name!r} has no resolved certificate")
    plain = out.filter_chains[0].filters[0]
    manager = hcm.HttpConnectionManager()
    plain.typed_config.Unpack(manager)
    if lst.tls.spec.forward_client_cert:
        manager.forward_client_cert_details = hcm.HttpConnectionManager.SANITIZE_SET
        details = manager.set_current_client_cert_details
        details.subject.value = True
        details.uri = details.dns = True
    else:  # the default: a client's x-forwarded-client-cert never reaches the upstream
        manager.forward_client_cert_details = hcm.HttpConnectionManager.SANITIZE
    http = listener_components_pb2.Filter(name=plain.name, typed_config=pack(manager))

    def chain(index: int) -> listener_components_pb2.FilterChain:
        return listener_components_pb2.FilterChain(
            name=f"{lst.name}/tls-{index}", filters=[http], transport_socket=_socket(_downstream(lst, index)))

    out.ClearField("filter_chains")
    for i, pair in enumerate(pairs):
        if pair.dns_names:
            found = chain(i)
            found.filter_chain_match.server_names.extend(pair.dns_names)
            out.filter_chains.append(found)
    out.default_filter_chain.CopyFrom(chain(0))
    out.default_filter_chain.name = f"{lst.name}/tls-default"
    out.listener_filters.add(name="envoy.filters.listener.tls_inspector",
                             typed_config=pack(tls_inspector_pb2.TlsInspector()))


def listener_secrets(lst: ListenerIR) -> list[secret_pb2.Secret]:
    if lst.tls is None:
        return []
    out = [_cert_secret(cert_secret_name(lst.name, i), p) for i, p in enumerate(lst.tls.material.certificates)]
    if lst.tls.material.ca is not None:
        out.append(_ca_secret(ca_secret_name(lst.name), lst.tls.material.ca))
    return out


def redirect_routes(out: route_pb2.RouteConfiguration, port: int) -> route_pb2.RouteConfiguration:
    """Every host and path answered with a 301 to the same host and path over https on ``port``."""
    vhost = out.virtual_hosts.add(name="redirect-to-https", domains=["*"])
    vhost.routes.add(name=REDIRECT_ROUTE, match=rc.RouteMatch(prefix="/"), redirect=rc.RedirectAction(
        https_redirect=True, port_redirect=port, response_code=rc.RedirectAction.MOVED_PERMANENTLY))
    return out


def upstream_socket(c: ClusterIR) -> base_pb2.TransportSocket:
    """The endpoints' certificate verified (the Backend's CA over SDS, else the system store) and
    required to name the SNI; with a client certificate, mTLS. An IP address instead of a name is
    sent as no SNI and checked as an IP SAN."""
    sni = c.sni or c.endpoints[0][0]
    ip = _is_ip(sni)
    ctx = tls_pb2.UpstreamTlsContext(sni="" if ip else sni)
    common = ctx.common_tls_context
    san_type = common_pb2.SubjectAltNameMatcher.IP_ADDRESS if ip else common_pb2.SubjectAltNameMatcher.DNS
    names = common_pb2.SubjectAltNameMatcher(san_type=san_type, matcher=string_pb2.StringMatcher(exact=sni))
    material = c.tls_material
    if material is not None and material.ca is not None:
        combined = common.combined_validation_context
        combined.default_validation_context.match_typed_subject_alt_names.append(names)
        combined.validation_context_sds_secret_config.CopyFrom(_sds(ca_secret_name(_backend_owner(c))))
    else:
        common.validation_context.trusted_ca.filename = SYSTEM_TRUST
        common.validation_context.match_typed_subject_alt_names.append(names)
    if material is not None and material.certificates:
        common.tls_certificate_sds_secret_configs.append(_sds(cert_secret_name(_backend_owner(c))))
    if c.static_client_cert is not None:  # no sds_config: the bootstrap's static secret
        common.tls_certificate_sds_secret_configs.add(name=c.static_client_cert)
    return _socket(ctx)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def cluster_secrets(c: ClusterIR) -> list[secret_pb2.Secret]:
    material = c.tls_material
    if material is None:
        return []
    owner = _backend_owner(c)
    out = [_cert_secret(cert_secret_name(owner), p) for p in material.certificates]
    if material.ca is not None:
        out.append(_ca_secret(ca_secret_name(owner), material.ca))
    return out
