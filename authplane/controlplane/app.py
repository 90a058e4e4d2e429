"""``authplane serve``: asyncio components around one policy store and one snapshot cache.

    cp = ControlPlane(ServeConfig("policies"))
    cp.add_component(decision_service, registry=..., on_revision=...)  # more servers plug in here
    cp.load()                       # start-up load: PolicyError if the directory is invalid
    asyncio.run(cp.serve_forever()) # until SIGINT/SIGTERM

Components start in the order added (xDS, admin, then added ones, the watcher last) and stop in
reverse. An ``on_revision`` hook sees each good revision before Envoys are sent its snapshots.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import tempfile
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from authplane.compiler.ir import CompileOptions
from authplane.compiler.render import SECTION
from authplane.controlplane.admin import AdminServer
from authplane.controlplane.ads import XdsServer
from authplane.controlplane.cache import SnapshotCache
from authplane.controlplane.decisions import MAX_QUEUE, DecisionLog
from authplane.controlplane.metrics import DecisionMetrics, Metrics
from authplane.controlplane.store import PolicyStore, Revision, RevisionHook
from authplane.controlplane.tls import peer_fleets
from authplane.controlplane.tracker import Tracker, iso
from authplane.controlplane.watch import PolicyWatcher
from authplane.errors import CompileError, PolicyError

log = logging.getLogger("authplane")


class Component(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class ServeConfig:
    directory: str = "policies"
    options: CompileOptions = field(default_factory=CompileOptions)
    xds: str = "127.0.0.1:18000"
    admin: str = "127.0.0.1:9100"
    address_file: str | None = None
    """Written (JSON: xds, admin) once listening: how to find OS-chosen ports (port 0)."""
    watch: bool = True
    decision_log: str | None = None
    """``--decision-log PATH`` (``-``: stdout): Envoys report decisions over the xDS connection
    (``options.decision_log_cluster`` must name the bootstrap's xDS cluster)."""
    decision_log_queue: int = MAX_QUEUE
    """Entries waiting for a slow decision-log writer; more are dropped and counted."""


class ControlPlane:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.cache = SnapshotCache()
        self.tracker = Tracker(self.cache, self.metrics)
        self.store = PolicyStore(config.directory, config.options, self.metrics, self._publish)
        self.xds = XdsServer(config.xds, self.cache, self.tracker)
        self.admin = AdminServer(config.admin, self.status, [self.metrics.registry], self.ready)
        self.watcher = PolicyWatcher(self.store)
        self.components: list[Component] = [self.xds, self.admin]
        self._started: list[Component] = []
        self.decisions: DecisionLog | None = None
        if config.decision_log is not None:
            self.decisions = DecisionLog(config.decision_log, DecisionMetrics(self.metrics.registry), config.options,
                                         config.decision_log_queue)
            self.xds.services.append(self.decisions.register)
            self.decisions.permitted = self._permitted_fleets
            self.add_component(self.decisions, on_revision=self.decisions.on_revision)

    def _permitted_fleets(self, context: Any) -> frozenset[str] | None:
        return peer_fleets(context) if self.xds.service.fleets_from_certificates else None

    def add_component(self, component: Component, registry: CollectorRegistry | None = None,
                      on_revision: RevisionHook | None = None) -> None:
        """Plug in another server sharing the store (for instance the decision service). Call
        before ``load``: ``on_revision`` then sees the start-up revision too."""
        self.components.append(component)
        if registry is not None:
            self.admin.registries.append(registry)
        if on_revision is not None:
            self.store.add_hook(on_revision)

    def _publish(self, rev: Revision) -> None:
        self.cache.set_snapshots(rev.snapshots)

    def load(self, allow_empty: bool = False) -> None:
        """The start-up load. Without ``allow_empty`` an invalid directory raises PolicyError
        (or CompileError); with it, nothing is served until the directory becomes valid: streams
        get no response (an Envoy keeps the config it has) and ``/readyz`` answers 503."""
        try:
            self.store.load()
        except (PolicyError, CompileError) as e:
            if not allow_empty:
                raise
            self.store.start_empty(e)

    async def start(self) -> None:
        components = [*self.components, self.watcher] if self.config.watch else self.components
        try:
            for component in components:
                await component.start()
                self._started.append(component)
        except BaseException:
            await self.stop()
            raise
        if self.config.address_file:
            addresses = {"xds": self.xds.address, "admin": self.admin.address}
            for component in self.components:
                addresses.update(getattr(component, "addresses", dict)())
            write_atomic(self.config.address_file, json.dumps(addresses))

    def ready(self) -> bool:
        """A valid revision is served (``/readyz``); false while ``--allow-empty`` waits for one."""
        return self.cache.ready

    async def stop(self) -> None:
        self.store.abandon()  # a reload in progress must not hold the watcher (and the process) up
        while self._started:
            component = self._started.pop()
            try:
                await component.stop()
            except Exception:
                log.exception("stopping %s failed", type(component).__name__)

    async def serve_forever(self) -> int:
        """Serve until SIGINT or SIGTERM, then close every stream and server; returns 0 (a
        requested stop is a clean exit, even mid-reload: the reload is dropped)."""
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        try:
            await self.start()
            await stopping.wait()
            log.info("stopping: closing %d xDS streams", len(self.xds.service.streams))
        finally:
            await self.stop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        return 0

    async def status(self) -> dict[str, Any]:
        """The ``/status`` document."""
        await self.store.refresh_git()
        rev, error = self.store.current, self.store.last_error
        return {
            "policy_dir": self.config.directory,
            "xds": self.xds.address,
            "git": self.store.git,
            "last_reload_at": iso(rev.loaded_at) if self.store.reloads else None,
            "last_reload_error": None if error is None else {
                "at": iso(error.at), "problems": error.lines(),
                "entries": [vars(p) for p in error.problems]},
            "reload_history": self.store.history_status(),
            "fleets": {f: {"version": s.version, "resources": {SECTION[t]: len(s.resources[t]) for t in SECTION}}
                       for f, s in rev.snapshots.items()},
            "nodes": self.tracker.status(),
            "refused": self.tracker.refused_status(),
            **({"shadow": self.decisions.status()} if self.decisions is not None else {}),
        }


def write_atomic(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".authplane-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)

