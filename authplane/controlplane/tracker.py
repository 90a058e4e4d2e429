"""Per-node status (which Envoy runs which version, what it rejected) and xDS metrics.

The ``Callbacks`` implementation of ``serve``. State that streams already hold (acked versions,
active rejections) is read from the newest stream of each node when ``/status`` is asked for.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from authplane.controlplane.cache import SnapshotCache
from authplane.controlplane.callbacks import Callbacks
from authplane.controlplane.metrics import Metrics, type_label
from authplane.controlplane.stream import Rejection, Sent, Stream

log = logging.getLogger("authplane.xds")

MAX_NODES = 20_000
"""Disconnected nodes are forgotten, oldest first, beyond this many known nodes."""


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


@dataclass(eq=False)
class Node:
    stream: Stream
    """The newest stream of this node (kept after it closes, for its last known state)."""
    streams: int = 0
    disconnected_at: float | None = None
    last_rejection: Rejection | None = None


def rejection_dict(rej: Rejection, active: bool) -> dict[str, Any]:
    return {
        "type": type_label(rej.type_url),
        "version": rej.sent.version,
        "at": iso(rej.at),
        "active": active,
        "resources": sorted(rej.names),
        "sources": rej.sources(),
        "error_detail": rej.error,
    }


class Tracker(Callbacks):
    def __init__(self, cache: SnapshotCache, metrics: Metrics) -> None:
        self.cache = cache
        self.metrics = metrics
        self.nodes: dict[str, Node] = {}

    # -- callbacks -------------------------------------------------------------------------

    def stream_opened(self, stream: Stream) -> None:
        node = self.nodes.pop(stream.node_id, None)
        if node is None:
            node = Node(stream)
        node.stream, node.disconnected_at = stream, None
        node.streams += 1
        self.nodes[stream.node_id] = node  # most recently connected last
        self.metrics.streams.labels(stream.protocol).inc()
        log.info("node %r (fleet %r) connected over %s ADS from %s", stream.node_id, stream.fleet,
                 stream.protocol, stream.peer)
        self._forget_old()

    def stream_closed(self, stream: Stream) -> None:
        self.metrics.streams.labels(stream.protocol).dec()
        node = self.nodes.get(stream.node_id)
        if node is None:
            return
        node.streams -= 1
        if node.streams <= 0:
            node.disconnected_at = time.time()
            log.info("node %r disconnected", stream.node_id)

    def request(self, stream: Stream, type_url: str) -> None:
        self.metrics.requests.labels(type_label(type_url)).inc()

    def response(self, stream: Stream, type_url: str, sent: Sent) -> None:
        self.metrics.pushes.labels(type_label(type_url)).inc()

    def ack(self, stream: Stream, type_url: str, sent: Sent) -> None:
        self.metrics.acks.labels(type_label(type_url)).inc()

    def nack(self, stream: Stream, type_url: str, sent: Sent, error: str) -> None:
        self.metrics.nacks.labels(type_label(type_url)).inc()
        rejection = stream.types[type_url].rejection
        node = self.nodes.get(stream.node_id)
        if node is not None and rejection is not None:
            node.last_rejection = rejection
        sources = "; ".join(rejection.sources()) if rejection is not None else ""
        log.warning("node %r rejected %s of version %s (keeps its previous config): %s%s", stream.node_id,
                    type_label(type_url), sent.version, error, f"; from {sources}" if sources else "")

    def _forget_old(self) -> None:
        while len(self.nodes) > MAX_NODES:
            old = next((k for k, n in self.nodes.items() if n.streams <= 0), None)
            if old is None:
                return
            del self.nodes[old]

    # -- status ----------------------------------------------------------------------------

    def node_status(self, node_id: str, node: Node) -> dict[str, Any]:
        stream = node.stream
        current = self.cache.get(stream.fleet).version
        types = {t: stream.types[t] for t in stream.ordered_types()}
        connected = node.streams > 0
        synced = bool(types) and all(ts.in_sync(current) for ts in types.values())
        rejected = any(ts.rejection is not None for ts in types.values())
        state = ("disconnected" if not connected else "rejected" if rejected else
                 "in sync" if synced else "updating")
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
            "acked": {type_label(t): ts.acked or None for t, ts in types.items()},
            "last_rejection": rejection_dict(rej, active) if rej is not None else None,
        }

    def status(self) -> list[dict[str, Any]]:
        return [self.node_status(k, self.nodes[k]) for k in sorted(self.nodes)]

