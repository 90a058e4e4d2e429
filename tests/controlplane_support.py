"""Running the control plane in tests: as ``authplane serve`` in a subprocess, or in-process on
an event loop thread; real Envoys started from ``authplane bootstrap`` output; polling helpers."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from prometheus_client.parser import text_string_to_metric_families

from authplane.controlplane.bootstrap import bootstrap_yaml
from authplane.envoy_bin import EnvoyProcess

T = TypeVar("T")


def gateway(name: str, port: int, fleet: str | None = None) -> str:
    """A Gateway document with one listener ``http`` on 127.0.0.1 (for ``write_policies``)."""
    return (f"kind: Gateway\nmetadata: {{name: {name}}}\n"
            f"spec: {{fleet: {fleet or name}, listeners: [{{name: http, port: {port}, address: 127.0.0.1}}]}}")


def backend(name: str, port: int, http2: bool = False, host: str = "127.0.0.1") -> str:
    protocol = ", protocol: http2" if http2 else ""
    return f'kind: Backend\nmetadata: {{name: {name}}}\nspec: {{endpoints: ["{host}:{port}"]{protocol}}}'


def documents(*docs: str) -> str:
    return "\n---\n".join(textwrap.dedent(d).strip("\n") for d in docs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], T], what: str, timeout: float = 15, every: float = 0.02) -> T:
    """Poll ``check`` until it returns something truthy; AssertionError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, http.client.HTTPException, KeyError) as e:
            last = e
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` text → {(sample name, sorted labels): value}."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric_sum(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


class Admin:
    """The admin endpoint of a running control plane."""

    address: str

    def status(self) -> dict[str, Any]:
        return json.loads(get(f"http://{self.address}/status"))

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return metric_samples(get(f"http://{self.address}/metrics"))

    def node(self, node_id: str) -> dict[str, Any]:
        return next(n for n in self.status()["nodes"] if n["id"] == node_id)

    def wait_in_sync(self, *node_ids: str, version: str | None = None, timeout: float = 20) -> None:
        """Until every node is connected and runs its fleet's current version (``version`` if given)."""
        seen: dict[str, Any] = {}

        def synced() -> bool:
            seen.update({n["id"]: (n["state"], n["connected"], n["acked"]) for n in self.status()["nodes"]})
            nodes = {n["id"]: n for n in self.status()["nodes"]}
            return all(i in nodes and nodes[i]["state"] == "in sync" and nodes[i]["connected"] and
                       (version is None or nodes[i]["current_version"] == version) for i in node_ids)

        try:
            wait_for(synced, f"{node_ids} in sync", timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}; nodes: {seen}") from None


class ServeProcess(Admin):
    """``authplane serve`` as a child process on OS-chosen ports (or a given xDS port)."""

    def __init__(self, directory: str, work: str, xds_port: int = 0, *extra: str) -> None:
        self.work = work
        self.address_file = os.path.join(work, f"serve-{time.monotonic_ns()}.json")
        self.log_path = self.address_file.replace(".json", ".log")
        args = [sys.executable, "-m", "authplane.cli", "serve", directory, "--xds", f"127.0.0.1:{xds_port}",
                "--admin", "127.0.0.1:0", "--address-file", self.address_file,
                "--authz-grpc-listen", "127.0.0.1:0", "--authz-http-listen", "127.0.0.1:0", *extra]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.xds = self.address = self.authz_grpc = self.authz_http = ""

    def wait_started(self, timeout: float = 30) -> ServeProcess:
        def started() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.log()}")
            return os.path.exists(self.address_file)

        wait_for(started, "authplane serve to listen", timeout)
        with open(self.address_file) as f:
            addresses = json.load(f)
        self.xds, self.address = addresses["xds"], addresses["admin"]
        self.authz_grpc, self.authz_http = addresses.get("authz_grpc", ""), addresses.get("authz_http", "")
        return self

    @property
    def xds_port(self) -> int:
        return int(self.xds.rpartition(":")[2])

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"serve did not stop on signal {sig}:\n{self.log()[-3000:]}") from None
        return self.proc.returncode


class InProcess(Admin):
    """A ``ControlPlane`` on an event loop in a background thread (for protocol-level tests)."""

    def __init__(self, cp: Any) -> None:
        self.cp = cp
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(cp.start())
        self.xds, self.address = cp.xds.address, cp.admin.address

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the loop thread (the cache and streams are not thread-safe)."""
        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    def close(self) -> None:
        self.run(self.cp.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def start_envoys(work: str, xds: str, nodes: list[tuple[str, str, bool]]) -> list[EnvoyProcess]:
    """Start one Envoy per (node id, fleet, delta) from ``authplane bootstrap`` output (admin port 0),
    then wait until each is ready; stops them all if any fails."""
    envoys: list[EnvoyProcess] = []
    try:
        for node_id, fleet, delta in nodes:
            path = os.path.join(work, f"{node_id}.yaml")
            with open(path, "w") as f:
                f.write(bootstrap_yaml(node_id, fleet, xds, admin_port=0, delta=delta))
            envoys.append(EnvoyProcess(path, log_path=os.path.join(work, f"{node_id}.log")).start())
        for envoy in envoys:
            envoy.wait_ready()
    except BaseException:
        for envoy in envoys:
            envoy.stop()
        raise
    return envoys


def envoy_stat(envoy: EnvoyProcess, name: str) -> int:
    _, body = envoy.admin_get(f"/stats?filter=^{name}$&format=json")
    stats = json.loads(body).get("stats", [])
    return int(stats[0]["value"]) if stats else 0


def pin_connections(port: int, envoys: list[EnvoyProcess], stat_prefix: str,
                    attempts: int = 60) -> dict[int, http.client.HTTPConnection]:
    """Kept-alive client connections to a listener port the Envoys share (SO_REUSEPORT), one per
    Envoy: open connections until the kernel has handed one to each, telling them apart by
    each Envoy's ``downstream_cx_total``. Returns {index in envoys: connection}."""
    stat = f"http.{stat_prefix}.downstream_cx_total"
    pinned: dict[int, http.client.HTTPConnection] = {}
    spare: list[http.client.HTTPConnection] = []
    for _ in range(attempts):
        before = [envoy_stat(e, stat) for e in envoys]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/healthz", headers={"host": "localhost"})
        conn.getresponse().read()
        owners = [i for i, e in enumerate(envoys) if envoy_stat(e, stat) > before[i]]
        if len(owners) == 1 and owners[0] not in pinned:
            pinned[owners[0]] = conn
        else:
            spare.append(conn)
        if len(pinned) == len(envoys):
            break
    for conn in spare:
        conn.close()
    assert len(pinned) == len(envoys), f"the kernel gave every connection to the same Envoy ({attempts} tries)"
    return pinned


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
