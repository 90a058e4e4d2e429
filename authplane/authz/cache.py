"""The decision cache: short-lived entries keyed by everything a decision depends on.

The key is a BLAKE2b digest of the table version, the policy, the front-end (gRPC, HTTP, forward
auth), method, path (with the query and host when a sign-in redirect can carry the URL), the
credential headers (Authorization, Cookie, the API key header), the verified JWT payload, every
header the policy's rules read and, when a rule reads it, the source address. Two users never
share an entry, and the cache holds no credential in the clear.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable
from typing import Any

from authplane.authz.evaluate import Request
from authplane.authz.rules import CompiledPolicy

_RAW = functools.partial(str.encode, errors="surrogateescape")
"""aiohttp keeps request bytes that are not UTF-8 as surrogates: hash them as the bytes they were."""


def cache_key(version: str, pol: CompiledPolicy, req: Request, tag: str) -> bytes:
    try:
        return _key(version, pol, req, tag, str.encode)
    except UnicodeEncodeError:
        return _key(version, pol, req, tag, _RAW)


def _key(version: str, pol: CompiledPolicy, req: Request, tag: str, enc: Callable[[str], bytes]) -> bytes:
    h = hashlib.blake2b(digest_size=20)
    path = f"{req.scheme}://{req.host}{req.path}" if pol.uses_url else req.bare_path
    h.update(enc(f"{version}\0{pol.name}\0{tag}\0{req.method}\0{path}\0"))
    if pol.uses_source:
        h.update(enc(f"src\0{req.source}\0"))
    for name in pol.key_headers:
        value = req.headers.get(name)
        h.update(b"\1" if value is None else enc(f"\2{value}\0"))
    h.update(b"jwt\0" + req.claims_raw)
    return h.digest()


class TtlCache:
    """A bounded dict of (expiry, value); when full, the oldest entry goes first."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._data: dict[bytes, tuple[float, Any]] = {}

    def get(self, key: bytes) -> Any:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            self._data.pop(key, None)
            return None
        return entry[1]

    def put(self, key: bytes, value: Any, ttl: float) -> None:
        if ttl <= 0 or self.max_entries <= 0:
            return
        if len(self._data) >= self.max_entries:
            self._data.pop(next(iter(self._data)), None)
        self._data[key] = (time.monotonic() + ttl, value)

    def clear(self) -> None:
        self._data = {}

    def __len__(self) -> int:
        return len(self._data)
