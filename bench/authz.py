"""Decision service throughput and latency, through one Envoy (one worker) and directly.

    python bench/authz.py [--duration 5] [--connections 64] [--only a,b] [--workers 1,2]

Scenarios (wrk, HTTP/1.1 keep-alive, through Envoy unless said otherwise):
  no-auth           the route has no policy
  native            JWT (local JWKS, Envoy's JWT cache) + RBAC allow on a claim
  native-cel        same, the claim checked by a CEL rule (when.cel, the RBAC policy's condition)
  any-jwt           satisfy: any (JWT or API key, methodHeader), the request with the JWT
  any-key           same policy, the request with the API key
  builtin-http      ext_authz HTTP mode (the builtin default), decision cache off
  builtin-http-hit  same, every check answered from the cache
  builtin-grpc      ext_authz gRPC (protocol: grpc), cache off
  builtin-grpc-hit  same, cached
  forward-auth      the forward-auth endpoint alone (Traefik-shaped requests, no Envoy)
  check-http        Envoy HTTP-mode check requests sent straight to the service (no Envoy)
  check-grpc        gRPC Check sent straight to the service with h2load (no Envoy)

The upstream is a second Envoy answering with a direct response, so the upstream is never the
bottleneck. Everything runs on this machine's loopback: the figures include the load generator,
both Envoys and the decision service sharing the same cores (see ``nproc``). Installs wrk and
h2load (Debian: wrk, nghttp2-client) when missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from authplane.authz.grpc_api import SERVICE  # noqa: E402
from authplane.compiler.ir import CompileOptions  # noqa: E402
from authplane.devtools.idp import DevIdentityProvider  # noqa: E402
from authplane.envoy_bin import EnvoyProcess  # noqa: E402
from tests.support.policies import write_policies  # noqa: E402
from tests.support.processes import start_static_envoy  # noqa: E402

UPSTREAM = """
admin: {address: {socket_address: {address: 127.0.0.1, port_value: 0}}}
static_resources:
  listeners:
    - name: upstream
      address: {socket_address: {address: 127.0.0.1, port_value: 0}}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.\
http_connection_manager.v3.HttpConnectionManager
                stat_prefix: upstream
                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes:
                        - {match: {prefix: /}, direct_response: {status: 200, body: {inline_string: ok}}}
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
"""

RULES = """
        rules:
          - {name: blocked, action: deny, when: {sourceCIDRs: [10.0.0.0/8, 192.168.0.0/16]}}
          - {name: no-admin-writes, action: deny, when: {paths: [/admin/*], methods: [POST, DELETE]}}
          - {name: sample, action: allow, when: {headers: {x-ext-authz: [allow]}},
             upstreamHeaders: {x-ext-authz-check-result: allowed}}
          - name: everyone-else
            action: deny
            deny: {status: 403, body: denied, headers: {x-ext-authz-check-result: denied}}
"""


SCENARIOS = ("no-auth", "native", "native-cel", "any-jwt", "any-key",
             "builtin-http", "builtin-http-hit", "builtin-grpc", "builtin-grpc-hit",
             "forward-auth", "check-http", "check-grpc")
LIGHT = ("no-auth", "native", "native-cel", "any-jwt", "any-key",
         "builtin-http", "builtin-http-hit", "builtin-grpc", "builtin-grpc-hit")
"""Scenarios of the light-load pass, where the added latency (not queueing) shows."""
BENCH_KEY = "bench-key-0123456789"
NO_DECISION_SERVICE = ("no-auth", "native", "native-cel", "any-jwt", "any-key")


def policies(upstream_port: int, jwks: str) -> dict[str, str]:
    docs = [f"""
        kind: Gateway
        metadata: {{name: edge}}
        spec: {{fleet: edge, listeners: [{{name: http, port: 8080}}]}}
        ---
        kind: Backend
        metadata: {{name: up}}
        spec: {{endpoints: ["127.0.0.1:{upstream_port}"]}}
        ---
        kind: Route
        metadata: {{name: r}}
        spec:
          gateway: edge
          rules:
            - {{name: open, match: {{pathPrefix: /no-auth}}, backend: up}}
            - {{name: native, match: {{pathPrefix: /native}}, backend: up}}
            - {{name: native-cel, match: {{pathPrefix: /native-cel}}, backend: up}}
            - {{name: any, match: {{pathPrefix: /any}}, backend: up}}
            - {{name: builtin-http, match: {{pathPrefix: /builtin-http}}, backend: up}}
            - {{name: builtin-http-hit, match: {{pathPrefix: /builtin-http-hit}}, backend: up}}
            - {{name: builtin-grpc, match: {{pathPrefix: /builtin-grpc}}, backend: up}}
            - {{name: builtin-grpc-hit, match: {{pathPrefix: /builtin-grpc-hit}}, backend: up}}
        ---
        kind: AuthPolicy
        metadata: {{name: native}}
        spec:
          targetRef: {{kind: Route, name: r, rule: native}}
          jwt: {{providers: [{{name: dev, issuer: https://idp.bench, jwks: {{file: jwks.json}}}}]}}
          authorization: {{rules: [{{name: bench, action: allow, when: {{claims: {{groups: [bench]}}}}}}]}}
        ---
        kind: AuthPolicy
        metadata: {{name: native-cel}}
        spec:
          targetRef: {{kind: Route, name: r, rule: native-cel}}
          jwt: {{providers: [{{name: dev, issuer: https://idp.bench, jwks: {{file: jwks.json}}}}]}}
          authorization: {{rules: [{{name: bench, action: allow, when: {{cel: "'bench' in claims.groups"}}}}]}}
        ---
        kind: AuthPolicy
        metadata: {{name: any}}
        spec:
          targetRef: {{kind: Route, name: r, rule: any}}
          satisfy: {{mode: any, methodHeader: x-auth-method}}
          jwt: {{providers: [{{name: dev, issuer: https://idp.bench, jwks: {{file: jwks.json}}}}]}}
          apiKey: {{file: bench.keys}}
        """]
    for protocol in ("http", "grpc"):
        for hit in (False, True):
            name = f"builtin-{protocol}" + ("-hit" if hit else "")
            ttl = "30s" if hit else "0s"
            docs.append(
                f"kind: AuthPolicy\nmetadata: {{name: {name}}}\nspec:\n"
                f"  targetRef: {{kind: Route, name: r, rule: {name}}}\n  extAuth:\n"
                f"    service: builtin\n    protocol: {protocol}\n"
                f"    cache: {{allowTtl: {ttl}, denyTtl: {ttl}}}\n"
                + textwrap.indent(textwrap.dedent(RULES).strip("\n"), "    "))
    return {"bench.yaml": "\n---\n".join(textwrap.dedent(d).strip("\n") for d in docs),
            "jwks.json": jwks, "bench.keys": f"bench: {BENCH_KEY}\n"}


def ensure_tools() -> None:
    if shutil.which("wrk") and shutil.which("h2load"):
        return
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk", "nghttp2-client"], check=True)


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(url: str, headers: dict[str, str], duration: int, connections: int) -> dict[str, float]:
    args = ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{duration}s", "--latency", url]
    for k, v in headers.items():
        args[1:1] = ["-H", f"{k}: {v}"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = {p: _ms(v, u) for p, v, u in re.findall(r"\s(50|99)%\s+([\d.]+)(us|ms|s)\b", out)}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50": lat["50"], "p99": lat["99"], "errors": int(non2xx.group(1)) if non2xx else 0}


def h2load_grpc(port: int, policy: str, duration: int, connections: int) -> dict[str, float]:
    from envoy.service.auth.v3 import external_auth_pb2 as pb

    req = pb.CheckRequest()
    req.attributes.request.http.method = "GET"
    req.attributes.request.http.path = "/check"
    req.attributes.request.http.headers.update({"x-ext-authz": "allow", ":authority": "bench"})
    req.attributes.source.address.socket_address.address = "127.0.0.1"
    req.attributes.context_extensions["authplane.policy"] = policy
    body = req.SerializeToString()
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(b"\0" + len(body).to_bytes(4, "big") + body)
    args = ["h2load", "-D", str(duration), "-c", str(connections), "-m", "8", "-t", "1", "-d", f.name,
            "-H", "content-type: application/grpc", "-H", "te: trailers",
            f"http://127.0.0.1:{port}/{SERVICE}/Check"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    os.unlink(f.name)
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
    ok = re.search(r"(\d+) 2xx", out)
    return {"rps": rps, "p50": _ms(*mean.groups()) if mean else float("nan"), "p99": float("nan"),
            "errors": 0 if ok and int(ok.group(1)) > 0 else -1}


class DecisionService:
    """``python -m authplane.authz`` as its own process, as ``authplane serve`` would run it."""

    def __init__(self, policy_dir: str, workers: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "authplane.authz", policy_dir, "--grpc", "127.0.0.1:0",
             "--http", "127.0.0.1:0", "--workers", str(workers)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.match(r"listening grpc=\S+:(\d+) http=\S+:(\d+)", line)
        if not m:
            self.stop()
            raise RuntimeError(f"decision service did not start: {line!r}")
        self.grpc_port, self.http_port = int(m.group(1)), int(m.group(2))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def scenario(name: str, envoy_port: int, svc: DecisionService, token: str,
             duration: int, connections: int) -> dict[str, float]:
    allow = {"x-ext-authz": "allow"}
    via_envoy = f"http://127.0.0.1:{envoy_port}/{name}/x"
    direct = f"http://127.0.0.1:{svc.http_port}"
    if name == "no-auth":
        return wrk(via_envoy, {}, duration, connections)
    if name in ("native", "native-cel", "any-jwt"):
        return wrk(via_envoy.replace("/any-jwt/", "/any/"), {"authorization": f"Bearer {token}"}, duration,
                   connections)
    if name == "any-key":
        return wrk(f"http://127.0.0.1:{envoy_port}/any/x", {"x-api-key": BENCH_KEY}, duration, connections)
    if name.startswith("builtin-"):
        return wrk(via_envoy, allow, duration, connections)
    if name == "forward-auth":
        traefik = {"x-forwarded-method": "GET", "x-forwarded-uri": "/x", "x-forwarded-host": "app",
                   "x-forwarded-proto": "https"}
        return wrk(f"{direct}/authz/builtin-http", {**allow, **traefik}, duration, connections)
    if name == "check-http":
        return wrk(f"{direct}/envoy/builtin-http/x", allow, duration, connections)
    return h2load_grpc(svc.grpc_port, "builtin-grpc", duration, connections)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--latency-connections", type=int, default=1,
                    help="connections of the added-latency pass (light load)")
    ap.add_argument("--only", default="")
    ap.add_argument("--workers", default="1,2", help="decision processes to compare")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ensure_tools()
    only = set(filter(None, args.only.split(","))) or set(SCENARIOS)
    idp = DevIdentityProvider(issuer="https://idp.bench")
    token = idp.mint(groups=["bench"], ttl=3600)
    tmp = tempfile.mkdtemp(prefix="authplane-bench-")
    with open(os.path.join(tmp, "upstream.yaml"), "w") as f:
        f.write(UPSTREAM)
    upstream = EnvoyProcess(os.path.join(tmp, "upstream.yaml"), concurrency=1).start()
    results: list[dict[str, object]] = []
    try:
        upstream.wait_ready()
        d = write_policies(os.path.join(tmp, "policies"), policies(
            upstream.listener_port("upstream"), json.dumps(idp.jwks())))
        for workers in (int(w) for w in args.workers.split(",")):
            svc = DecisionService(d, workers)
            opts = CompileOptions(authz_grpc=f"127.0.0.1:{svc.grpc_port}",
                                  authz_http=f"127.0.0.1:{svc.http_port}")
            envoy = start_static_envoy(d, "edge", tmp, opts)
            try:
                port = envoy.listener_port("edge/http")
                passes = [("throughput", args.connections, SCENARIOS)]
                if workers == 1:
                    passes.append(("light", args.latency_connections, LIGHT))
                for kind, connections, names in passes:
                    for name in names:
                        if name not in only or (workers > 1 and name in NO_DECISION_SERVICE):
                            continue  # these involve no decision service
                        r = scenario(name, port, svc, token, args.duration, connections)
                        results.append({"scenario": name, "workers": workers, "load": kind,
                                        "connections": connections, **r})
                        if not args.json:
                            print(f"{kind:<10} {name:<17} workers={workers} c={connections:<3} "
                                  f"{r['rps']:>8.0f} req/s  p50 {r['p50']:.2f} ms  p99 {r['p99']:.2f} ms"
                                  f"{'  NON-2xx: ' + str(r['errors']) if r['errors'] else ''}", flush=True)
            finally:
                envoy.stop()
                svc.stop()
    finally:
        upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    report(results, args)


def report(results: list[dict[str, object]], args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(results, indent=1))
        return
    base = {r["load"]: r for r in results if r["scenario"] == "no-auth"}
    if "throughput" in base:
        print(f"\nThroughput relative to no-auth ({os.cpu_count()} cores shared by wrk, both Envoys "
              "and the decision service):")
        for r in results:
            if r["load"] == "throughput":
                print(f"  {r['scenario']:<17} workers={r['workers']}  "
                      f"{100 * float(r['rps']) / float(base['throughput']['rps']):5.1f}%")
    if "light" in base:
        print(f"\nAdded latency over no-auth at {args.latency_connections} connections:")
        for r in results:
            if r["load"] == "light" and r["scenario"] != "no-auth":
                print(f"  {r['scenario']:<17} p50 +{float(r['p50']) - float(base['light']['p50']):.2f} ms"
                      f"  p99 +{float(r['p99']) - float(base['light']['p99']):.2f} ms")


if __name__ == "__main__":
    main()
