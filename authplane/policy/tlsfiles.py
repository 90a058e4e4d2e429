"""A server's TLS files (certificate chain, key, optional client CA), re-read when they change:
for gRPC (``ServerCredentials``: the ADS port, the decision service) and for asyncio servers
(``ServerContext``: the decision service's HTTP port).

The files are checked on every new connection (a stat of each) and, once changed and consistent
again (the key matches the certificate), used for the connections that follow; open connections
keep their session. A half-written or mismatched set is logged once and the previous one kept.
It lives under ``policy`` (the lowest package both the control plane and the decision service
may import), next to the certificate checks of the policies' own ``tls`` files.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization


@dataclass(frozen=True)
class TlsFiles:
    cert: str
    key: str
    client_ca: str | None = None
    """With it every client must present a certificate it signed (mutual TLS)."""

    def paths(self) -> tuple[str, ...]:
        return (self.cert, self.key) if self.client_ca is None else (self.cert, self.key, self.client_ca)


Pems = tuple[bytes, bytes, bytes | None]


def _read(path: str, what: str, label: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise OSError(f"cannot read the {label} {what} {path}: {e.strerror}") from None


def load_pems(files: TlsFiles, label: str = "xDS") -> Pems:
    """(certificate chain, key, client CA) as PEM; OSError with a one-line message (never the
    key's content) if a file is unreadable, not PEM, or the key does not match the certificate.
    ``label`` names the server in messages."""
    cert, key = _read(files.cert, "certificate", label), _read(files.key, "private key", label)
    ca = None if files.client_ca is None else _read(files.client_ca, "client CA", label)
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


class _Watched:
    """The files, their last stamp and the rotations so far."""

    def __init__(self, files: TlsFiles, label: str, log: logging.Logger) -> None:
        self.files, self.label, self.log = files, label, log
        self._stamp = _stamp(files.paths())
        self.rotations = 0

    def changed(self) -> Pems | None:
        """The new PEMs if the files changed since last asked and load cleanly, else None."""
        stamp = _stamp(self.files.paths())
        if stamp == self._stamp:
            return None
        self._stamp = stamp  # a bad set is reported once, then retried when a file changes again
        try:
            pems = load_pems(self.files, self.label)
        except OSError as e:
            self.log.warning("%s TLS files changed but cannot be used (keeping the previous ones): %s", self.label, e)
            return None
        return pems

    def rotated(self) -> None:
        self.rotations += 1
        self.log.info("%s TLS: new certificate from %s used for new connections", self.label, self.files.cert)


class ServerCredentials(_Watched):
    """``grpc.dynamic_ssl_server_credentials`` over ``files``: gRPC asks ``fetch`` on each new
    connection; it answers a new configuration only when the files changed and load cleanly."""

    def __init__(self, files: TlsFiles, label: str = "xDS", log: logging.Logger | None = None) -> None:
        super().__init__(files, label, log or logging.getLogger("authplane.xds"))
        initial = self._configuration(*load_pems(files, label))  # OSError: the server does not start
        self.credentials = grpc.dynamic_ssl_server_credentials(
            initial, self.fetch, require_client_authentication=files.client_ca is not None)

    def _configuration(self, cert: bytes, key: bytes, ca: bytes | None) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        pems = self.changed()
        if pems is None:
            return None
        self.rotated()
        return self._configuration(*pems)


class ServerContext(_Watched):
    """An ``ssl.SSLContext`` for an asyncio server (``context``): its SNI callback, run in every
    handshake, checks the files and hands the connection the newest good context."""

    def __init__(self, files: TlsFiles, label: str, log: logging.Logger) -> None:
        super().__init__(files, label, log)
        load_pems(files, label)  # OSError with a clear message: the server does not start
        self.context = self._context()
        self.context.sni_callback = self._pick
        self._current = self.context

    def _context(self) -> ssl.SSLContext:
        """A context over the files as they are now (``ssl`` loads from paths; ``ssl.SSLError``
        if they changed again between the check and the load)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.files.cert, self.files.key)
        if self.files.client_ca is not None:
            ctx.load_verify_locations(cafile=self.files.client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def _pick(self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext) -> None:
        if self.changed() is not None:
            try:
                self._current = self._context()
            except ssl.SSLError as e:
                self.log.warning("%s TLS files changed but cannot be used (keeping the previous ones): %s",
                                 self.label, e.reason)
            else:
                self.rotated()
        if self._current is not self.context:
            conn.context = self._current
