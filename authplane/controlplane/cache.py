"""The snapshot cache: what each fleet is served now, and which streams to tell when it changes.

It knows nothing of the xDS protocols' flow; streams read ``PackedSnapshot`` snapshots and get
a ``snapshot_changed()`` call when their fleet's version changes.

A push reaches every stream of a fleet, most with the same subscription: each distinct response
is serialised once per snapshot (``PackedSnapshot.delta_body`` / ``sotw_body``) and its bytes are
shared by every stream that sends it, each appending only its own nonce (``with_nonce``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import Message

from authplane.compiler.protos import pack
from authplane.compiler.resources import CLUSTER, LISTENER, TYPE_ORDER
from authplane.compiler.snapshot import Snapshot

log = logging.getLogger("authplane.xds")

WILDCARD_TYPES = frozenset({LISTENER, CLUSTER})
"""Types an Envoy receives in full (wildcard); routes and endpoints are requested by name."""

CONTROL_PLANE = base_pb2.ControlPlane(identifier="authplane")

MAX_BODIES = 256
MAX_BODY_BYTES = 64 * 1024 * 1024
"""Bounds on the serialised responses one snapshot keeps (clients with unusual subscriptions
get theirs serialised per stream beyond them, never an unbounded cache)."""

_DELTA_NONCE = discovery_pb2.DeltaDiscoveryResponse.DESCRIPTOR.fields_by_name["nonce"].number
_SOTW_NONCE = discovery_pb2.DiscoveryResponse.DESCRIPTOR.fields_by_name["nonce"].number
assert _DELTA_NONCE == _SOTW_NONCE  # one tag for both: field 5, length-delimited
_NONCE_TAG = bytes([_DELTA_NONCE << 3 | 2])


def with_nonce(body: bytes, nonce: str) -> bytes:
    """A serialised response with its ``nonce`` field appended: protobuf fields may come in any
    order, so this parses as the response with that nonce set (nonces are short: one length byte
    up to 127 bytes)."""
    raw = nonce.encode()
    if len(raw) > 127:
        raise ValueError("nonce over 127 bytes")
    return body + _NONCE_TAG + bytes([len(raw)]) + raw


class _Bodies:
    """One snapshot's serialised responses, bounded by ``MAX_BODIES`` and ``MAX_BODY_BYTES``."""

    def __init__(self) -> None:
        self.found: dict[tuple[object, ...], bytes] = {}
        self.size = 0

    def keep(self, key: tuple[object, ...], body: bytes) -> None:
        if len(self.found) < MAX_BODIES and self.size + len(body) <= MAX_BODY_BYTES:
            self.found[key] = body
            self.size += len(body)


@dataclass(frozen=True)
class PackedSnapshot:
    """A snapshot whose resources are packed once and shared by every stream of the fleet."""

    snapshot: Snapshot
    resources: dict[str, dict[str, discovery_pb2.Resource]]
    """type URL → name → Delta ``Resource`` (its ``resource`` field is the SotW ``Any``)."""
    keys: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    """type URL → (name, resource version) of every resource: what a wildcard stream has."""
    _bodies: _Bodies = field(default_factory=lambda: _Bodies(), repr=False, compare=False)
    unchanged_since: tuple[str, frozenset[str]] = ("", frozenset())
    """(the version this snapshot replaced, the types whose resources that one had alike):
    computed once per fleet and change, so a stream synced to the previous version skips those
    types without comparing anything itself (``DeltaStream.respond``)."""

    def _shared(self, type_url: str, key: tuple[object, ...],
                build: Callable[[dict[str, discovery_pb2.Resource]], Message]) -> bytes:
        """The serialised response ``key`` names, built by ``build`` from the type's resources the
        first time a stream needs it."""
        body = self._bodies.found.get(key)
        if body is None:
            body = build(self.resources.get(type_url, {})).SerializeToString(deterministic=True)
            self._bodies.keep(key, body)
        return body

    def delta_body(self, type_url: str, send: tuple[str, ...], removed: tuple[str, ...]) -> bytes:
        """The serialised ``DeltaDiscoveryResponse`` carrying ``send`` and ``removed``, no nonce."""
        return self._shared(type_url, ("delta", type_url, send, removed), lambda current: (
            discovery_pb2.DeltaDiscoveryResponse(
                system_version_info=self.version, type_url=type_url, control_plane=CONTROL_PLANE,
                resources=[current[name] for name in send], removed_resources=removed)))

    def sotw_body(self, type_url: str, names: tuple[str, ...]) -> bytes:
        """The serialised ``DiscoveryResponse`` carrying ``names``, no nonce."""
        return self._shared(type_url, ("sotw", type_url, names), lambda current: discovery_pb2.DiscoveryResponse(
            version_info=self.version, type_url=type_url, control_plane=CONTROL_PLANE,
            resources=[current[name].resource for name in names]))

    @property
    def version(self) -> str:
        return self.snapshot.version

    @property
    def fleet(self) -> str:
        return self.snapshot.fleet

    def versions(self, type_url: str) -> dict[str, str]:
        return self.snapshot.resource_versions.get(type_url, {})

    def unchanged(self, type_url: str, since: PackedSnapshot | None) -> bool:
        """Whether this snapshot's resources of ``type_url`` are those ``since`` had (known for
        the snapshot it replaced only)."""
        return since is not None and since.version == self.unchanged_since[0] and type_url in self.unchanged_since[1]

    @classmethod
    def of(cls, snap: Snapshot, previous: PackedSnapshot | None = None) -> PackedSnapshot:
        resources: dict[str, dict[str, discovery_pb2.Resource]] = {}
        keys: dict[str, tuple[tuple[str, str], ...]] = {}
        for type_url in TYPE_ORDER:
            versions = snap.resource_versions[type_url]
            resources[type_url] = {
                name: discovery_pb2.Resource(name=name, version=versions[name], resource=pack(msg))
                for name, msg in snap.resources[type_url].items()}
            keys[type_url] = tuple((name, versions[name]) for name in resources[type_url])
        if previous is None:
            return cls(snap, resources, keys)
        alike = frozenset(t for t in snap.resource_versions if previous.versions(t) == snap.resource_versions[t])
        return cls(snap, resources, keys, unchanged_since=(previous.version, alike))


class Watcher(Protocol):
    def snapshot_changed(self) -> None:
        """Called on the event loop when the watched fleet's snapshot version changes."""


class SnapshotCache:
    """Fleet → ``PackedSnapshot`` snapshot. An Envoy of an unknown fleet is served an empty one, but
    only once a valid revision exists: until ``ready``, streams answer nothing, so an Envoy keeps
    whatever it runs (a restart with a broken directory must not wipe the fleet)."""

    def __init__(self) -> None:
        self.ready = False
        self._fleets: dict[str, PackedSnapshot] = {}
        self._empty: dict[str, PackedSnapshot] = {}
        self._watchers: dict[str, set[Watcher]] = defaultdict(set)

    def get(self, fleet: str) -> PackedSnapshot:
        found = self._fleets.get(fleet)
        if found is not None:
            return found
        if fleet not in self._empty:
            self._empty[fleet] = PackedSnapshot.of(Snapshot.empty(fleet))
        return self._empty[fleet]

    def known(self, fleet: str) -> bool:
        return fleet in self._fleets

    def fleets(self) -> dict[str, PackedSnapshot]:
        return dict(self._fleets)

    def set_snapshots(self, snapshots: dict[str, Snapshot]) -> list[str]:
        """Swap in a whole set of fleet snapshots; returns the fleets whose version changed."""
        changed: list[str] = []
        fleets: dict[str, PackedSnapshot] = {}
        for fleet, snap in snapshots.items():
            old = self._fleets.get(fleet)
            fleets[fleet] = old if old is not None and old.version == snap.version else PackedSnapshot.of(snap, old)
        for fleet in sorted(set(self._fleets) | set(fleets)):
            before = self._fleets.get(fleet)
            after = fleets.get(fleet)
            if before is None or after is None or before.version != after.version:
                changed.append(fleet)
        self._fleets = fleets
        self._empty = {}
        notify = changed if self.ready else sorted(set(changed) | set(self._watchers))
        self.ready = True  # the first valid revision: every waiting stream answers now
        for fleet in notify:
            for watcher in list(self._watchers.get(fleet, ())):
                watcher.snapshot_changed()
        return changed

    def watch(self, fleet: str, watcher: Watcher) -> None:
        self._watchers[fleet].add(watcher)

    def cancel(self, fleet: str, watcher: Watcher) -> None:
        watchers = self._watchers.get(fleet)
        if watchers is not None:
            watchers.discard(watcher)
            if not watchers:
                del self._watchers[fleet]

    def watcher_count(self) -> int:
        return sum(len(w) for w in self._watchers.values())
