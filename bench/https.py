"""HTTPS through Envoy relative to plain HTTP, and the added latency of client-certificate validation.

    python bench/https.py [--duration 5] [--connections 32] [--handshakes 400]

Scenarios (one Envoy, one worker, a second Envoy as the upstream answering with a direct response):
  http / https             wrk, HTTP/1.1 keep-alive
  http-new / https-new     wrk with ``connection: close``: a TCP (and TLS) handshake per request
  handshake / handshake-mtls
                           sequential new TLS connections from Python (one request each), without
                           and with a client certificate the listener verifies (``mode: require``);
                           the p50/p99 difference is what client-certificate validation adds

Certificates are minted into a temporary directory (EC P-256). Everything shares this machine's
cores (see ``nproc``): read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import ssl
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]

from authz import UPSTREAM, ensure_tools, wrk  # noqa: E402

from authplane.envoy_bin import EnvoyProcess  # noqa: E402
from tests.support.certs import CA  # noqa: E402
from tests.support.policies import write_policies  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.processes import ServeProcess, start_envoys  # noqa: E402


def policies(ports: dict[str, int], upstream: int) -> dict[str, str]:
    tls = "certificates: [{certFile: tls/edge.crt, keyFile: tls/edge.key}]"
    return {"bench.yaml": f"""
        kind: Gateway
        metadata: {{name: edge}}
        spec:
          fleet: edge
          listeners:
            - {{name: http, port: {ports["http"]}, address: 127.0.0.1}}
            - {{name: https, port: {ports["https"]}, address: 127.0.0.1, protocol: https, tls: {{{tls}}}}}
            - name: mtls
              port: {ports["mtls"]}
              address: 127.0.0.1
              protocol: https
              tls: {{{tls}, clientValidation: {{caFile: tls/clients-ca.crt}}}}
        ---
        kind: Backend
        metadata: {{name: up}}
        spec: {{endpoints: ["127.0.0.1:{upstream}"]}}
        ---
        kind: Route
        metadata: {{name: r}}
        spec: {{gateway: edge, rules: [{{name: all, backend: up}}]}}
        """}


def handshakes(port: int, ctx: ssl.SSLContext, count: int) -> dict[str, float]:
    """Latency of ``count`` sequential new TLS connections, each sending one request."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # else delayed ACKs dominate
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            while s.recv(65536):
                pass
        times.append((time.perf_counter() - start) * 1000)
    q = statistics.quantiles(times, n=100)
    return {"rps": count / (sum(times) / 1000), "p50": q[49], "p99": q[98], "errors": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--handshakes", type=int, default=400)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ensure_tools()
    tmp = tempfile.mkdtemp(prefix="authplane-bench-https-")
    upstream_boot = os.path.join(tmp, "upstream.yaml")
    with open(upstream_boot, "w") as f:
        f.write(UPSTREAM)
    upstream = EnvoyProcess(upstream_boot).start()
    serve = None
    envoys: list[EnvoyProcess] = []
    try:
        upstream.wait_ready()
        directory = os.path.join(tmp, "policies")
        server_ca, client_ca = CA(os.path.join(directory, "tls"), "edge-ca"), CA(os.path.join(directory, "tls"),
                                                                                 "clients-ca")
        server_ca.issue("edge", ["localhost"])
        client = client_ca.issue("client", ["spiffe://bench/client"], client=True)
        ports = {"http": free_port(), "https": free_port(), "mtls": free_port()}
        write_policies(directory, policies(ports, upstream.listener_port("upstream")))
        serve = ServeProcess(directory, tmp).wait_started()
        envoys = start_envoys(tmp, serve.xds, [("bench", "edge", True)])
        serve.wait_in_sync("bench")
        ctx = ssl.create_default_context(cafile=server_ca.path)
        mtls = ssl.create_default_context(cafile=server_ca.path)
        mtls.load_cert_chain(client.cert, client.key)
        results = []
        for name, url, headers in (
                ("http", f"http://127.0.0.1:{ports['http']}/", {}),
                ("https", f"https://localhost:{ports['https']}/", {}),
                ("http-new", f"http://127.0.0.1:{ports['http']}/", {"connection": "close"}),
                ("https-new", f"https://localhost:{ports['https']}/", {"connection": "close"})):
            results.append({"scenario": name, **wrk(url, headers, args.duration, args.connections)})
        results.append({"scenario": "handshake", **handshakes(ports["https"], ctx, args.handshakes)})
        results.append({"scenario": "handshake-mtls", **handshakes(ports["mtls"], mtls, args.handshakes)})
    finally:
        for envoy in envoys:
            envoy.stop()
        if serve is not None:
            serve.stop()
        upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    by = {r["scenario"]: r for r in results}
    for r in results:
        print(f"  {r['scenario']:<15} {float(r['rps']):9.0f} req/s  p50 {float(r['p50']):6.2f} ms  "
              f"p99 {float(r['p99']):6.2f} ms  errors {r['errors']}")
    print(f"\nHTTPS relative to HTTP ({os.cpu_count()} cores shared by wrk and both Envoys): keep-alive "
          f"{100 * float(by['https']['rps']) / float(by['http']['rps']):.1f}%, new connection "
          f"{100 * float(by['https-new']['rps']) / float(by['http-new']['rps']):.1f}%")
    added = {q: float(by["handshake-mtls"][q]) - float(by["handshake"][q]) for q in ("p50", "p99")}
    print(f"Client-certificate validation adds p50 {added['p50']:+.2f} ms, p99 {added['p99']:+.2f} ms per new "
          "connection")


if __name__ == "__main__":
    main()
