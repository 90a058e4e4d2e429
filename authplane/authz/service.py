"""``AuthzService``: the decision service as a component ``authplane serve`` starts and feeds.

    svc = AuthzService()
    svc.update(policies, version)          # before the first push, and on every good reload
    await svc.start("127.0.0.1:9001", "127.0.0.1:9002")  # tls=TlsFiles(...): both ports over TLS
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
from authplane.policy.tlsfiles import ServerContext, ServerCredentials, TlsFiles

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
        self._frontend: HttpFrontend | None = None
        self._site: asyncio.AbstractServer | None = None
        self.tls: tuple[ServerCredentials | None, ServerContext | None] = (None, None)
        """The gRPC credentials and HTTP context of a TLS start (their ``rotations`` count rotations)."""

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
                    http_addr: str | None = "127.0.0.1:9002", reuse_port: bool = False,
                    tls: TlsFiles | None = None) -> None:
        """Listen on either or both addresses (port 0: OS-chosen, see ``grpc_port``/``http_port``).
        ``reuse_port`` lets several processes share a port (``workers.start_workers``). ``tls``:
        both serve TLS only, with the files re-read when they change (OSError if they are unusable);
        with its client CA, only clients with a certificate it signed get past the handshake."""
        creds = ServerCredentials(tls, "decision service", log) if tls is not None and grpc_addr else None
        context = ServerContext(tls, "decision service", log) if tls is not None and http_addr else None
        self.tls = (creds, context)
        if grpc_addr:
            self._grpc = grpc.aio.server(options=[
                ("grpc.so_reuseport", int(reuse_port)),
                ("grpc.max_concurrent_streams", 1024),
                ("grpc.http2.max_pings_without_data", 0),
            ])
            self._grpc.add_generic_rpc_handlers([GrpcFrontend(self.decider).handler()])
            try:
                self.grpc_port = (self._grpc.add_insecure_port(grpc_addr) if creds is None else
                                  self._grpc.add_secure_port(grpc_addr, creds.credentials))
            except RuntimeError:
                self.grpc_port = 0
            if not self.grpc_port:
                raise OSError(f"cannot listen on {grpc_addr} (gRPC)")
            self.grpc_address = f"{grpc_addr.rpartition(':')[0]}:{self.grpc_port}"
            await self._grpc.start()
        if http_addr:
            host, port = split_address(http_addr)
            self._frontend = HttpFrontend(self.decider)
            self._http = http_server(self._frontend)
            loop = asyncio.get_running_loop()
            self._site = await loop.create_server(self._http, host, port, reuse_port=reuse_port or None,
                                                  backlog=1024, ssl=context.context if context else None)
            self.http_port = self._site.sockets[0].getsockname()[1]
            self.http_address = f"{http_addr.rpartition(':')[0]}:{self.http_port}"
        mode = "plaintext" if tls is None else "mutual TLS" if tls.client_ca else "TLS"
        log.info("decision service listening: gRPC %s, HTTP %s (%s)", self.grpc_port, self.http_port, mode)

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
        if self._frontend is not None:
            await self._frontend.signin.close()  # Redis session store connections
            self._frontend = None
        await cancel_fetches()
