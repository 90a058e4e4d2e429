"""The decision log's cost: Envoy requests/s on a JWT + RBAC route with ``serve --decision-log``
off and on (both transports), and the entries/s the control plane absorbs.

    python bench/decision_log.py [--duration 8] [--connections 32] [--flood 5] [--rounds 5]
                                 [--verdicts deny,would-deny] [--sample 0.1] [--no-native]

1. ``off`` / ``on`` / ``native``: wrk (HTTP/1.1 keep-alive) through one Envoy (one worker) that
   gets its config from ``authplane serve`` over ADS; with ``on`` every request is also reported
   over the xDS connection (gRPC access-log service), with ``native`` by authplane's module
   (``--decision-log-transport native``: its access logger, batches sent by its bootstrap
   extension over the xDS cluster; built in ``authplane/_native`` by the install), and written
   to a file. The three run interleaved ``--rounds`` times (this machine's speed drifts) and the
   median run of each is printed: req/s, the ratio to ``off``, the CPU time per request of Envoy
   and of ``serve`` (on a machine where they share few cores, ``serve``'s share comes out of
   Envoy's req/s; the Envoy CPU figure is the data plane's own cost), the entries written /
   dropped and ``serve``'s CPU per entry written. ``--verdicts``/``--sample`` add
   ``serve --decision-log-verdicts``/``--decision-log-sample`` to ``on`` and ``native``: Envoy's
   access-log filter keeps the other entries in Envoy (none on this all-allowed route with
   ``--verdicts deny,would-deny``).
2. ``flood`` (last round): a gRPC client streams access-log messages (100 entries each, the shape
   Envoy sends) to ``serve`` as fast as it can for ``--flood`` seconds: the entries/s one
   control-plane process (one event loop, one core) maps, counts and queues, and how many the
   writer had to drop (``authplane_decision_log_entries_total``); the same with the module's
   batches (100 records each, 8 in flight).

Everything shares this machine's cores (see ``nproc``): wrk, both Envoys and ``serve``. Bounded:
about ``rounds * 3 * (duration + 5) + 2 * flood + 10`` seconds. Installs wrk when missing (Debian).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import grpc  # noqa: E402
from authz import UPSTREAM, ensure_tools, wrk  # noqa: E402  (bench/authz.py, beside this file)
from envoy.config.core.v3 import base_pb2  # noqa: E402
from envoy.data.accesslog.v3 import accesslog_pb2  # noqa: E402
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc  # noqa: E402

from authplane.compiler.resources import DECISION_LOG_NAME  # noqa: E402
from authplane.contract import NATIVE_DECISION_LOG_PATH  # noqa: E402
from authplane.controlplane.bootstrap import bootstrap_yaml  # noqa: E402
from authplane.devtools.idp import DevIdentityProvider  # noqa: E402
from authplane.envoy_bin import EnvoyProcess  # noqa: E402
from authplane.policy.modules import SEARCH_PATH_ENV, native_dir  # noqa: E402
from tests.support.policies import write_policies  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.processes import ServeProcess  # noqa: E402


def policies(port: int, upstream_port: int, jwks: str) -> dict[str, str]:
    return {"jwks.json": jwks, "bench.yaml": f"""
        kind: Gateway
        metadata: {{name: edge}}
        spec: {{fleet: edge, listeners: [{{name: http, port: {port}, address: 127.0.0.1}}]}}
        ---
        kind: Backend
        metadata: {{name: up}}
        spec: {{endpoints: ["127.0.0.1:{upstream_port}"]}}
        ---
        kind: Route
        metadata: {{name: r}}
        spec: {{gateway: edge, rules: [{{name: native, match: {{pathPrefix: /native}}, backend: up}}]}}
        ---
        kind: AuthPolicy
        metadata: {{name: native}}
        spec:
          targetRef: {{kind: Route, name: r, rule: native}}
          jwt: {{providers: [{{name: dev, issuer: https://idp.bench, jwks: {{file: jwks.json}}}}]}}
          authorization: {{rules: [{{name: bench, action: allow, when: {{claims: {{groups: [bench]}}}}}}]}}
        """}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def entries_metric(serve: ServeProcess) -> dict[str, float]:
    return {dict(labels)["result"]: v for (name, labels), v in serve.metrics().items()
            if name == "authplane_decision_log_entries_total"}


def decided(serve: ServeProcess) -> float:
    return sum(v for (name, _), v in serve.metrics().items() if name == "authplane_decisions_total")


def through_envoy(d: str, tmp: str, port: int, token: str, log: str | None, args: argparse.Namespace,
                  native: bool = False) -> tuple[dict[str, float], ServeProcess | None]:
    flags = ("--decision-log", log, *args.serve_flags,
             *(("--decision-log-transport", "native") if native else ())) if log else ()
    serve = ServeProcess(d, tmp, 0, "--no-authz", *flags).wait_started()
    path = os.path.join(tmp, "edge-1.yaml")
    with open(path, "w") as f:
        f.write(bootstrap_yaml("edge-1", "edge", serve.xds, admin_port=0, native_log=native))
    envoy = EnvoyProcess(path, log_path=os.path.join(tmp, "edge-1.log"), concurrency=1).start()
    try:
        envoy.wait_ready()
        serve.wait_in_sync("edge-1")
        url = f"http://127.0.0.1:{port}/native/x"
        headers = {"authorization": f"Bearer {token}"}
        wrk(url, headers, 1, args.connections)  # warm-up
        assert envoy.proc is not None
        before = cpu_seconds(envoy.proc.pid), cpu_seconds(serve.proc.pid)
        result = wrk(url, headers, args.duration, args.connections)
        after = cpu_seconds(envoy.proc.pid), cpu_seconds(serve.proc.pid)
        requests = result["rps"] * args.duration
        result["envoy_cpu_us"] = (after[0] - before[0]) / requests * 1e6
        result["serve_cpu_us"] = (after[1] - before[1]) / requests * 1e6
        if log:
            time.sleep(1.5)  # Envoy flushes its access-log buffer every second (the module's: 0.2 s)
            result.update(entries_metric(serve))
            written = result.get("written", 0)
            result["serve_cpu_us_per_entry"] = (after[1] - before[1]) / written * 1e6 if written else None
        return result, serve if log else None
    finally:
        envoy.stop()
        if not log:
            serve.stop()


def median(results: list[dict[str, float]]) -> dict[str, float]:
    """The run of median requests/s (its other figures with it)."""
    return sorted(results, key=lambda r: r["rps"])[len(results) // 2]


def flood(serve: ServeProcess, seconds: float, batch: int = 100) -> dict[str, float]:
    """Stream access-log messages to ``serve`` for ``seconds``; entries/s it took in."""
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.common_properties.route_name = "r/native"
    entry.common_properties.metadata.filter_metadata["envoy.filters.http.jwt_authn"].update(
        {"jwt_payload": {"sub": "alice", "groups": ["bench"]}})
    entry.response.response_code.value = 200
    entry.response.response_code_details = "via_upstream"
    entry.request.request_id = "00000000-0000-4000-8000-000000000000"
    first = als_pb2.StreamAccessLogsMessage()
    first.identifier.node.CopyFrom(base_pb2.Node(id="flood", cluster="edge"))
    first.identifier.log_name = DECISION_LOG_NAME
    first.http_logs.log_entry.extend([entry] * batch)
    rest = als_pb2.StreamAccessLogsMessage()
    rest.http_logs.log_entry.extend([entry] * batch)
    sent = 0
    stop = threading.Event()

    def messages():  # type: ignore[no-untyped-def]
        nonlocal sent
        yield first
        sent += batch
        while not stop.is_set():
            yield rest
            sent += batch

    before, started = decided(serve), time.perf_counter()
    with grpc.insecure_channel(serve.xds) as channel:
        stub = als_pb2_grpc.AccessLogServiceStub(channel)
        timer = threading.Timer(seconds, stop.set)
        timer.start()
        stub.StreamAccessLogs(messages(), timeout=seconds + 30)
    elapsed = time.perf_counter() - started
    return {"sent": sent, "absorbed_per_s": (decided(serve) - before) / elapsed, **entries_metric(serve)}


def flood_native(serve: ServeProcess, seconds: float, batch: int = 100) -> dict[str, float]:
    """The same for the module's batches (``serve --decision-log-transport native``)."""
    record = "\x1f".join(["2026-12-01T16:34:09.067+00:00", "00000000-0000-4000-8000-000000000000", "r/native", "200",
                           "via_upstream", "alice", "", "r:native/enforced_engine_result\x1dallowed"])
    body = ("v1\x1fflood\x1fedge\x1f0\x1e" + "\x1e".join([record] * batch)).encode()
    sent = 0
    before, started = decided(serve), time.perf_counter()
    with grpc.insecure_channel(serve.xds) as channel:
        report = channel.unary_unary(NATIVE_DECISION_LOG_PATH)
        while time.perf_counter() - started < seconds:
            futures = [report.future(body, timeout=30) for _ in range(8)]  # a few in flight, as Envoy sends
            for f in futures:
                f.result()
            sent += 8 * batch
    elapsed = time.perf_counter() - started
    return {"sent": sent, "absorbed_per_s": (decided(serve) - before) / elapsed, **entries_metric(serve)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--flood", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved off/on/native rounds; medians are printed")
    ap.add_argument("--verdicts", help="serve --decision-log-verdicts for the 'on' run")
    ap.add_argument("--sample", help="serve --decision-log-sample for the 'on' run")
    ap.add_argument("--no-native", dest="native", action="store_false",
                    help="skip the run with serve --decision-log-transport native (authplane's Envoy module)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.serve_flags = [*(("--decision-log-verdicts", args.verdicts) if args.verdicts else ()),
                        *(("--decision-log-sample", args.sample) if args.sample else ())]
    ensure_tools()
    idp = DevIdentityProvider(issuer="https://idp.bench")
    token = idp.mint(groups=["bench"], ttl=3600)
    tmp = tempfile.mkdtemp(prefix="authplane-bench-")
    with open(os.path.join(tmp, "upstream.yaml"), "w") as f:
        f.write(UPSTREAM)
    upstream = EnvoyProcess(os.path.join(tmp, "upstream.yaml"), concurrency=1).start()
    serve: ServeProcess | None = None
    try:
        upstream.wait_ready()
        port = free_port()
        d = write_policies(os.path.join(tmp, "policies"), policies(
            port, upstream.listener_port("upstream"), json.dumps(idp.jwks())))
        if args.native:
            os.environ[SEARCH_PATH_ENV] = str(native_dir())  # Envoy finds the module there
        runs: dict[str, list[dict[str, float]]] = {"off": [], "on": [], "native": []}
        for r in range(args.rounds):  # interleaved: this machine's speed drifts from minute to minute
            last = r == args.rounds - 1
            runs["off"].append(through_envoy(d, tmp, port, token, None, args)[0])
            on, serve = through_envoy(d, tmp, port, token, os.path.join(tmp, f"decisions-{r}.jsonl"), args)
            runs["on"].append(on)
            assert serve is not None
            flooded = flood(serve, args.flood) if last else {}
            serve.stop()
            serve = None
            if args.native:
                native, serve = through_envoy(d, tmp, port, token, os.path.join(tmp, f"native-{r}.jsonl"), args,
                                              native=True)
                runs["native"].append(native)
                assert serve is not None
                native_flood = flood_native(serve, args.flood) if last else {}
                serve.stop()
                serve = None
    finally:
        if serve is not None:
            serve.stop()
        upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    off, on = median(runs["off"]), median(runs["on"])
    native = median(runs["native"]) if runs["native"] else None
    out = {"off": off, "on": on, "flood": flooded, "ratio": on["rps"] / off["rps"], "cores": os.cpu_count(),
           "native": native, "native_flood": native_flood if native else None,
           "native_ratio": native["rps"] / off["rps"] if native else None,
           "rounds": {k: [round(x["rps"]) for x in v] for k, v in runs.items()},
           "round_ratios": {k: [x["rps"] / o["rps"] for o, x in zip(runs["off"], runs[k], strict=False)]
                            for k in ("on", "native") if runs[k]}}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"JWT + RBAC route, one Envoy worker, c={args.connections}, {args.duration} s, {os.cpu_count()} cores "
          f"shared by wrk, two Envoys and serve; median of {args.rounds} interleaved rounds (req/s: "
          + "; ".join(f"{k} {', '.join(map(str, v))}" for k, v in out["rounds"].items() if v) + ")")
    per_entry = f"{on['serve_cpu_us_per_entry']:.1f} us" if on["serve_cpu_us_per_entry"] is not None else "-"
    for name, r in (("off", off), ("on", on), *((("native", native),) if native else ())):
        print(f"  decision log {name:<4} {r['rps']:>8.0f} req/s  p50 {r['p50']:.2f} ms  p99 {r['p99']:.2f} ms  "
              f"CPU per request: Envoy {r['envoy_cpu_us']:.1f} us, serve {r['serve_cpu_us']:.1f} us")
    print(f"  on/off: {100 * out['ratio']:.1f}% of the requests/s, Envoy CPU per request "
          f"+{100 * (on['envoy_cpu_us'] / off['envoy_cpu_us'] - 1):.1f}%; entries written "
          f"{on.get('written', 0):.0f}, dropped {on.get('dropped', 0):.0f}; serve CPU per entry written "
          f"{per_entry}{' (' + ' '.join(args.serve_flags) + ')' if args.serve_flags else ''}")
    print(f"  flood ({args.flood:.0f} s, 100 entries a message): {flooded['absorbed_per_s']:.0f} entries/s absorbed "
          f"by one serve process; totals written {flooded.get('written', 0):.0f}, "
          f"dropped {flooded.get('dropped', 0):.0f}")
    if native and native_flood:
        per = native["serve_cpu_us_per_entry"]
        ratios = sorted(out["round_ratios"]["native"])
        print(f"  native/off per round: {', '.join(f'{100 * r:.1f}%' for r in out['round_ratios']['native'])} "
              f"(median {100 * ratios[len(ratios) // 2]:.1f}%)")
        print(f"  native/off: {100 * out['native_ratio']:.1f}% of the requests/s, Envoy CPU per request "
              f"+{100 * (native['envoy_cpu_us'] / off['envoy_cpu_us'] - 1):.1f}%; entries written "
              f"{native.get('written', 0):.0f}, dropped {native.get('dropped', 0):.0f}; serve CPU per entry written "
              f"{f'{per:.1f} us' if per is not None else '-'}")
        print(f"  native flood ({args.flood:.0f} s, 100 records a batch): {native_flood['absorbed_per_s']:.0f} "
              f"entries/s absorbed; totals written {native_flood.get('written', 0):.0f}, "
              f"dropped {native_flood.get('dropped', 0):.0f}")


if __name__ == "__main__":
    main()
