"""Builtin rules decided inside Envoy (``extAuth.engine: native``) against no auth and the HTTP
decision service, side by side in one run, through one Envoy (one worker).

    python bench/native_rules.py [--duration 5] [--connections 64] [--latency-connections 1]

Scenarios (wrk, HTTP/1.1 keep-alive, the rules of bench/authz.py):
  no-auth        the route has no policy
  native-rules   the same rules in authplane's dynamic module (libauthplane_rules.so, built here)
  builtin-http   the same rules over ext_authz HTTP (the decision service, decision cache off)

Ratios are against no-auth in the same run; the added latency is measured at one connection.
Everything shares this machine's cores (wrk, both Envoys, the decision service); installs wrk
when missing and needs rustc for the module.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from authplane.compiler.ir import CompileOptions  # noqa: E402
from authplane.envoy_bin import EnvoyProcess  # noqa: E402
from tests.support.policies import write_policies  # noqa: E402
from tests.support.processes import start_static_envoy  # noqa: E402


def _load(name: str, path: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


base = _load("bench_authz", os.path.join(ROOT, "bench", "authz.py"))
build = _load("native_build", os.path.join(ROOT, "native", "build.py"))

SCENARIOS = ("no-auth", "native-rules", "builtin-http")


def policies(upstream_port: int) -> dict[str, str]:
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
            - {{name: native-rules, match: {{pathPrefix: /native-rules}}, backend: up}}
            - {{name: builtin-http, match: {{pathPrefix: /builtin-http}}, backend: up}}
        """]
    for name, engine in (("native-rules", "native"), ("builtin-http", "service")):
        docs.append(f"kind: AuthPolicy\nmetadata: {{name: {name}}}\nspec:\n"
                    f"  targetRef: {{kind: Route, name: r, rule: {name}}}\n  extAuth:\n"
                    f"    service: builtin\n    engine: {engine}\n    cache: {{allowTtl: 0s, denyTtl: 0s}}\n"
                    + textwrap.indent(textwrap.dedent(base.RULES).strip("\n"), "    "))
    return {"bench.yaml": "\n---\n".join(textwrap.dedent(d).strip("\n") for d in docs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--latency-connections", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    base.ensure_tools()
    tmp = tempfile.mkdtemp(prefix="authplane-bench-native-")
    os.environ["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] = str(build.build_rules(tmp).parent)
    with open(os.path.join(tmp, "upstream.yaml"), "w") as f:
        f.write(base.UPSTREAM)
    upstream = EnvoyProcess(os.path.join(tmp, "upstream.yaml"), concurrency=1).start()
    results: list[dict[str, object]] = []
    try:
        upstream.wait_ready()
        d = write_policies(os.path.join(tmp, "policies"), policies(upstream.listener_port("upstream")))
        svc = base.DecisionService(d, 1)
        envoy = start_static_envoy(d, "edge", tmp, CompileOptions(authz_grpc=f"127.0.0.1:{svc.grpc_port}",
                                                                  authz_http=f"127.0.0.1:{svc.http_port}"))
        try:
            port = envoy.listener_port("edge/http")
            for kind, connections in (("throughput", args.connections), ("light", args.latency_connections)):
                for name in SCENARIOS:
                    r = base.wrk(f"http://127.0.0.1:{port}/{name}/x", {"x-ext-authz": "allow"}, args.duration,
                                 connections)
                    results.append({"scenario": name, "load": kind, "connections": connections, **r})
                    if not args.json:
                        print(f"{kind:<10} {name:<13} c={connections:<3} {r['rps']:>8.0f} req/s  "
                              f"p50 {r['p50']:.3f} ms  p99 {r['p99']:.3f} ms"
                              f"{'  NON-2xx: ' + str(r['errors']) if r['errors'] else ''}", flush=True)
        finally:
            envoy.stop()
            svc.stop()
    finally:
        upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    by = {(r["load"], r["scenario"]): r for r in results}
    print(f"\nRelative to no-auth in the same run ({os.cpu_count()} cores shared by wrk, both Envoys and "
          "the decision service):")
    for name in SCENARIOS[1:]:
        ratio = float(by["throughput", name]["rps"]) / float(by["throughput", "no-auth"]["rps"])
        p99 = float(by["light", name]["p99"]) - float(by["light", "no-auth"]["p99"])
        print(f"  {name:<13} throughput {ratio:.2f}   added p99 at {args.latency_connections} connection(s) "
              f"{p99:+.3f} ms")


if __name__ == "__main__":
    main()
