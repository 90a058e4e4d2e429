"""Compile time and peak memory for 100 / 1,000 / 10,000 routes, each with a route-level policy.

Targets (README, Figures): 1,000 routes ≤ 150 ms, 10,000 routes ≤ 1.5 s (compile: model → Envoy
resources and versions). Loading and validating the YAML is reported separately.

    python bench/compile.py [--sizes 100,1000,10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc

HEAD = "apiVersion: authplane.dev/v1alpha1\n"


def policy_texts(n: int) -> dict[str, str]:
    jwks = json.dumps({"keys": [{"kty": "RSA", "n": "sXch", "e": "AQAB", "kid": "k"}]})
    docs = [
        "kind: Gateway\nmetadata: {name: edge}\nspec: {fleet: edge, listeners: [{name: http, port: 8080}]}",
        "kind: Backend\nmetadata: {name: echo}\nspec: {endpoints: ['127.0.0.1:9000']}",
        "kind: AuthPolicy\nmetadata: {name: edge}\nspec:\n  targetRef: {kind: Gateway, name: edge}\n"
        f"  jwt: {{providers: [{{name: corp, jwks: {{inline: {jwks}}}}}]}}",
    ]
    for i in range(n):
        docs.append(f"kind: Route\nmetadata: {{name: r{i}}}\nspec:\n  gateway: edge\n"
                    f"  rules: [{{name: main, match: {{pathPrefix: /svc{i}}}, backend: echo}}]")
        docs.append(f"kind: AuthPolicy\nmetadata: {{name: p{i}}}\nspec:\n"
                    f"  targetRef: {{kind: Route, name: r{i}}}\n"
                    "  authorization:\n    rules:\n"
                    f"      - {{name: team, action: allow, when: {{claims: {{groups: [team{i}]}}, "
                    "methods: [GET, POST]}}\n"
                    "      - {name: no-delete, action: deny, when: {methods: [DELETE]}}")
    return {"bench/policies.yaml": "\n---\n".join(HEAD + d for d in docs)}


def measure(n: int, repeat: int) -> dict[str, float]:
    from authplane.compiler.resources import GUARD_ROUTE
    from authplane.compiler.snapshot import compile_policies
    from authplane.policy.loader import load_texts

    texts = policy_texts(n)
    load_s, compile_s = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        policies = load_texts(texts)
        t1 = time.perf_counter()
        snaps = compile_policies(policies)
        t2 = time.perf_counter()
        load_s.append(t1 - t0)
        compile_s.append(t2 - t1)
    routes = sum(r.name != GUARD_ROUTE for rc in snaps["edge"].resources[
        "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"].values()
        for vh in rc.virtual_hosts for r in vh.routes)
    assert routes == n, routes
    tracemalloc.start()
    compile_policies(policies)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"routes": n, "load_ms": min(load_s) * 1000, "compile_ms": min(compile_s) * 1000,
            "compile_peak_mb": peak / 2**20,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.repeat)))
        return
    targets = {1000: 150.0, 10000: 1500.0}
    print(f"{'routes':>7} {'load+validate':>14} {'compile':>9} {'target':>8} {'compile peak':>13} {'max RSS':>8}")
    for n in (int(s) for s in args.sizes.split(",")):
        # one process per size, so peak memory is not inherited from a larger run
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--repeat", str(args.repeat)],
                             capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        r = json.loads(out.stdout)
        target = f"≤{targets[n]:.0f}" if n in targets else "-"
        print(f"{n:>7} {r['load_ms']:>11.0f} ms {r['compile_ms']:>6.0f} ms {target:>8} "
              f"{r['compile_peak_mb']:>10.1f} MB {r['max_rss_mb']:>5.0f} MB")


if __name__ == "__main__":
    main()
