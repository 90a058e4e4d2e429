"""Per-node status (which Envoy runs which version, what it rejected) and xDS metrics.

The ``Callbacks`` implementation of ``serve``. State that streams already hold (acked versions,
active rejections) is read from the node's stream when ``/status`` is asked for.

One row per node id, following one stream: a node id is only a claim, so while that stream is
open a second stream with the same id (an impostor, or an Envoy whose old stream is not yet seen
closed) does not take the row over. It is listed under ``other_streams`` and its NACKs are
logged but leave the row alone; when the row's stream closes, the oldest other one takes over.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from authplane.controlplane.admin import printable
from authplane.controlplane.cache import SnapshotCache
from authplane.controlplane.metrics import Metrics, type_label, type_name
from authplane.controlplane.stream import Callbacks, Rejection, Sent, Stream

log = logging.getLogger("authplane.xds")

MAX_NODES = 20_000
"""Disconnected nodes are forgotten, oldest first, beyond this many known nodes."""
MAX_REFUSALS = 100
"""Refused (reason, node id, fleet) kept for status, the least recently refused forgotten first."""


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


@dataclass(eq=False)
class Node:
    stream: Stream
    """The stream the row follows (kept after it closes, for the node's last known state)."""
    others: list[Stream] = field(default_factory=list)
    """Other open streams claiming this id, oldest first."""
    disconnected_at: float | None = None
    last_rejection: Rejection | None = None

    @property
    def connected(self) -> bool:
        return self.disconnected_at is None


def rejection_dict(rej: Rejection, active: bool) -> dict[str, Any]:
    return {
        "type": type_name(rej.type_url),
        "version": rej.sent.version,
        "at": iso(rej.at),
        "active": active,
        "resources": sorted(rej.names),
        "sources": rej.sources(),
        "error_detail": rej.error,
    }


@dataclass(eq=False)
class Refusal:
    reason: str
    node_id: str
    fleet: str
    peer: str
    message: str
    first_at: float = field(default_factory=time.time)
    last_at: float = field(default_factory=time.time)
    count: int = 1


class Tracker(Callbacks):
    def __init__(self, cache: SnapshotCache, metrics: Metrics) -> None:
        self.cache = cache
        self.metrics = metrics
        self.nodes: dict[str, Node] = {}
        self.refusals: dict[tuple[str, str, str], Refusal] = {}
        self._children: dict[tuple[int, str], Any] = {}
        metrics.count_nodes(self.state_counts)

    # -- callbacks -------------------------------------------------------------------------

    def stream_opened(self, stream: Stream) -> None:
        self.metrics.streams.labels(stream.protocol).inc()
        node = self.nodes.pop(stream.node_id, None)
        if node is not None and node.connected:
            node.others.append(stream)
            self.nodes[stream.node_id] = node
            log.warning("node %r: a second stream (%s ADS from %s) claims this id while the one from %s is "
                        "open; status keeps following the first", stream.node_id, stream.protocol, stream.peer,
                        node.stream.peer)
            return
        if node is None:
            node = Node(stream)
        node.stream, node.disconnected_at = stream, None
        self.nodes[stream.node_id] = node  # most recently connected last
        log.info("node %r (fleet %r) connected over %s ADS from %s", stream.node_id, stream.fleet,
                 stream.protocol, stream.peer)
        self._forget_old()

    def stream_closed(self, stream: Stream) -> None:
        self.metrics.streams.labels(stream.protocol).dec()
        node = self.nodes.get(stream.node_id)
        if node is None:
            return
        if stream in node.others:
            node.others.remove(stream)
        elif stream is node.stream and node.others:
            node.stream = node.others.pop(0)
            node.last_rejection = None  # the previous stream's: this one has its own types
            log.info("node %r: stream from %s closed; status now follows the one from %s", stream.node_id,
                     stream.peer, node.stream.peer)
        elif stream is node.stream:
            node.disconnected_at = time.time()
            log.info("node %r disconnected", stream.node_id)

    def stream_refused(self, stream: Stream, reason: str, message: str) -> None:
        self.metrics.refused.labels(reason).inc()
        key = (reason, stream.node_id, stream.fleet)
        refusal = self.refusals.pop(key, None)
        if refusal is None:
            refusal = Refusal(reason, stream.node_id, stream.fleet, stream.peer, message)
        else:
            refusal.count, refusal.last_at, refusal.peer, refusal.message = (
                refusal.count + 1, time.time(), stream.peer, message)
        self.refusals[key] = refusal  # most recent last
        while len(self.refusals) > MAX_REFUSALS:
            del self.refusals[next(iter(self.refusals))]

    def _count(self, metric: Any, type_url: str) -> None:
        """``metric.labels(type).inc()`` with the labelled child looked up once per metric and
        type: these three run for every stream on every push."""
        key = (id(metric), type_label(type_url))
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(key[1])
        child.inc()

    def request(self, stream: Stream, type_url: str) -> None:
        self._count(self.metrics.requests, type_url)

    def response(self, stream: Stream, type_url: str, sent: Sent) -> None:
        self._count(self.metrics.pushes, type_url)

    def ack(self, stream: Stream, type_url: str, sent: Sent) -> None:
        self._count(self.metrics.acks, type_url)

    def nack(self, stream: Stream, type_url: str, sent: Sent, error: str) -> None:
        self.metrics.nacks.labels(type_label(type_url)).inc()
        rejection = stream.types[type_url].rejection
        node = self.nodes.get(stream.node_id)
        followed = node is not None and stream is node.stream
        if node is not None and followed and rejection is not None:
            node.last_rejection = rejection
        sources = "; ".join(rejection.sources()) if rejection is not None else ""
        log.warning("node %r%s rejected %s of version %s (keeps its previous config): %s%s", stream.node_id,
                    "" if followed else f" (another stream, from {stream.peer})", printable(type_name(type_url)),
                    sent.version, printable(error), f"; from {sources}" if sources else "")

    def _forget_old(self) -> None:
        while len(self.nodes) > MAX_NODES:
            old = next((k for k, n in self.nodes.items() if not n.connected), None)
            if old is None:
                return
            del self.nodes[old]

    # -- status ----------------------------------------------------------------------------

    def _state(self, node: Node) -> tuple[str, str | None]:
        """(state, current version) of a node, as ``/status`` and ``authplane_xds_nodes`` show it."""
        stream = node.stream
        ready = self.cache.ready
        current = self.cache.get(stream.fleet).version if ready else None
        types = [stream.types[t] for t in stream.ordered_types()]
        synced = ready and bool(types) and all(ts.in_sync(current or "") for ts in types)
        rejected = any(ts.rejection is not None for ts in types)
        state = ("disconnected" if not node.connected else "waiting" if not ready else "rejected" if rejected else
                 "in sync" if synced else "updating")
        return state, current

    def state_counts(self) -> dict[tuple[str, str], int]:
        """Nodes by (fleet, state); a fleet no Gateway names counts as "" (clients cannot add series)."""
        counts: dict[tuple[str, str], int] = {}
        for node in self.nodes.values():
            fleet = node.stream.fleet if self.cache.known(node.stream.fleet) else ""
            key = (fleet, self._state(node)[0])
            counts[key] = counts.get(key, 0) + 1
        return counts

    def node_status(self, node_id: str, node: Node) -> dict[str, Any]:
        stream = node.stream
        types = {t: stream.types[t] for t in stream.ordered_types()}
        connected = node.connected
        state, current = self._state(node)
        rej = node.last_rejection
        active = rej is not None and connected and any(ts.rejection is rej for ts in types.values())
        return {
            "id": node_id,
            "fleet": stream.fleet,
            "known_fleet": self.cache.known(stream.fleet),
            "protocol": stream.protocol,
            "peer": stream.peer,
            "connected": connected,
            "connected_since": iso(stream.opened_at),
            "disconnected_at": iso(node.disconnected_at),
            "state": state,
            "current_version": current,
            "acked": {type_name(t): ts.acked or None for t, ts in types.items()},
            "last_rejection": rejection_dict(rej, active) if rej is not None else None,
            "other_streams": [{"protocol": s.protocol, "peer": s.peer, "connected_since": iso(s.opened_at)}
                              for s in node.others],
        }

    def status(self) -> list[dict[str, Any]]:
        return [self.node_status(k, self.nodes[k]) for k in sorted(self.nodes)]

    def refused_status(self) -> list[dict[str, Any]]:
        """Refused streams, most recent first (``/status`` ``refused``)."""
        return [{"reason": r.reason, "id": r.node_id, "fleet": r.fleet, "peer": r.peer, "message": r.message,
                 "count": r.count, "first_at": iso(r.first_at), "last_at": iso(r.last_at)}
                for r in reversed(self.refusals.values())]

