"""The decision service as a component of ``authplane serve``: in ``--authz-workers N``
processes sharing its ports (default one), or in the server's own process (``N = 0``). Either way
each policy revision's rules are swapped in before Envoys are sent that revision's configuration,
so decisions and config change together.

Out of process is the default because checks then never wait on the control plane: a reload of
a large repository holds the server's GIL and event loop for seconds (loading, compiling,
packing snapshots), while a worker only swaps in a compiled rule table. Moving only the reload to
a child process would still leave the packing, the rule-table compile and every xDS stream on the
loop the checks share."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from authplane.authz.rules import RuleTable, compile_table
from authplane.authz.service import AuthzService
from authplane.authz.workers import RestartCollector, WorkerPool, start_workers
from authplane.policy.documents import PolicySet
from authplane.policy.tlsfiles import TlsFiles


class Revision(Protocol):
    """What the decision service needs of a control-plane revision (``controlplane.store.Revision``
    has it; declared here so that the decision service does not import the control plane)."""

    @property
    def policies(self) -> PolicySet | None: ...

    @property
    def rules_version(self) -> str: ...


class InProcess:
    """The decision service on the server's event loop (``--authz-workers 0``)."""

    def __init__(self, grpc_addr: str | None, http_addr: str | None, tls: TlsFiles | None = None) -> None:
        self.service = AuthzService()
        self.grpc_addr, self.http_addr, self.tls = grpc_addr, http_addr, tls
        self.registry = self.service.registry

    def on_revision(self, rev: Revision) -> None:
        """Raises (rejecting the revision, keeping the old rules) if the rules do not compile."""
        if rev.policies is not None:
            self.service.update(rev.policies, rev.rules_version)

    async def start(self) -> None:
        await self.service.start(self.grpc_addr, self.http_addr, tls=self.tls)

    async def stop(self) -> None:
        await self.service.stop()

    def addresses(self) -> dict[str, str]:
        """For ``serve --address-file``."""
        found = {"authz_grpc": self.service.grpc_address, "authz_http": self.service.http_address}
        return {k: v for k, v in found.items() if v}


class Workers:
    """``n`` decision processes on shared ports (SO_REUSEPORT), fed compiled rule tables; one that
    exits is restarted with the current table (``authplane_authz_worker_restarts_total`` counts them)."""

    def __init__(self, n: int, grpc_addr: str | None, http_addr: str | None, tls: TlsFiles | None = None) -> None:
        self.n, self.grpc_addr, self.http_addr, self.tls = n, grpc_addr, http_addr, tls
        self.metrics_dir = tempfile.mkdtemp(prefix="authplane-authz-metrics-")
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=self.metrics_dir)
        self.pool: WorkerPool | None = None
        self.registry.register(RestartCollector(lambda: self.pool.restarts if self.pool is not None else 0))
        self.table: RuleTable | None = None  # the start-up revision's, loaded before the workers start

    def on_revision(self, rev: Revision) -> None:
        if rev.policies is None:
            return
        table = compile_table(rev.policies, rev.rules_version)
        if self.pool is not None:
            self.pool.update_table(table)
        self.table = table

    async def start(self) -> None:
        self.pool = await asyncio.to_thread(start_workers, self.n, self.grpc_addr, self.http_addr, self.table,
                                            metrics_dir=self.metrics_dir, tls=self.tls)

    async def stop(self) -> None:
        if self.pool is not None:
            await asyncio.to_thread(self.pool.stop)
            self.pool = None
        shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def addresses(self) -> dict[str, str]:
        if self.pool is None:
            return {}
        found = {"authz_grpc": self.pool.grpc_addr, "authz_http": self.pool.http_addr}
        return {k: v for k, v in found.items() if v}


def decision_service(workers: int, grpc_addr: str | None, http_addr: str | None,
                     tls: TlsFiles | None = None) -> InProcess | Workers:
    """The component ``serve --authz-workers N`` runs: N processes, or in-process for 0; ``tls``
    (``--authz-tls-cert/--authz-tls-key/--authz-client-ca``): both ports over TLS."""
    return Workers(workers, grpc_addr, http_addr, tls) if workers else InProcess(grpc_addr, http_addr, tls)
