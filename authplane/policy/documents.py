"""The loaded policy set: each document with where it was written, and what its files gave.

``Located`` pairs a typed document (``model.py``) with its ``Source`` (file, line, column and the
positions of its fields); ``PolicySet`` holds every document of a directory by kind and name, with
the ``Resolved`` content of the files each AuthPolicy names (the resolve stage's output).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from authplane.errors import Problem
from authplane.policy.credentials import Entry
from authplane.policy.files import DEFAULT_MAX_FILE_SIZE
from authplane.policy.model import AuthPolicy, Backend, Gateway, PolicyTest, Route
from authplane.policy.oidc import ResolvedOidc
from authplane.policy.yamlpos import Document, Path

T = TypeVar("T", Gateway, Backend, Route, AuthPolicy, PolicyTest)


@functools.lru_cache(maxsize=4096)  # every policy of a file names the same few files
def relative_to(policy_file: str, rel: str) -> str:
    """The path of a file a policy file names (JWKS, keys, secrets): relative to the policy file."""
    return os.path.normpath(os.path.join(os.path.dirname(policy_file), rel))


@dataclass(frozen=True)
class Source:
    """Where a policy object was written; ``doc`` maps field paths to positions."""

    path: str
    line: int
    col: int
    doc: Document = field(compare=False, repr=False)

    def at(self, path: Path, key: bool = False) -> tuple[int, int]:
        return self.doc.pos(path, key)

    def problem(self, path: Path, message: str, key: bool = False) -> Problem:
        line, col = self.at(path, key)
        return Problem(self.path, line, col, dotted(path), message)

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.col}"

    def relative(self, rel: str) -> str:
        """A file named in this document, relative to the document's file."""
        return relative_to(self.path, rel)


@dataclass(frozen=True)
class Located(Generic[T]):
    """One policy document: the typed resource and where it was written."""

    resource: T
    """The typed document (``Gateway``, ``Backend``, ``Route`` or ``AuthPolicy``)."""
    source: Source

    @property
    def name(self) -> str:
        return self.resource.metadata.name


@dataclass(frozen=True)
class Resolved:
    """What one AuthPolicy's referenced files and discovery gave, read once by the resolve stage
    (``resolve.py``); the compiler and the decision service read only this, never the files."""

    jwks: dict[str, str] = field(default_factory=dict)
    """``jwt`` provider name → its JWKS file's text (providers with ``jwks.file``)."""
    users: tuple[Entry, ...] = ()
    """``basicAuth``: the htpasswd file's users."""
    keys: tuple[Entry, ...] = ()
    """``apiKey``: the key file's (client, key) entries."""
    ext_keys: str | None = field(default=None, repr=False)
    """``extAuth.apiKeys``: the key file's text (the decision service hashes the keys)."""
    oidc: ResolvedOidc | None = field(default=None, repr=False)
    """``oidc``: endpoints (discovery) and secrets."""
    native_rules: bool = False
    """``extAuth.engine: auto``: the native module is here and can decide these rules, so Envoy
    decides them (looked up by the resolve stage: the compiler never looks on disk)."""
    engine_reason: str = ""
    """``extAuth.engine: auto`` decided by the decision service: why not natively."""


@dataclass(frozen=True)
class KeyPair:
    """A certificate chain and its private key, read and checked by the resolve stage."""

    cert: str
    """The PEM chain, leaf first."""
    key: str = field(repr=False)
    """The PEM private key (reaches Envoy over SDS only)."""
    dns_names: tuple[str, ...] = ()
    """The leaf's DNS SANs (the SNI names it is served for)."""


@dataclass(frozen=True)
class TlsMaterial:
    """What the files of one listener's ``tls`` or one Backend's ``tls`` gave."""

    certificates: tuple[KeyPair, ...] = ()
    """Listener: its certificates in order; Backend: the client certificate, if any."""
    ca: str | None = None
    """Listener: the client CA bundle (``clientValidation.caFile``); Backend: ``caFile``."""


@dataclass
class PolicySet:
    """Every valid object of a policy directory, in a stable order (by name)."""

    root: str
    gateways: dict[str, Located[Gateway]] = field(default_factory=dict)
    backends: dict[str, Located[Backend]] = field(default_factory=dict)
    routes: dict[str, Located[Route]] = field(default_factory=dict)
    auth_policies: dict[str, Located[AuthPolicy]] = field(default_factory=dict)
    tests: dict[str, Located[PolicyTest]] = field(default_factory=dict)
    """``PolicyTest`` documents: run by ``authplane test`` only, never compiled."""
    files: dict[str, str] = field(default_factory=dict, repr=False)
    """Other files the policies read (JWKS files ...): path → content, part of the version (never
    in a repr: secrets and private keys are among them)."""
    resolved: dict[str, Resolved] = field(default_factory=dict, repr=False)
    """AuthPolicy name → what its referenced files and OIDC discovery gave (the resolve stage)."""
    listener_tls: dict[str, TlsMaterial] = field(default_factory=dict, repr=False)
    """``<gateway>/<listener>`` → its certificates and client CA (``https`` listeners)."""
    backend_tls: dict[str, TlsMaterial] = field(default_factory=dict, repr=False)
    """Backend name → its ``tls`` files (CA, client certificate)."""
    warnings: list[Problem] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)
    """Information for ``validate`` (never failing ``--strict``): which engine ``auto`` chose."""
    broken: set[tuple[str, str]] = field(default_factory=set)
    """(kind, name) of documents that failed to load: references to them are not reported again."""
    texts: dict[str, str] = field(default_factory=dict, repr=False)
    """Policy file path → the text loaded (a reload keeps it for a file found empty)."""
    max_file_size: int = DEFAULT_MAX_FILE_SIZE

    def table(self, kind: str) -> dict[str, Located[Any]]:
        return {"Gateway": self.gateways, "Backend": self.backends, "Route": self.routes,
                "AuthPolicy": self.auth_policies, "PolicyTest": self.tests}[kind]


def dotted(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
