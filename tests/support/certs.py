"""Test certificates minted with ``cryptography``: a CA issuing server and client certificates.

``python -m tests.support.certs`` writes the committed set under tests/testdata/tls/ (used by the
golden cases ``https-*``; valid for a century so the goldens never expire). The Envoy tests mint
their own, with short lifetimes, into a temporary directory.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TESTDATA = os.path.join(os.path.dirname(__file__), "..", "testdata", "tls")


@dataclass
class Issued:
    cert: str
    key: str


def write_replacing(path: str, data: bytes) -> None:
    """Write ``path`` atomically (a temporary file renamed over it), as a rotation tool would."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.new")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def san(name: str) -> x509.GeneralName:
    """``spiffe://...`` → a URI SAN, an IP address → an IP SAN, else a DNS SAN."""
    if "://" in name:
        return x509.UniformResourceIdentifier(name)
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


class CA:
    """A certificate authority writing PEM files into ``directory``."""

    def __init__(self, directory: str, name: str, days: float = 1.0) -> None:
        self.directory, self.name, self.days = directory, name, days
        os.makedirs(directory, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (self._builder(self.subject, self.key.public_key(), self.days)
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.path = os.path.join(directory, f"{name}.crt")
        with open(self.path, "wb") as f:
            f.write(self.cert.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey, days: float,
                 not_before: datetime.datetime | None = None) -> x509.CertificateBuilder:
        start = not_before or datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(self.subject)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days)))

    def issue(self, name: str, sans: list[str], days: float | None = None, client: bool = False,
              expired: bool = False) -> Issued:
        """``name``.crt and ``name``.key for ``sans`` (written atomically: rotation in place)."""
        key = ec.generate_private_key(ec.SECP256R1())
        start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3 if expired else 0, minutes=5)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        cert = (self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key.public_key(),
                              1 if expired else days or self.days, start)
                .add_extension(x509.SubjectAlternativeName([san(s) for s in sans]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(self.key, hashes.SHA256()))
        issued = Issued(os.path.join(self.directory, f"{name}.crt"), os.path.join(self.directory, f"{name}.key"))
        write_replacing(issued.cert, cert.public_bytes(serialization.Encoding.PEM))
        write_replacing(issued.key, _pem_key(key))
        return issued


def fingerprint(pem: bytes | str) -> str:
    """SHA-256 of a PEM (or DER) certificate, hex: which certificate a server presented."""
    data = pem.encode() if isinstance(pem, str) else pem
    cert = (x509.load_pem_x509_certificate(data) if data.startswith(b"-----")
            else x509.load_der_x509_certificate(data))
    return cert.fingerprint(hashes.SHA256()).hex()


def main() -> None:
    """The committed set of tests/testdata/tls (regenerating it changes the golden outputs)."""
    century = 36525.0
    edge = CA(TESTDATA, "edge-ca", century)
    edge.issue("edge", ["edge.example.com", "www.example.com"])
    edge.issue("api", ["api.example.com", "*.api.example.com"])
    clients = CA(TESTDATA, "clients-ca", century)
    clients.issue("backend-client", ["spiffe://corp.example/gateway/edge"], client=True)


if __name__ == "__main__":
    main()
