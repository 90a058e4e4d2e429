"""What the tests run beside themselves: the control plane (``authplane serve`` in a subprocess, or
in-process on an event loop thread), the decision service and misbehaving stand-ins for it, and
real Envoys (from ``authplane bootstrap`` output or a fleet's static bootstrap)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import grpc
from aiohttp import web

from authplane.authz.grpc_api import SERVICE
from authplane.authz.service import AuthzService
from authplane.compiler.ir import CompileOptions
from authplane.compiler.render import dump, static_bootstrap, to_dict
from authplane.compiler.snapshot import compile_policies
from authplane.controlplane.bootstrap import bootstrap_yaml
from authplane.envoy_bin import EnvoyProcess
from authplane.policy.loader import load_dir
from tests.support.http import get, metric_samples
from tests.support.ports import closed_port, wait_for

T = TypeVar("T")


def add_access_log(boot: Any, path: str, fields: dict[str, str]) -> None:
    """A JSON-lines file access log (``fields``: key → Envoy format command) on every listener."""
    from envoy.config.accesslog.v3 import accesslog_pb2
    from envoy.config.core.v3 import substitution_format_string_pb2 as fmt
    from envoy.extensions.access_loggers.file.v3 import file_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm,
    )
    from google.protobuf import struct_pb2

    from authplane.compiler.protos import pack

    layout = struct_pb2.Struct()
    layout.update(fields)
    log = accesslog_pb2.AccessLog(name="envoy.access_loggers.file", typed_config=pack(file_pb2.FileAccessLog(
        path=path, log_format=fmt.SubstitutionFormatString(json_format=layout))))
    for lst in boot.static_resources.listeners:
        for chain in lst.filter_chains:
            for f in chain.filters:
                if f.typed_config.Is(hcm.HttpConnectionManager.DESCRIPTOR):
                    cfg = hcm.HttpConnectionManager()
                    f.typed_config.Unpack(cfg)
                    cfg.access_log.append(log)
                    f.typed_config.CopyFrom(pack(cfg))


def start_static_envoy(policy_dir: str, fleet: str, tmp: str,
                       opts: CompileOptions | None = None,
                       access_log: tuple[str, dict[str, str]] | None = None) -> EnvoyProcess:
    """Compile, turn the fleet's snapshot into a static bootstrap on OS-chosen ports, start Envoy.
    ``opts`` points the builtin decision service clusters at a test server's ports; ``access_log``
    (path, fields) adds a JSON file access log (``add_access_log``)."""
    snap = compile_policies(load_dir(policy_dir), opts)[fleet]
    boot = static_bootstrap(snap)
    if access_log:
        add_access_log(boot, *access_log)
    boot.admin.address.socket_address.address = "127.0.0.1"
    boot.admin.address.socket_address.port_value = 0
    for lst in boot.static_resources.listeners:
        lst.address.socket_address.port_value = 0
        lst.address.socket_address.address = "127.0.0.1"
    path = os.path.join(tmp, f"{fleet}-bootstrap.yaml")
    with open(path, "w") as f:
        f.write(dump(to_dict(boot)))
    # An access log is read back by the test: flush it every 50 ms, not Envoy's default 10 s.
    envoy = EnvoyProcess(path, extra_args=["--file-flush-interval-msec", "50"] if access_log else None)
    envoy.start()
    try:
        envoy.wait_ready()
    except Exception:
        envoy.stop()
        raise
    return envoy


class LoopThread:
    """An asyncio loop in a background thread; ``run`` executes a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class ServiceThread(LoopThread):
    """``AuthzService`` on OS-chosen loopback ports, fed from a policy directory."""

    def __init__(self, policy_dir: str | None = None, **kw: Any) -> None:
        super().__init__()
        self.svc = AuthzService(**kw)
        self.run(self.svc.start("127.0.0.1:0", "127.0.0.1:0"))
        if policy_dir:
            self.reload(policy_dir, "v1")

    def reload(self, policy_dir: str, version: str) -> None:
        policies = load_dir(policy_dir)
        self.loop.call_soon_threadsafe(self.svc.update, policies, version)
        self.run(asyncio.sleep(0))  # the swap has happened once this returns

    @property
    def opts(self) -> CompileOptions:
        return CompileOptions(authz_grpc=f"127.0.0.1:{self.svc.grpc_port}",
                              authz_http=f"127.0.0.1:{self.svc.http_port}")

    def close(self) -> None:
        self.run(self.svc.stop(0))
        super().close()


class SlowService(LoopThread):
    """A decision service that answers (allow) only after ``delay`` seconds, over HTTP and gRPC."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

        async def slow_http(request: web.BaseRequest) -> web.Response:
            await asyncio.sleep(self.delay)
            return web.Response(text="too late")

        async def slow_grpc(raw: bytes, context: Any) -> bytes:
            await asyncio.sleep(self.delay)
            return b""  # an empty CheckResponse

        async def start() -> tuple[int, int]:
            self._http = await self.loop.create_server(web.Server(slow_http), "127.0.0.1", 0)
            self._grpc = grpc.aio.server()
            self._grpc.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
                SERVICE, {"Check": grpc.unary_unary_rpc_method_handler(slow_grpc)})])
            port = self._grpc.add_insecure_port("127.0.0.1:0")
            await self._grpc.start()
            return self._http.sockets[0].getsockname()[1], port

        self.http_port, self.grpc_port = self.run(start())

    @property
    def opts(self) -> CompileOptions:
        return CompileOptions(authz_grpc=f"127.0.0.1:{self.grpc_port}",
                              authz_http=f"127.0.0.1:{self.http_port}")

    def close(self) -> None:
        self._http.close()
        self.run(self._grpc.stop(0))
        super().close()


class Unreachable:
    """Where no decision service listens."""

    def __init__(self) -> None:
        port = closed_port()
        self.opts = CompileOptions(authz_grpc=f"127.0.0.1:{port}", authz_http=f"127.0.0.1:{port}")

    def close(self) -> None:
        pass


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


def start_envoys(work: str, xds: str, nodes: list[tuple[str, str, bool]],
                 native_log: bool = False) -> list[EnvoyProcess]:
    """Start one Envoy per (node id, fleet, delta) from ``authplane bootstrap`` output (admin port 0),
    then wait until each is ready; stops them all if any fails. ``native_log``: the bootstrap of
    ``--native-decision-log`` (the module must be on the search path)."""
    envoys: list[EnvoyProcess] = []
    try:
        for node_id, fleet, delta in nodes:
            path = os.path.join(work, f"{node_id}.yaml")
            with open(path, "w") as f:
                f.write(bootstrap_yaml(node_id, fleet, xds, admin_port=0, delta=delta, native_log=native_log))
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
