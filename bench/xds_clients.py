"""Policy change → ACK from 1,000 simulated Delta xDS clients; control-plane memory per client.

Targets (README, Figures): p99 ≤ 1 s from the change until every client has ACKed; ≤ 0.5 MB of
control-plane memory per connected client.

``authplane serve`` runs as its own process; this process simulates the Envoys with grpcio
(asyncio): each client has its own HTTP/2 connection by default, subscribes like Envoy does
(clusters and listeners wildcard, then endpoints and routes by name) and ACKs every response.
Each change edits a route-level policy (a route configuration change, as most policy edits
are); the clock starts just before the file is renamed into place and stops when the client has
sent its ACK for the response carrying the new version. Everything runs on this machine.

    python bench/xds_clients.py [--clients 1000,5000,10000] [--changes 10] [--per-connection 1]

Each fleet size in ``--clients`` gets its own ``serve`` process, one after the other; a summary
table follows.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
import tempfile
import time
from typing import Any

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
CONNECT_BATCH = 500


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Tally:
    """How many clients have ACKed each version, so the bench waits on an event rather than
    scanning every client every few milliseconds (at 10,000 clients the scan cost a core)."""

    def __init__(self, clients: int) -> None:
        self.clients = clients
        self.counts: dict[str, int] = {}
        self.done: dict[str, asyncio.Event] = {}

    def event(self, version: str) -> asyncio.Event:
        return self.done.setdefault(version, asyncio.Event())

    def acked(self, version: str) -> None:
        n = self.counts[version] = self.counts.get(version, 0) + 1
        if n == self.clients:
            self.event(version).set()


class Client:
    """One simulated Envoy on a Delta ADS stream: subscribes as Envoy does and ACKs everything.

    Writes and reads on the call directly (no request iterator, queue or extra task per client):
    the load client shares the cores with the control plane, so it should cost little."""

    def __init__(self, index: int, channel: grpc.aio.Channel, tally: Tally) -> None:
        self.index = index
        self.channel = channel
        self.tally = tally
        self.acked: dict[str, float] = {}  # system version → when its route update was ACKed
        self.ready = asyncio.Event()
        self.subscribed: set[tuple[str, str]] = set()
        self.call: Any = None

    async def run(self) -> None:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        node = base_pb2.Node(id=f"sim-{self.index}", cluster="edge")
        self.call = call = stub.DeltaAggregatedResources()
        await call.write(discovery_pb2.DeltaDiscoveryRequest(node=node, type_url=CLUSTER))
        await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=LISTENER))
        while (response := await call.read()) is not grpc.aio.EOF:
            await call.write(discovery_pb2.DeltaDiscoveryRequest(
                type_url=response.type_url, response_nonce=response.nonce))
            if response.type_url == ROUTE and response.system_version_info not in self.acked:
                self.acked[response.system_version_info] = time.perf_counter()
                self.tally.acked(response.system_version_info)
                self.ready.set()
            follow = {CLUSTER: ENDPOINT, LISTENER: ROUTE}.get(response.type_url)
            if follow:  # like Envoy: endpoints of EDS clusters, route configurations of listeners
                names = [r.name for r in response.resources if (follow, r.name) not in self.subscribed]
                if names:
                    self.subscribed.update((follow, n) for n in names)
                    await call.write(discovery_pb2.DeltaDiscoveryRequest(
                        type_url=follow, resource_names_subscribe=names))

    def close(self) -> None:
        if self.call is not None:
            self.call.cancel()


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def bench(args: argparse.Namespace, count: int, serve: ServeProcess, directory: str) -> dict[str, float]:
    idle = rss_kib(serve.proc.pid)
    # No BDP pings: Envoy's HTTP/2 client sends none either (and serve probes none, ads.SERVER_OPTIONS).
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.http2.bdp_probe", 0)]
    channels = [grpc.aio.insecure_channel(serve.xds, options=options)
                for _ in range((count + args.per_connection - 1) // args.per_connection)]
    tally = Tally(count)
    clients = [Client(i, channels[i // args.per_connection], tally) for i in range(count)]
    start = time.perf_counter()
    tasks: list[asyncio.Task[None]] = []
    # In batches: thousands of simultaneous connects overflow the SYN backlog (tcp_max_syn_backlog)
    # and grpc's reconnect backoff then stretches the start over minutes.
    for batch in range(0, count, CONNECT_BATCH):
        tasks.extend(asyncio.create_task(c.run()) for c in clients[batch:batch + CONNECT_BATCH])
        while (synced := sum(c.ready.is_set() for c in clients[:batch + CONNECT_BATCH])) < len(tasks):
            if time.perf_counter() - start > args.timeout:
                raise RuntimeError(f"{synced} of {count} clients synced within {args.timeout} s")
            await asyncio.sleep(0.05)
    print(f"{count} clients connected and synced in {time.perf_counter() - start:.1f} s "
          f"({len(channels)} HTTP/2 connections)")
    await asyncio.sleep(1)
    connected = rss_kib(serve.proc.pid)
    per_change: list[float] = []
    per_client: list[float] = []
    cpu_serve, cpu_load = cpu_seconds(serve.proc.pid), cpu_seconds(os.getpid())
    for n in range(1, args.changes + 1):
        files = policies(n)
        version = compile_policies_version(directory, files)
        everyone = tally.event(version)
        t0 = time.perf_counter()
        write(directory, files)
        try:
            await asyncio.wait_for(everyone.wait(), args.timeout)
        except TimeoutError:
            missing = sum(version not in c.acked for c in clients)
            raise RuntimeError(f"change {n}: {missing} clients did not ACK within {args.timeout} s") from None
        acks = [c.acked[version] - t0 for c in clients]
        per_change.append(max(acks))
        per_client.extend(acks)
        await asyncio.sleep(0.3)
    after = rss_kib(serve.proc.pid)
    # CPU per stream and change, the figure a busy machine disturbs least (the changes' compile
    # and the 0.3 s pauses included)
    serve_us = 1e6 * (cpu_seconds(serve.proc.pid) - cpu_serve) / (count * args.changes)
    load_us = 1e6 * (cpu_seconds(os.getpid()) - cpu_load) / (count * args.changes)
    ms = [t * 1000 for t in per_change]
    each = [t * 1000 for t in per_client]
    print(f"change → every client ACKed, {args.changes} changes (ms): p50 {pct(ms, 50):.0f}  p99 {pct(ms, 99):.0f}  "
          f"max {max(ms):.0f}   (target p99 ≤ 1000)")
    print(f"change → one client's ACK, {len(each)} ACKs (ms): p50 {pct(each, 50):.0f}  p99 {pct(each, 99):.0f}")
    per_stream = (max(connected, after) - idle) / count
    print(f"CPU per stream and change: serve {serve_us:.0f} us, this load client {load_us:.0f} us")
    print(f"control-plane RSS: {idle / 1024:.1f} MiB idle, {connected / 1024:.1f} MiB with {count} clients, "
          f"{after / 1024:.1f} MiB after the changes → {per_stream:.0f} KiB per client   (target ≤ 40 KiB)")
    for c in clients:
        c.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close()
    return {"clients": count, "p50": pct(ms, 50), "p99": pct(ms, 99), "max": max(ms),
            "ack_p50": pct(each, 50), "ack_p99": pct(each, 99), "kib": per_stream, "serve_us": serve_us,
            "load_us": load_us}


def compile_policies_version(directory: str, files: dict[str, str]) -> str:
    """The fleet version the control plane will serve for ``files`` (compiled here, on a copy)."""
    with tempfile.TemporaryDirectory() as tmp:
        write(tmp, files)
        return compile_policies(load_dir(tmp))["edge"].version


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1000,5000,10000", help="fleet sizes, comma-separated")
    ap.add_argument("--changes", type=int, default=10)
    ap.add_argument("--per-connection", type=int, default=1, help="streams per HTTP/2 connection")
    ap.add_argument("--timeout", type=float, default=60, help="seconds, for connecting and for each change")
    args = ap.parse_args()
    # The simulated Envoys are C++ in reality: spare this process the cyclic collector's walks
    # over its thousands of clients (the same tuning as serve's, ads.tune_gc).
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    rows = []
    for count in (int(c) for c in args.clients.split(",")):
        work = tempfile.mkdtemp(prefix="authplane-bench-clients-")
        directory = os.path.join(work, "policies")
        os.makedirs(directory)
        write(directory, policies(0))
        serve = ServeProcess(directory, work, 0, "--log-level", "warning").wait_started()
        try:
            rows.append(asyncio.run(bench(args, count, serve, directory)))
        finally:
            serve.stop(signal.SIGTERM, timeout=30)
    print(f"\n{'streams':>8} {'every ACK p50':>14} {'p99':>6} {'max':>6} {'one ACK p50':>12} {'p99':>6} "
          f"{'KiB/stream':>11} {'serve CPU/stream/change':>24} {'load client':>12}   ({os.cpu_count()} cores "
          "shared by serve and this load client)")
    for r in rows:
        print(f"{r['clients']:>8.0f} {r['p50']:>11.0f} ms {r['p99']:>6.0f} {r['max']:>6.0f} {r['ack_p50']:>9.0f} ms "
              f"{r['ack_p99']:>6.0f} {r['kib']:>11.0f} {r['serve_us']:>21.0f} us {r['load_us']:>9.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
