"""Policy change → ACK from 1,000 simulated Delta xDS clients; control-plane memory per client.

Targets (README, Figures): p99 ≤ 1 s from the change until every client has ACKed; ≤ 0.5 MB of
control-plane memory per connected client.

``authplane serve`` runs as its own process; this process simulates the Envoys with grpcio
(asyncio): each client has its own HTTP/2 connection by default, subscribes like Envoy does
(clusters and listeners wildcard, then endpoints and routes by name) and ACKs every response.
Each change edits a route-level policy (a route configuration change, as most policy edits
are); the clock starts just before the file is renamed into place and stops when the client has
sent its ACK for the response carrying the new version. Everything runs on this machine.

    python bench/xds_clients.py [--clients 1000] [--changes 10] [--per-connection 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time

import grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from envoy.config.core.v3 import base_pb2  # noqa: E402
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2  # noqa: E402

from authplane.compiler.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE  # noqa: E402
from authplane.compiler.snapshot import compile_policies  # noqa: E402
from authplane.policy.loader import load_dir  # noqa: E402
from tests.support.policies import HEAD  # noqa: E402
from tests.support.processes import ServeProcess  # noqa: E402

ROUTES = 20


def policies(version: int) -> dict[str, str]:
    """A gateway with ``ROUTES`` routes, each with its own policy; ``version`` changes route r0's."""
    docs = [
        "kind: Gateway\nmetadata: {name: edge}\nspec: {fleet: edge, listeners: [{name: http, port: 8080}]}\n",
        "kind: Backend\nmetadata: {name: echo}\nspec: {endpoints: ['127.0.0.1:9000']}\n",
        "kind: Backend\nmetadata: {name: api}\nspec: {endpoints: ['127.0.0.2:9000', '127.0.0.3:9000']}\n",
    ]
    for i in range(ROUTES):
        team = f"v{version}" if i == 0 else f"team{i}"
        target = "api" if i % 2 else "echo"
        docs.append(f"kind: Route\nmetadata: {{name: r{i}}}\nspec:\n  gateway: edge\n"
                    f"  rules: [{{name: main, match: {{pathPrefix: /svc{i}}}, backend: {target}}}]\n")
        docs.append(f"kind: AuthPolicy\nmetadata: {{name: p{i}}}\nspec:\n  targetRef: {{kind: Route, name: r{i}}}\n"
                    "  authorization:\n    rules:\n"
                    f"      - {{name: team, action: allow, when: {{headers: {{x-team: [{team}]}}}}}}\n")
    return {"policies.yaml": "---\n".join(HEAD + d for d in docs[:3] + docs[5:]),
            "edit.yaml": "---\n".join(HEAD + d for d in docs[3:5])}


def write(directory: str, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = os.path.join(directory, name)
        with open(path + ".new", "w") as f:
            f.write(text)
        os.replace(path + ".new", path)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Client:
    """One simulated Envoy on a Delta ADS stream: subscribes as Envoy does and ACKs everything."""

    def __init__(self, index: int, channel: grpc.aio.Channel) -> None:
        self.index = index
        self.channel = channel
        self.requests: asyncio.Queue[discovery_pb2.DeltaDiscoveryRequest | None] = asyncio.Queue()
        self.acked: dict[str, float] = {}  # system version → when its route update was ACKed
        self.ready = asyncio.Event()
        self.subscribed: set[str] = set()

    async def _requests(self):  # type: ignore[no-untyped-def]
        while (item := await self.requests.get()) is not None:
            yield item

    async def run(self) -> None:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        node = base_pb2.Node(id=f"sim-{self.index}", cluster="edge")
        self.requests.put_nowait(discovery_pb2.DeltaDiscoveryRequest(node=node, type_url=CLUSTER))
        self.requests.put_nowait(discovery_pb2.DeltaDiscoveryRequest(type_url=LISTENER))
        call = stub.DeltaAggregatedResources(self._requests())
        async for response in call:
            self.requests.put_nowait(discovery_pb2.DeltaDiscoveryRequest(
                type_url=response.type_url, response_nonce=response.nonce))
            if response.type_url == ROUTE:
                self.acked.setdefault(response.system_version_info, time.perf_counter())
                self.ready.set()
            follow = {CLUSTER: ENDPOINT, LISTENER: ROUTE}.get(response.type_url)
            if follow:  # like Envoy: endpoints of EDS clusters, route configurations of listeners
                names = [r.name for r in response.resources if (follow, r.name) not in self.subscribed]
                if names:
                    self.subscribed.update((follow, n) for n in names)
                    self.requests.put_nowait(discovery_pb2.DeltaDiscoveryRequest(
                        type_url=follow, resource_names_subscribe=names))

    def close(self) -> None:
        self.requests.put_nowait(None)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def bench(args: argparse.Namespace, serve: ServeProcess, directory: str) -> None:
    idle = rss_kib(serve.proc.pid)
    channels = [grpc.aio.insecure_channel(serve.xds, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range((args.clients + args.per_connection - 1) // args.per_connection)]
    clients = [Client(i, channels[i // args.per_connection]) for i in range(args.clients)]
    start = time.perf_counter()
    tasks = [asyncio.create_task(c.run()) for c in clients]
    await asyncio.wait_for(asyncio.gather(*(c.ready.wait() for c in clients)), args.timeout)
    print(f"{args.clients} clients connected and synced in {time.perf_counter() - start:.1f} s "
          f"({len(channels)} HTTP/2 connections)")
    await asyncio.sleep(1)
    connected = rss_kib(serve.proc.pid)
    per_change: list[float] = []
    per_client: list[float] = []
    for n in range(1, args.changes + 1):
        files = policies(n)
        version = compile_policies_version(directory, files)
        t0 = time.perf_counter()
        write(directory, files)
        deadline = t0 + args.timeout
        while not all(version in c.acked for c in clients):
            if time.perf_counter() > deadline:
                missing = sum(version not in c.acked for c in clients)
                raise RuntimeError(f"change {n}: {missing} clients did not ACK within {args.timeout} s")
            await asyncio.sleep(0.002)
        acks = [c.acked[version] - t0 for c in clients]
        per_change.append(max(acks))
        per_client.extend(acks)
        await asyncio.sleep(0.3)
    after = rss_kib(serve.proc.pid)
    ms = [t * 1000 for t in per_change]
    each = [t * 1000 for t in per_client]
    print(f"change → every client ACKed, {args.changes} changes (ms): p50 {pct(ms, 50):.0f}  p99 {pct(ms, 99):.0f}  "
          f"max {max(ms):.0f}   (target p99 ≤ 1000)")
    print(f"change → one client's ACK, {len(each)} ACKs (ms): p50 {pct(each, 50):.0f}  p99 {pct(each, 99):.0f}")
    print(f"control-plane RSS: {idle / 1024:.1f} MiB idle, {connected / 1024:.1f} MiB with {args.clients} clients, "
          f"{after / 1024:.1f} MiB after the changes → {(max(connected, after) - idle) / args.clients:.0f} KiB "
          f"per client   (target ≤ 512 KiB)")
    for c in clients:
        c.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close()


def compile_policies_version(directory: str, files: dict[str, str]) -> str:
    """The fleet version the control plane will serve for ``files`` (compiled here, on a copy)."""
    with tempfile.TemporaryDirectory() as tmp:
        write(tmp, files)
        return compile_policies(load_dir(tmp))["edge"].version


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--changes", type=int, default=10)
    ap.add_argument("--per-connection", type=int, default=1, help="streams per HTTP/2 connection")
    ap.add_argument("--timeout", type=float, default=60, help="seconds, for connecting and for each change")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="authplane-bench-clients-")
    directory = os.path.join(work, "policies")
    os.makedirs(directory)
    write(directory, policies(0))
    serve = ServeProcess(directory, work, 0, "--log-level", "warning").wait_started()
    try:
        asyncio.run(bench(args, serve, directory))
        return 0
    finally:
        serve.stop(signal.SIGTERM, timeout=30)


if __name__ == "__main__":
    sys.exit(main())
