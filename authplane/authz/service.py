"""``AuthzService``: the decision service as a component ``authplane serve`` starts and feeds.

    svc = AuthzService()
    svc.update(policies, version)          # before the first push, and on every good reload
    await svc.start("127.0.0.1:9001", "127.0.0.1:9002")
    ...                                    # svc.registry holds the decision metrics
    await svc.stop()

``update`` compiles first and swaps the whole rule table in one assignment, so a check sees the
old rules or the new ones, never a mix; call it before pushing the matching Envoy config.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from aiohttp import web
from prometheus_client import CollectorRegistry

from authplane.addresses import split_address
from authplane.authz.decider import Decider
from authplane.authz.grpc_api import GrpcFrontend
from authplane.authz.http_api import HttpFrontend, http_server
from authplane.authz.metrics import Metrics
from authplane.authz.rules import RuleTable, compile_table
from authplane.authz.tokens import cancel_fetches
from authplane.policy.documents import PolicySet

log = logging.getLogger("authplane.authz")


class AuthzService:
    def __init__(self, registry: CollectorRegistry | None = None, cache_size: int = 100_000) -> None:
        self.metrics = Metrics(registry)
        self.decider = Decider(self.metrics, cache_size)
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        self.grpc_address: str | None = None
        self.http_address: str | None = None
        """``host:port`` actually listened on (port 0 resolved), once started."""
        self._grpc: grpc.aio.Server | None = None
        self._http: web.Server | None = None
        self._site: asyncio.AbstractServer | None = None

    @property
    def registry(self) -> CollectorRegistry:
        return self.metrics.registry

    @property
    def version(self) -> str:
        return self.decider.table.version

    def update(self, policies: PolicySet, version: str) -> None:
        """Compile the builtin rules of ``policies`` and swap them in; raises (and keeps the old
        rules) if they cannot be compiled."""
        self.update_table(compile_table(policies, version))

    def update_table(self, table: RuleTable) -> None:
        self.decider.swap(table)

    async def start(self, grpc_addr: str | None = "127.0.0.1:9001",
                    http_addr: str | None = "127.0.0.1:9002", reuse_port: bool = False) -> None:
        """Listen on either or both addresses (port 0: OS-chosen, see ``grpc_port``/``http_port``).
        ``reuse_port`` lets several processes share a port (``workers.start_workers``)."""
        if grpc_addr:
            self._grpc = grpc.aio.server(options=[
                ("grpc.so_reuseport", int(reuse_port)),
                ("grpc.max_concurrent_streams", 1024),
                ("grpc.http2.max_pings_without_data", 0),
            ])
            self._grpc.add_generic_rpc_handlers([GrpcFrontend(self.decider).handler()])
            self.grpc_port = self._grpc.add_insecure_port(grpc_addr)
            if not self.grpc_port:
                raise OSError(f"cannot listen on {grpc_addr} (gRPC)")
            self.grpc_address = f"{grpc_addr.rpartition(':')[0]}:{self.grpc_port}"
            await self._grpc.start()
        if http_addr:
            host, port = split_address(http_addr)
            self._http = http_server(HttpFrontend(self.decider))
            loop = asyncio.get_running_loop()
            self._site = await loop.create_server(self._http, host, port, reuse_port=reuse_port or None,
                                                  backlog=1024)
            self.http_port = self._site.sockets[0].getsockname()[1]
            self.http_address = f"{http_addr.rpartition(':')[0]}:{self.http_port}"
        log.info("decision service listening: gRPC %s, HTTP %s", self.grpc_port, self.http_port)

    async def stop(self, grace: float = 1.0) -> None:
        if self._grpc is not None:
            await self._grpc.stop(grace)
            self._grpc = None
        if self._site is not None:
            self._site.close()
            if self._http is not None:
                await self._http.shutdown(grace)
            await self._site.wait_closed()
            self._site = self._http = None
        await cancel_fetches()
