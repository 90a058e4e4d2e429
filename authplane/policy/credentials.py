"""Credential files the native checks read: htpasswd (``basicAuth``) and API keys (``apiKey``).

Both parsers return every entry with its line, and every bad line as a ``Problem`` located in the
credential file itself (``users.htpasswd:3:5: ...``). Messages never contain a password hash or a
key.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from authplane.errors import Problem


@dataclass(frozen=True)
class Entry:
    name: str
    """User name (htpasswd) or client name (key file)."""
    secret: str = field(repr=False)
    """``{SHA}<base64>`` (htpasswd) or the key: never shown (repr, IR dumps, logs)."""


def _lines(text: str) -> list[tuple[int, int, str]]:
    """(line number, column of the first character, stripped text) of each non-comment line."""
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            out.append((n, len(raw) - len(raw.lstrip()) + 1, line))
    return out


def parse_htpasswd(path: str, text: str) -> tuple[list[Entry], list[Problem]]:
    """``user:{SHA}<base64 of the SHA-1 digest>`` lines, the only form Envoy's basic_auth checks."""
    entries: list[Entry] = []
    problems: list[Problem] = []
    seen: set[str] = set()
    for n, col, line in _lines(text):
        user, sep, hashed = line.partition(":")
        if not sep or not user or not hashed:
            problems.append(Problem(path, n, col, "", "expected 'user:{SHA}<hash>' (htpasswd -s)"))
            continue
        where = col + len(user) + 1
        if user in seen:
            problems.append(Problem(path, n, col, "", f"user {user!r} listed twice"))
        elif not hashed.startswith("{SHA}"):
            problems.append(Problem(path, n, where, "", f"user {user!r}: unsupported password hash; Envoy's "
                                                         "basic_auth accepts only {SHA} entries (htpasswd -s)"))
        elif not _is_sha1_base64(hashed[5:]):
            problems.append(Problem(path, n, where, "", f"user {user!r}: {{SHA}} needs the base64 of a "
                                                         "20-byte SHA-1 digest (28 characters)"))
        else:
            entries.append(Entry(user, hashed))
        seen.add(user)
    if not entries and not problems:
        problems.append(Problem(path, 1, 1, "", "no users"))
    return entries, problems


def _is_sha1_base64(value: str) -> bool:
    try:
        return len(value) == 28 and len(base64.b64decode(value, validate=True)) == 20
    except (binascii.Error, ValueError):
        return False


class KeyFileError(ValueError):
    """An ``extAuth.apiKeys`` file that cannot be used; the message never contains a key."""


def _client_keys(text: str) -> list[tuple[int, int, str, str]]:
    """(line, column, client, key) of each ``client-name: key`` line; client or key is empty on a
    malformed line. Keys may be quoted."""
    out = []
    for n, col, line in _lines(text):
        client, sep, key = line.partition(":")
        client, key = client.strip(), key.strip().strip("'\"")
        out.append((n, col, client, key) if sep else (n, col, "", ""))
    return out


def parse_key_file(path: str, text: str) -> tuple[list[Entry], list[Problem]]:
    """``apiKey``: ``client-name: key`` lines; a client may have several keys, a key belongs to one
    client. Keys are compared as written by Envoy, so hashed keys are refused."""
    entries: list[Entry] = []
    problems: list[Problem] = []
    owner: dict[str, str] = {}
    for n, col, client, key in _client_keys(text):
        if not client or not key:
            problems.append(Problem(path, n, col, "", "expected 'client-name: key'"))
        elif key in owner:
            problems.append(Problem(path, n, col, "", f"client {client!r} reuses the key of client "
                                                      f"{owner[key]!r}"))
        elif key.startswith("sha256:"):
            problems.append(Problem(path, n, col, "", f"client {client!r}: hashed keys are only supported "
                                                      "by extAuth.apiKeys; Envoy's api_key_auth compares "
                                                      "keys as written"))
        else:
            owner[key] = client
            entries.append(Entry(client, key))
    if not entries and not problems:
        problems.append(Problem(path, 1, 1, "", "no keys"))
    return entries, problems


def parse_api_keys(text: str) -> dict[str, str]:
    """``extAuth.apiKeys``: ``client-name: key`` lines → {client: key}, one key per client; a key
    written ``sha256:<64 hex digits>`` is already hashed. Raises KeyFileError at the first bad line."""
    out: dict[str, str] = {}
    seen: set[str] = set()
    for n, _, name, key in _client_keys(text):
        if not name or not key:
            raise KeyFileError(f"line {n}: expected 'client-name: key'")
        if name in out:
            raise KeyFileError(f"line {n}: client {name!r} listed twice")
        if key in seen:
            raise KeyFileError(f"line {n}: client {name!r} reuses another client's key")
        if key.startswith("sha256:") and not _is_hex_digest(key[7:]):
            raise KeyFileError(f"client {name!r}: sha256: needs 64 hex digits")
        seen.add(key)
        out[name] = key
    if not out:
        raise KeyFileError("no keys")
    return out


def _is_hex_digest(value: str) -> bool:
    try:
        return len(bytes.fromhex(value)) == 32
    except ValueError:
        return False
