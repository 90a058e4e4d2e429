"""PEM certificates and keys named by ``tls`` sections, checked when the policies load (resolve).

A certificate that does not parse, has expired, or does not match its key is refused here, so a
broken replacement of a served file is a rejected reload: the last good certificate keeps serving.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from authplane.policy.documents import KeyPair


class CertificateError(ValueError):
    """What is wrong with a certificate, key or CA file (the message names no key material)."""


def _public(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def certificates(text: str, what: str) -> list[x509.Certificate]:
    """Every certificate of a PEM file (at least one)."""
    try:
        found = x509.load_pem_x509_certificates(text.encode())
    except ValueError:
        raise CertificateError(f"{what} is not a PEM certificate") from None
    if not found:
        raise CertificateError(f"{what} holds no PEM certificate")
    return found


def _not_expired(cert: x509.Certificate, what: str, now: datetime.datetime) -> None:
    if cert.not_valid_after_utc <= now:
        raise CertificateError(f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")


def key_pair(cert_text: str, key_text: str, cert_name: str, key_name: str,
             now: datetime.datetime | None = None) -> KeyPair:
    """The checked pair: the leaf (first certificate) is valid now and matches the key."""
    now = now or datetime.datetime.now(datetime.UTC)
    chain = certificates(cert_text, f"certFile {cert_name!r}")
    leaf = chain[0]
    _not_expired(leaf, f"the certificate in {cert_name!r}", now)
    try:
        key = serialization.load_pem_private_key(key_text.encode(), password=None)
    except TypeError:
        raise CertificateError(f"keyFile {key_name!r} is encrypted; give an unencrypted PEM key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError(f"keyFile {key_name!r} is not a PEM private key") from None
    if _public(key.public_key()) != _public(leaf.public_key()):
        raise CertificateError(f"keyFile {key_name!r} is not the key of the certificate in {cert_name!r}")
    return KeyPair(cert_text, key_text, dns_names(leaf))


def dns_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(dict.fromkeys(n.lower() for n in sans.get_values_for_type(x509.DNSName)))


def ca_bundle(text: str, name: str, now: datetime.datetime | None = None) -> str:
    """A CA file: parses, and not every certificate in it has expired."""
    now = now or datetime.datetime.now(datetime.UTC)
    found = certificates(text, f"caFile {name!r}")
    if all(c.not_valid_after_utc <= now for c in found):
        _not_expired(found[0], f"the CA certificate in {name!r}", now)
    return text
