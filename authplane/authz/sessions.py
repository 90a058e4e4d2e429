"""The Redis session store of the decision service's sign-in (``oidc.session.store: redis``), as
oauth2-proxy's: the browser's cookie (sealed with the session keys, ``signin.seal``) carries a
ticket, a random id naming the Redis key and a random secret encrypting the value stored there
with AES-GCM. Neither the cookie alone nor a Redis dump alone is a session, and deleting the key
ends the session for every app and every decision process at once.

Redis errors become ``StoreUnavailable``: the request is answered with the configured status,
never allowed. Neither the URL nor the password is ever logged.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

log = logging.getLogger("authplane.authz")
KEY_PREFIX = "authplane:session:"
TIMEOUT = 2.0
"""Seconds a Redis connection or command may take before the store counts as unavailable."""


class StoreUnavailable(Exception):
    """Redis cannot be reached (or answered an error)."""


@dataclass(frozen=True)
class Ticket:
    id: str
    secret: bytes = field(repr=False)

    @classmethod
    def new(cls) -> Ticket:
        return cls(secrets.token_urlsafe(18), os.urandom(32))

    @classmethod
    def from_cookie(cls, data: dict[str, Any]) -> Ticket | None:
        tid, secret = data.get("t"), data.get("k")
        if not isinstance(tid, str) or not isinstance(secret, str):
            return None
        try:
            raw = base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))
        except ValueError:
            return None
        return cls(tid, raw) if len(raw) == 32 else None

    def to_cookie(self) -> dict[str, str]:
        return {"t": self.id, "k": base64.urlsafe_b64encode(self.secret).rstrip(b"=").decode()}

    @property
    def key(self) -> str:
        return KEY_PREFIX + self.id


class RedisSessions:
    """One Redis server's sessions (a connection pool bound to the running event loop)."""

    def __init__(self, url: str, password: str | None) -> None:
        self._client = aioredis.Redis.from_url(
            url, password=password, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT,
            retry=Retry(NoBackoff(), 1), health_check_interval=30)

    async def _call(self, what: str, command: Any) -> Any:
        try:
            return await command
        except (RedisError, OSError, TimeoutError) as e:
            log.warning("session store (Redis) %s failed: %s", what, type(e).__name__)
            raise StoreUnavailable(what) from None

    async def save(self, ticket: Ticket, data: dict[str, Any], ttl: int) -> None:
        nonce = os.urandom(12)
        value = nonce + AESGCM(ticket.secret).encrypt(
            nonce, json.dumps(data, separators=(",", ":")).encode(), ticket.key.encode())
        await self._call("write", self._client.set(ticket.key, value, ex=max(1, ttl)))

    async def load(self, ticket: Ticket) -> dict[str, Any] | None:
        value = await self._call("read", self._client.get(ticket.key))
        if not isinstance(value, bytes) or len(value) < 29:
            return None
        try:
            data = json.loads(AESGCM(ticket.secret).decrypt(value[:12], value[12:], ticket.key.encode()))
        except (InvalidTag, ValueError):
            return None
        return data if isinstance(data, dict) else None

    async def delete(self, ticket: Ticket) -> None:
        await self._call("delete", self._client.delete(ticket.key))

    async def lock(self, ticket: Ticket, ttl: float) -> bool:
        """Whether this process may renew the session now (no other process is renewing it)."""
        return bool(await self._call("lock", self._client.set(ticket.key + ":renew", b"1", nx=True,
                                                              px=int(ttl * 1000))))

    async def unlock(self, ticket: Ticket) -> None:
        await self._call("unlock", self._client.delete(ticket.key + ":renew"))

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()
