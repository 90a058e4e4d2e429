"""TLS on the ADS port: server credentials re-read when their files change, and the fleets a
client certificate names.

A fleet certificate names the fleets its Envoy may receive in URI SANs whose path ends in
``/fleet/<fleet>`` (SPIFFE style: ``spiffe://corp.example/fleet/edge``). The server's certificate,
key and client CA are checked on every new connection (a stat of each file) and, once changed and
consistent again (the key matches the certificate), used for the connections that follow; open
streams keep their session. A half-written or mismatched set is logged and the previous one kept.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger("authplane.xds")

FLEET_SEGMENT = "fleet"


@dataclass(frozen=True)
class TlsFiles:
    cert: str
    key: str
    client_ca: str | None = None
    """With it every client must present a certificate it signed (mutual TLS)."""

    def paths(self) -> tuple[str, ...]:
        return (self.cert, self.key) if self.client_ca is None else (self.cert, self.key, self.client_ca)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise OSError(f"cannot read the xDS {what} {path}: {e.strerror}") from None


def load_pems(files: TlsFiles) -> tuple[bytes, bytes, bytes | None]:
    """(certificate chain, key, client CA) as PEM; OSError with a one-line message (never the
    key's content) if a file is unreadable, not PEM, or the key does not match the certificate."""
    cert, key = _read(files.cert, "certificate"), _read(files.key, "private key")
    ca = None if files.client_ca is None else _read(files.client_ca, "client CA")
    try:
        leaf = x509.load_pem_x509_certificate(cert)
    except ValueError:
        raise OSError(f"{files.cert}: not a PEM certificate") from None
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        raise OSError(f"{files.key}: not an unencrypted PEM private key") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if (private.public_key().public_bytes(serialization.Encoding.DER, public) !=
            leaf.public_key().public_bytes(serialization.Encoding.DER, public)):
        raise OSError(f"{files.key} is not the private key of the certificate {files.cert}")
    if ca is not None:
        try:
            x509.load_pem_x509_certificates(ca)
        except ValueError:
            raise OSError(f"{files.client_ca}: not a PEM certificate bundle") from None
    return cert, key, ca


def _stamp(paths: Iterable[str]) -> tuple[tuple[int, int, int], ...]:
    stamps = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            stamps.append((0, 0, 0))
        else:
            stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(stamps)


class ServerCredentials:
    """``grpc.dynamic_ssl_server_credentials`` over ``files``: gRPC asks ``fetch`` on each new
    connection; it answers a new configuration only when the files changed and load cleanly."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._stamp = _stamp(files.paths())
        self.rotations = 0
        initial = self._configuration(*load_pems(files))  # OSError: serve does not start
        self.credentials = grpc.dynamic_ssl_server_credentials(
            initial, self.fetch, require_client_authentication=files.client_ca is not None)

    def _configuration(self, cert: bytes, key: bytes, ca: bytes | None) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        stamp = _stamp(self.files.paths())
        if stamp == self._stamp:
            return None
        self._stamp = stamp  # a bad set is reported once, then retried when a file changes again
        try:
            pems = load_pems(self.files)
        except OSError as e:
            log.warning("xDS TLS files changed but cannot be used (keeping the previous ones): %s", e)
            return None
        self.rotations += 1
        log.info("xDS TLS: new certificate from %s used for new connections", self.files.cert)
        return self._configuration(*pems)


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
