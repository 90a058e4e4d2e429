"""The gRPC ``AggregatedDiscoveryService``: each call becomes a SotW or Delta ``Stream``."""

from __future__ import annotations

import logging
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc

from authplane.controlplane.cache import SnapshotCache
from authplane.controlplane.callbacks import Callbacks
from authplane.controlplane.delta import DeltaStream
from authplane.controlplane.sotw import SotwStream
from authplane.controlplane.stream import Refused, Stream

log = logging.getLogger("authplane.xds")

MAX_REQUEST_BYTES = 1024 * 1024
"""A larger discovery request ends its stream (RESOURCE_EXHAUSTED); Envoy's stay far below."""

SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a second control plane on the same port is an error, not a split
    ("grpc.max_concurrent_streams", 100_000),
    ("grpc.keepalive_time_ms", 30_000),  # find Envoys that vanished without closing their stream
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),  # Envoy's own keepalive pings
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
]


class AdsService(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, cache: SnapshotCache, callbacks: Callbacks) -> None:
        self.cache = cache
        self.callbacks = callbacks
        self.streams: set[Stream] = set()

    async def StreamAggregatedResources(self, request_iterator: Any, context: Any) -> None:
        await self._run(SotwStream(self.cache, self.callbacks, context.peer()), request_iterator, context)

    async def DeltaAggregatedResources(self, request_iterator: Any, context: Any) -> None:
        await self._run(DeltaStream(self.cache, self.callbacks, context.peer()), request_iterator, context)

    async def _run(self, stream: Stream, requests: Any, context: Any) -> None:
        self.streams.add(stream)
        try:
            await stream.serve(requests, context.write)
        except Refused as e:
            log.warning("xDS stream %d from %s refused: %s", stream.id, stream.peer, e)
            await context.abort(e.code, f"authplane: {e}")
        except Exception:  # a bug must end this stream only, never the server
            log.exception("xDS stream %d of node %r failed", stream.id, stream.node_id)
            await context.abort(grpc.StatusCode.INTERNAL, "authplane: internal error")
        finally:
            self.streams.discard(stream)

    def close_all(self) -> None:
        for stream in list(self.streams):
            stream.close()


class XdsServer:
    """The ADS endpoint as a component of ``serve`` (see ``app.Component``)."""

    def __init__(self, address: str, cache: SnapshotCache, callbacks: Callbacks) -> None:
        self.requested = address
        self.service = AdsService(cache, callbacks)
        self.address = address
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.service, server)
        try:
            port = server.add_insecure_port(self.requested)
        except RuntimeError:
            port = 0
        if not port:
            raise OSError(f"cannot listen on {self.requested} (xDS): address in use or not local")
        self.address = f"{self.requested.rpartition(':')[0]}:{port}"
        await server.start()
        self._server = server
        log.info("xDS (ADS, SotW and Delta) listening on %s", self.address)

    async def stop(self, grace: float = 2.0) -> None:
        if self._server is None:
            return
        self.service.close_all()
        await self._server.stop(grace)
        self._server = None
