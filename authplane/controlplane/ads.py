"""The gRPC ``AggregatedDiscoveryService``: each call becomes a SotW or Delta ``Stream``."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from authplane.controlplane.cache import SnapshotCache
from authplane.controlplane.delta import DeltaStream
from authplane.controlplane.sotw import SotwStream
from authplane.controlplane.stream import Callbacks, Refused, Stream
from authplane.controlplane.tls import ServerCredentials, TlsFiles, peer_fleets

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
    # No BDP probing: it grows this side's receive window (for requests, which are small) with a
    # ping after incoming data, i.e. after every ACK of every stream; off, a push at 5,000 streams
    # costs 15-20% less CPU (bench/xds_clients.py). Envoy's own window governs what we send.
    ("grpc.http2.bdp_probe", 0),
]


class AdsService(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, cache: SnapshotCache, callbacks: Callbacks) -> None:
        self.cache = cache
        self.callbacks = callbacks
        self.streams: set[Stream] = set()
        self.fleets_from_certificates = False
        """mTLS: a stream gets only the fleets its client certificate names."""

    async def StreamAggregatedResources(self, request_iterator: Any, context: Any) -> None:
        await self._run(SotwStream(self.cache, self.callbacks, context.peer()), request_iterator, context)

    async def DeltaAggregatedResources(self, request_iterator: Any, context: Any) -> None:
        await self._run(DeltaStream(self.cache, self.callbacks, context.peer()), request_iterator, context)

    async def _run(self, stream: Stream, requests: Any, context: Any) -> None:
        if self.fleets_from_certificates:
            stream.permitted = peer_fleets(context)
        self.streams.add(stream)
        try:
            await stream.serve(requests, context.write)
        except Refused as e:
            log.warning("xDS stream %d from %s refused: %s", stream.id, stream.peer, e)
            self.callbacks.stream_refused(stream, e.reason, str(e))
            await context.abort(e.code, f"authplane: {e}")
        except Exception:  # a bug must end this stream only, never the server
            log.exception("xDS stream %d of node %r failed", stream.id, stream.node_id)
            await context.abort(grpc.StatusCode.INTERNAL, "authplane: internal error")
        finally:
            self.streams.discard(stream)

    def close_all(self) -> None:
        for stream in list(self.streams):
            stream.close()


ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"

GC_THRESHOLD = (50_000, 20, 100)
"""Cyclic collector thresholds while xDS serves (Python's default: 700, 10, 10)."""
_gc_tuned = False


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a server holding thousands of streams.

    Every stream keeps a few hundred live objects (its tasks, queue, state, gRPC call), and a
    push allocates (and frees, by reference counting) a few more per stream; with the default
    thresholds a push at 5,000 streams ran several full collections, each walking every live
    object: 37% of the event loop's time (py-spy, ``bench/xds_clients.py``). What lives from
    start-up on is frozen (never walked again) and collections become rarer; short-lived cycles
    are still collected by the young generations. Once per process (in-process test servers)."""
    global _gc_tuned
    if _gc_tuned:
        return
    _gc_tuned = True
    gc.freeze()
    gc.set_threshold(*(max(a, b) for a, b in zip(gc.get_threshold(), GC_THRESHOLD, strict=True)))


def add_ads_service(service: AdsService, server: grpc.aio.Server) -> None:
    """Register ADS like the generated ``add_AggregatedDiscoveryServiceServicer_to_server``, but
    with no response serializer: streams write responses already serialised, their bytes shared
    by every stream of a fleet (``cache.PackedSnapshot.delta_body``)."""
    handlers = {
        "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
            service.StreamAggregatedResources, request_deserializer=discovery_pb2.DiscoveryRequest.FromString),
        "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
            service.DeltaAggregatedResources,
            request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ADS_SERVICE, handlers),))
    server.add_registered_method_handlers(ADS_SERVICE, handlers)


class XdsServer:
    """The ADS endpoint as a component of ``serve`` (see ``app.Component``)."""

    def __init__(self, address: str, cache: SnapshotCache, callbacks: Callbacks,
                 tls: TlsFiles | None = None) -> None:
        self.requested = address
        self.service = AdsService(cache, callbacks)
        self.address = address
        self.tls = tls
        """TLS on the ADS port (files re-read on change); with a client CA, fleets from certificates."""
        self.credentials: ServerCredentials | None = None
        self._server: grpc.aio.Server | None = None
        self.services: list[Callable[[grpc.aio.Server], None]] = []
        """More services on the same port and connections (the decision log's access-log service)."""

    async def start(self) -> None:
        tls = self.tls
        self.credentials = ServerCredentials(tls) if tls is not None else None  # OSError: bad files
        self.service.fleets_from_certificates = tls is not None and tls.client_ca is not None
        server = grpc.aio.server(options=SERVER_OPTIONS)
        add_ads_service(self.service, server)
        for register in self.services:
            register(server)
        try:
            if self.credentials is None:
                port = server.add_insecure_port(self.requested)
            else:
                port = server.add_secure_port(self.requested, self.credentials.credentials)
        except RuntimeError:
            port = 0
        if not port:
            raise OSError(f"cannot listen on {self.requested} (xDS): address in use or not local")
        self.address = f"{self.requested.rpartition(':')[0]}:{port}"
        await server.start()
        tune_gc()
        self._server = server
        mode = ("mutual TLS, fleets from client certificates" if self.service.fleets_from_certificates else
                "TLS" if tls is not None else "plaintext")
        log.info("xDS (ADS, SotW and Delta) listening on %s (%s)", self.address, mode)
        if not self.service.fleets_from_certificates:
            log.warning("xDS on %s does not authenticate clients: anything that reaches this port can read "
                        "every fleet's configuration and secrets (use --xds-tls-cert, --xds-tls-key and "
                        "--xds-client-ca)", self.address)

    async def stop(self, grace: float = 2.0) -> None:
        if self._server is None:
            return
        self.service.close_all()
        await self._server.stop(grace)
        self._server = None
