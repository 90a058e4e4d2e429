"""Credential files the native checks read: htpasswd (``basicAuth``) and API keys (``apiKey``).

Both parsers return every entry with its line, and every bad line as a ``Problem`` located in the
credential file itself (``users.htpasswd:3:5: ...``). Messages never contain a password hash or a
key.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass

from authplane.errors import Problem
from authplane.policy.loader import Item
from authplane.policy.model import AuthPolicy


def policy_file_path(item: Item[AuthPolicy], rel: str) -> str:
    """A file named in a policy, relative to the policy file."""
    return os.path.normpath(os.path.join(os.path.dirname(item.source.path), rel))


@dataclass(frozen=True)
class Entry:
    name: str
    """User name (htpasswd) or client name (key file)."""
    secret: str
    """``{SHA}<base64>`` (htpasswd) or the key."""


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


def parse_key_file(path: str, text: str) -> tuple[list[Entry], list[Problem]]:
    """``client-name: key`` lines; a client may have several keys, a key belongs to one client."""
    entries: list[Entry] = []
    problems: list[Problem] = []
    owner: dict[str, str] = {}
    for n, col, line in _lines(text):
        client, sep, key = line.partition(":")
        client, key = client.strip(), key.strip().strip("'\"")
        if not sep or not client or not key:
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
