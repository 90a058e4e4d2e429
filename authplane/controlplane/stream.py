"""What SotW and Delta ADS streams share: per-type state, nonces, ACK/NACK, flow control.

One coroutine per stream handles the requests Envoy sends (in order) and the "snapshot changed"
signals of the cache (several count as one), so a stream's state is never touched concurrently.
Flow control follows go-control-plane: a type gets a response only while a request of that type
is waiting for one (the first request, or the ACK/NACK of the previous response); a change that
arrives meanwhile is sent when the ACK comes. Unlike go-control-plane, content Envoy rejected is
never sent again to that stream: only a snapshot whose content differs triggers a new response.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import grpc

from authplane.compiler.resources import TYPE_ORDER
from authplane.controlplane.cache import PackedSnapshot, SnapshotCache

log = logging.getLogger("authplane.xds")

MAX_ERROR_DETAIL = 4096
"""Envoy's error_detail is kept for status up to this many characters."""

MAX_QUEUED = 16
"""Requests read ahead of the stream's handling."""

# Bounds on what one client may make the server keep; beyond them the stream is refused.
MAX_ID = 256
"""Characters of ``node.id`` and ``node.cluster`` (the fleet)."""
MAX_TYPES = 16
"""Resource types on one stream (Envoy uses at most six)."""
MAX_TYPE_URL = 256
MAX_NAMES = 20_000
"""Resource names in one request, and subscribed names of one type on one stream."""
MAX_NAME = 1024
"""Characters of one resource name."""
_stream_ids = itertools.count(1)


class Refused(Exception):
    """The client exceeded a bound (``reason`` "limit") or asked for a fleet its certificate does
    not name ("fleet"): its stream ends with this gRPC status (the server goes on)."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "limit") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


def check_names(names: Any, what: str) -> None:
    """Refuse a request naming more than ``MAX_NAMES`` resources or an over-long name."""
    if not names:
        return
    if len(names) > MAX_NAMES:
        raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"{len(names)} names in {what}: at most {MAX_NAMES} per request")
    if any(len(n) > MAX_NAME for n in names):
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"a name in {what} is over {MAX_NAME} characters")


@dataclass(eq=False)
class Sent:
    """One response: what it carried, so an ACK or NACK can be traced back to policy sources."""

    nonce: str
    packed: PackedSnapshot
    names: tuple[str, ...]
    removed: tuple[str, ...] = ()
    key: tuple[tuple[str, str], ...] = ()
    """SotW: (name, resource version) of everything sent, to tell whether content changed."""
    at: float = field(default_factory=time.time)

    @property
    def version(self) -> str:
        return self.packed.version


@dataclass(eq=False)
class Rejection:
    """Envoy's NACK of ``sent``; ``names`` are the resources it still runs an older version of."""

    type_url: str
    sent: Sent
    error: str
    names: set[str]
    at: float = field(default_factory=time.time)

    def sources(self) -> list[str]:
        """The policy objects (``Kind 'name' (path:line:col)``) behind the rejected resources."""
        origins = self.sent.packed.snapshot.origins
        found = (str(o) for name in sorted(self.names) for o in origins.get((self.type_url, name), ()))
        return list(dict.fromkeys(found))


@dataclass(eq=False, slots=True)
class TypeState:
    """One resource type on one stream (slots: several per stream, thousands of streams)."""

    responded: bool = False
    waiting: bool = False
    """A request of this type is waiting for a response (flow control)."""
    inflight: dict[str, Sent] = field(default_factory=dict)
    """Responses not yet ACKed or NACKed, oldest first."""
    last: Sent | None = None
    acked: str = ""
    """The snapshot version whose content Envoy runs for this type."""
    rejection: Rejection | None = None
    # SotW: the names of the last request
    names: frozenset[str] = frozenset()
    # Delta: the subscription and what the client has (name → resource version, "" = does not exist)
    started: bool = False
    wildcard: bool = False
    subscribed: set[str] = field(default_factory=set)
    known: dict[str, str] = field(default_factory=dict)
    synced: PackedSnapshot | None = None
    """Delta: the snapshot whose resources of this type the client has, for the subscription as
    it is (None once the subscription changes)."""

    def in_sync(self, version: str) -> bool:
        return self.acked == version and not self.inflight and self.rejection is None


class Callbacks:
    """The one hook into stream events (go-control-plane's ``Callbacks``), declared beside the code
    that calls it: status and metrics (``tracker.py``) use it. Every method is called on the event
    loop and must not block; the defaults do nothing."""

    def stream_opened(self, stream: Stream) -> None:
        """The stream's first request arrived: ``stream.node_id`` and ``stream.fleet`` are known."""

    def stream_closed(self, stream: Stream) -> None:
        """The stream ended (only called for streams that were opened)."""

    def stream_refused(self, stream: Stream, reason: str, message: str) -> None:
        """The stream is ended with an error: ``reason`` "fleet" (its certificate does not name
        ``stream.fleet``; nothing was sent) or "limit" (it exceeded a bound)."""

    def request(self, stream: Stream, type_url: str) -> None:
        """Any request, including ACKs, NACKs and stale ones."""

    def response(self, stream: Stream, type_url: str, sent: Sent) -> None:
        """A response was written."""

    def ack(self, stream: Stream, type_url: str, sent: Sent) -> None:
        """Envoy accepted ``sent``."""

    def nack(self, stream: Stream, type_url: str, sent: Sent, error: str) -> None:
        """Envoy rejected ``sent`` with ``error`` (its ``error_detail.message``); it keeps the
        previous config, and the stream does not send the rejected content again."""


class Stream:
    """One ADS stream of one Envoy. Subclasses implement the protocol variant."""

    protocol: ClassVar[str]

    def __init__(self, cache: SnapshotCache, callbacks: Callbacks, peer: str = "") -> None:
        self.id = next(_stream_ids)
        self.cache = cache
        self.callbacks = callbacks
        self.peer = peer
        self.permitted: frozenset[str] | None = None
        """The fleets this client may receive (its certificate's); None: any (no client CA)."""
        self.node_id = ""
        self.fleet = ""
        self.opened_at = time.time()
        self.opened = False
        self.packed: PackedSnapshot | None = None
        self.types: dict[str, TypeState] = {}
        self._ordered: list[str] | None = None
        self._requests: asyncio.Queue[Any] = asyncio.Queue(MAX_QUEUED)
        self._waiter: asyncio.Future[None] | None = None
        """What ``serve`` awaits when idle; set by ``_wake`` (a bare future: asyncio.Event looks
        the loop up on every wait, a ``getpid`` call each on Python 3.11, per stream and push)."""
        self._changed = False
        self._closed = False
        self._nonces = itertools.count(1)
        self._write: Callable[[bytes], Awaitable[Any]] | None = None

    # -- driven by the cache and the server --------------------------------------------------

    def snapshot_changed(self) -> None:
        self._changed = True  # several changes before the stream wakes up count as one
        self._wake()

    def close(self) -> None:
        """End the stream cleanly (server shutdown): the RPC finishes with status OK."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def serve(self, requests: AsyncIterator[Any], write: Callable[[bytes], Awaitable[Any]]) -> None:
        self._write = write
        loop = asyncio.get_running_loop()
        reader = asyncio.create_task(self._read(requests))
        try:
            while not self._closed:
                if not self._requests.empty():
                    await self._handle(self._requests.get_nowait())
                elif self._changed:
                    self._changed = False
                    if self.opened:
                        await self._snapshot_changed()
                else:
                    self._waiter = loop.create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            if self.opened:
                self.cache.cancel(self.fleet, self)
                self.callbacks.stream_closed(self)
            self._release()

    def _release(self) -> None:
        """Drop what only an open stream needs: status keeps a closed stream (its acked
        versions and rejection) as a node's last known state, not its buffers and snapshots."""
        self._requests = asyncio.Queue(MAX_QUEUED)
        self.packed = None
        for ts in self.types.values():
            ts.inflight.clear()
            ts.last = None
            ts.synced = None
            ts.names = frozenset()
            ts.subscribed.clear()
            ts.known.clear()

    async def _read(self, requests: AsyncIterator[Any]) -> None:
        """Requests wait in a bounded queue: a client that sends without reading is slowed down,
        never buffered without limit."""
        try:
            async for request in requests:
                await self._requests.put(request)
                self._wake()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the client went away mid-message; nothing to answer
            log.debug("stream %d (%r): read ended: %s", self.id, self.node_id or self.peer, e)
        finally:
            self._closed = True
            self._wake()

    async def _handle(self, request: Any) -> None:
        if not self.opened:
            self._open(request.node)
        type_url = request.type_url
        if type_url not in self.types and (len(type_url) > MAX_TYPE_URL or len(self.types) >= MAX_TYPES):
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"type_url over {MAX_TYPE_URL} characters or more than {MAX_TYPES} types on one stream")
        self.callbacks.request(self, type_url)
        if not type_url:
            log.warning("node %r sent a request without type_url; ignored", self.node_id)
            return
        ts = self.types.get(type_url)
        if ts is None:
            ts = self.types[type_url] = TypeState()
            self._ordered = None
        await self.on_request(request, ts)

    def _open(self, node: Any) -> None:
        for field_name, value in (("node.id", node.id), ("node.cluster", node.cluster)):
            if len(value) > MAX_ID:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                              f"{field_name} is {len(value)} characters long: at most {MAX_ID} allowed")
        self.node_id, self.fleet = node.id, node.cluster
        if self.permitted is not None and self.fleet not in self.permitted:
            named = ", ".join(repr(f) for f in sorted(self.permitted)) or "none"
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"fleet {self.fleet!r} (node.cluster) is not one "
                          f"its client certificate names (fleets: {named})", reason="fleet")
        self.packed = self.current()
        self.cache.watch(self.fleet, self)
        self.opened = True
        if not self.cache.ready:
            log.info("node %r (fleet %r): nothing valid is loaded yet; answering once it is", self.node_id,
                     self.fleet)
        elif not self.cache.known(self.fleet):
            known = ", ".join(self.cache.fleets()) or "none"
            log.warning("node %r: unknown fleet %r (node.cluster; fleets: %s): serving an empty configuration",
                        self.node_id, self.fleet, known)
        self.callbacks.stream_opened(self)

    def current(self) -> PackedSnapshot | None:
        """The fleet's snapshot; None while no valid revision exists (nothing is answered)."""
        return self.cache.get(self.fleet) if self.cache.ready else None

    async def _snapshot_changed(self) -> None:
        self.packed = self.current()
        for type_url in self.ordered_types():
            await self.respond(type_url, self.types[type_url])

    def ordered_types(self) -> list[str]:
        """Clusters and endpoints before listeners and routes, then anything else requested
        (computed again only when a type is added: this runs for every stream on every push)."""
        if self._ordered is None or len(self._ordered) != len(self.types):
            self._ordered = ([t for t in TYPE_ORDER if t in self.types] +
                             sorted(t for t in self.types if t not in TYPE_ORDER))
        return self._ordered

    # -- shared protocol steps ---------------------------------------------------------------

    def settle(self, type_url: str, ts: TypeState, nonce: str, error: str) -> bool:
        """Record the ACK or NACK a request carries; False if it answers an older response than
        the latest one (stale: Envoy will answer the latest too, so it opens no new watch)."""
        if not nonce:
            return True
        sent = ts.inflight.get(nonce)
        if sent is not None:
            for n in list(ts.inflight):  # Envoy answers in order: older ones are settled too
                del ts.inflight[n]
                if n == nonce:
                    break
            if error:
                self._rejected(type_url, ts, sent, error)
            else:
                self._accepted(type_url, ts, sent)
        return ts.last is None or nonce == ts.last.nonce

    def _accepted(self, type_url: str, ts: TypeState, sent: Sent) -> None:
        ts.acked = sent.version
        if ts.rejection is not None:
            ts.rejection.names -= self.fixes(sent, ts.rejection.names)
            if not ts.rejection.names:
                ts.rejection = None
        self.callbacks.ack(self, type_url, sent)

    def _rejected(self, type_url: str, ts: TypeState, sent: Sent, error: str) -> None:
        error = error.strip()[:MAX_ERROR_DETAIL]
        names = {n for n in (*sent.names, *sent.removed) if n in error} or set(sent.names) | set(sent.removed)
        ts.rejection = Rejection(type_url, sent, error, names)
        self.callbacks.nack(self, type_url, sent, error)

    def fixes(self, sent: Sent, rejected: set[str]) -> set[str]:
        """The rejected names an ACK of ``sent`` resolves (Delta: those it carried)."""
        return set(sent.names) | set(sent.removed)

    def unchanged(self, ts: TypeState) -> None:
        """Nothing to send: if Envoy accepted what it has, it now runs the current version."""
        if self.packed is not None and not ts.inflight and ts.rejection is None and ts.responded:
            ts.acked = self.packed.version

    async def send(self, type_url: str, ts: TypeState, response: bytes, sent: Sent) -> None:
        """Write a serialised response (the RPC's serializer passes bytes through, ``ads.py``)."""
        ts.waiting = False
        ts.responded = True
        ts.last = sent
        ts.inflight[sent.nonce] = sent
        assert self._write is not None
        await self._write(response)
        self.callbacks.response(self, type_url, sent)

    def next_nonce(self) -> str:
        return str(next(self._nonces))

    # -- protocol variants -------------------------------------------------------------------

    async def on_request(self, request: Any, ts: TypeState) -> None:
        raise NotImplementedError

    async def respond(self, type_url: str, ts: TypeState) -> None:
        """Send what changed for this type if Envoy is waiting for it."""
        raise NotImplementedError


def error_message(request: Any) -> str:
    """A NACK's error_detail message ("" for an ACK or a first request)."""
    if not request.HasField("error_detail"):
        return ""
    return request.error_detail.message or f"rejected (code {request.error_detail.code}, no message)"
