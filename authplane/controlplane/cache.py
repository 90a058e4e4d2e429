"""The snapshot cache: what each fleet is served now, and which streams to tell when it changes.

It knows nothing of the xDS protocols; streams read ``PackedSnapshot`` snapshots and get a
``snapshot_changed()`` call when their fleet's version changes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Protocol

from envoy.service.discovery.v3 import discovery_pb2

from authplane.compiler.protos import pack
from authplane.compiler.resources import CLUSTER, LISTENER, TYPE_ORDER
from authplane.compiler.snapshot import Snapshot

log = logging.getLogger("authplane.xds")

WILDCARD_TYPES = frozenset({LISTENER, CLUSTER})
"""Types an Envoy receives in full (wildcard); routes and endpoints are requested by name."""


@dataclass(frozen=True)
class PackedSnapshot:
    """A snapshot whose resources are packed once and shared by every stream of the fleet."""

    snapshot: Snapshot
    resources: dict[str, dict[str, discovery_pb2.Resource]]
    """type URL → name → Delta ``Resource`` (its ``resource`` field is the SotW ``Any``)."""
    keys: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    """type URL → (name, resource version) of every resource: what a wildcard stream has."""

    @property
    def version(self) -> str:
        return self.snapshot.version

    @property
    def fleet(self) -> str:
        return self.snapshot.fleet

    def versions(self, type_url: str) -> dict[str, str]:
        return self.snapshot.resource_versions.get(type_url, {})

    @classmethod
    def of(cls, snap: Snapshot) -> PackedSnapshot:
        resources: dict[str, dict[str, discovery_pb2.Resource]] = {}
        keys: dict[str, tuple[tuple[str, str], ...]] = {}
        for type_url in TYPE_ORDER:
            versions = snap.resource_versions[type_url]
            resources[type_url] = {
                name: discovery_pb2.Resource(name=name, version=versions[name], resource=pack(msg))
                for name, msg in snap.resources[type_url].items()}
            keys[type_url] = tuple((name, versions[name]) for name in resources[type_url])
        return cls(snap, resources, keys)


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
            fleets[fleet] = old if old is not None and old.version == snap.version else PackedSnapshot.of(snap)
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
