"""A raw ADS client (SotW or Delta) and the requests it sends, for protocol-level tests of ``serve``."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2


class AdsClient:
    """A raw ADS client (SotW or Delta) on a real gRPC channel, for protocol tests."""

    def __init__(self, address: str, delta: bool) -> None:
        self.channel = grpc.insecure_channel(address)
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self._requests: queue.Queue[Any] = queue.Queue()
        self.responses: queue.Queue[Any] = queue.Queue()
        method = stub.DeltaAggregatedResources if delta else stub.StreamAggregatedResources
        self.call = method(self._iterate())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _iterate(self) -> Iterator[Any]:
        while True:
            item = self._requests.get()
            if item is None:
                return
            yield item

    def _read(self) -> None:
        try:
            for response in self.call:
                self.responses.put(response)
        except grpc.RpcError as e:
            self.responses.put(e)

    def send(self, request: Any) -> None:
        self._requests.put(request)

    def recv(self, timeout: float = 10) -> Any:
        try:
            item = self.responses.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no response within {timeout}s") from None
        if isinstance(item, Exception):
            raise item
        return item

    def expect_nothing(self, wait: float = 0.4) -> None:
        try:
            item = self.responses.get(timeout=wait)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected response: {item}")

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()
        self.channel.close()


def node(node_id: str, fleet: str) -> Any:
    from envoy.config.core.v3 import base_pb2

    return base_pb2.Node(id=node_id, cluster=fleet)


def _identify(req: Any, node_id: str, fleet: str, error: str) -> Any:
    """The node (first request of a stream) and a NACK's error_detail, shared by both variants."""
    if node_id:
        req.node.CopyFrom(node(node_id, fleet))
    if error:
        req.error_detail.code = 3
        req.error_detail.message = error
    return req


def sotw_request(type_url: str, names: list[str] | None = None, nonce: str = "", version: str = "",
                 error: str = "", node_id: str = "", fleet: str = "") -> discovery_pb2.DiscoveryRequest:
    req = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names or [], response_nonce=nonce,
                                         version_info=version)
    return _identify(req, node_id, fleet, error)


def delta_request(type_url: str, subscribe: list[str] | None = None, unsubscribe: list[str] | None = None,
                  nonce: str = "", error: str = "", initial: dict[str, str] | None = None, node_id: str = "",
                  fleet: str = "") -> discovery_pb2.DeltaDiscoveryRequest:
    req = discovery_pb2.DeltaDiscoveryRequest(
        type_url=type_url, resource_names_subscribe=subscribe or [], resource_names_unsubscribe=unsubscribe or [],
        response_nonce=nonce, initial_resource_versions=initial or {})
    return _identify(req, node_id, fleet, error)
