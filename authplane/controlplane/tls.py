"""TLS on the ADS port: server credentials re-read when their files change, and the fleets a
client certificate names.

A fleet certificate names the fleets its Envoy may receive in URI SANs whose path ends in
``/fleet/<fleet>`` (SPIFFE style: ``spiffe://corp.example/fleet/edge``). The server's certificate,
key and client CA are checked on every new connection (a stat of each file) and, once changed and
consistent again (the key matches the certificate), used for the connections that follow; open
streams keep their session. A half-written or mismatched set is logged and the previous one kept
(``policy/tlsfiles.py``, shared with the decision service's TLS).
"""

from __future__ import annotations

import urllib.parse

import grpc
from cryptography import x509

from authplane.policy.tlsfiles import ServerCredentials, TlsFiles, load_pems

__all__ = ["FLEET_SEGMENT", "ServerCredentials", "TlsFiles", "certificate_fleets", "load_pems", "peer_fleets"]

FLEET_SEGMENT = "fleet"


def certificate_fleets(cert: x509.Certificate) -> frozenset[str]:
    """The fleets a client certificate names: the last segment of URI SANs ``…/fleet/<fleet>``."""
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        return frozenset()
    fleets = set()
    for uri in uris:
        segments = urllib.parse.urlsplit(uri).path.split("/")
        if len(segments) >= 3 and segments[-2] == FLEET_SEGMENT and segments[-1]:
            fleets.add(urllib.parse.unquote(segments[-1]))
    return frozenset(fleets)


def peer_fleets(context: grpc.aio.ServicerContext) -> frozenset[str]:
    """The fleets the client certificate of this call names (none without a certificate)."""
    pems = (context.auth_context() or {}).get("x509_pem_cert") or []
    if not pems:
        return frozenset()
    try:
        return certificate_fleets(x509.load_pem_x509_certificate(pems[0]))
    except ValueError:
        return frozenset()
