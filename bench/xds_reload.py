"""File save → the change is enforced by two real Envoys (one Delta, one SotW ADS).

Target (README, Figures): p99 ≤ 250 ms. Each edit flips an authorization rule of one route
(403 ↔ 200) by renaming a new version of the policy file over the old one (as editors save);
the time runs from the rename until a kept-alive connection to *each* Envoy sees the new status.
Everything (control plane, two Envoys, echo upstream, this client) shares this machine's loopback.

    python bench/xds_reload.py [--edits 50]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from authplane.devtools.echo import EchoServer  # noqa: E402
from tests.support.http import request  # noqa: E402
from tests.support.policies import HEAD  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.processes import ServeProcess, pin_connections, start_envoys  # noqa: E402


def policies(port: int, echo_port: int) -> str:
    docs = [
        f"kind: Gateway\nmetadata: {{name: edge}}\n"
        f"spec: {{fleet: edge, listeners: [{{name: http, port: {port}, address: 127.0.0.1}}]}}\n",
        f"kind: Backend\nmetadata: {{name: echo}}\nspec: {{endpoints: ['127.0.0.1:{echo_port}']}}\n",
        "kind: Route\nmetadata: {name: app}\nspec:\n  gateway: edge\n  rules:\n"
        "    - {name: flip, match: {pathPrefix: /flip}, backend: echo}\n"
        "    - {name: health, match: {path: /healthz}, backend: echo}\n",
    ]
    return "---\n".join(HEAD + doc for doc in docs)


def flip(method: str) -> str:
    return (HEAD + "kind: AuthPolicy\nmetadata: {name: flip}\nspec:\n"
            "  targetRef: {kind: Route, name: app, rule: flip}\n"
            f"  authorization: {{rules: [{{name: m, action: allow, when: {{methods: [{method}]}}}}]}}\n")


def save(path: str, text: str) -> None:
    tmp = path + ".new"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=50)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="authplane-bench-reload-")
    d = os.path.join(work, "policies")
    os.makedirs(d)
    echo = EchoServer().start()
    port = free_port()
    with open(os.path.join(d, "gateway.yaml"), "w") as f:
        f.write(policies(port, echo.port))
    flip_path = os.path.join(d, "flip.yaml")
    save(flip_path, flip("POST"))
    serve = ServeProcess(d, work, 0, "--log-level", "warning").wait_started()
    envoys = []
    try:
        envoys = start_envoys(work, serve.xds, [("edge-1", "edge", True), ("edge-2", "edge", False)])
        serve.wait_in_sync("edge-1", "edge-2")
        conns = list(pin_connections(port, envoys, "edge_http").values())
        per_envoy: list[list[float]] = [[], []]
        totals: list[float] = []
        for i in range(args.edits):
            method, want = ("GET", 200) if i % 2 == 0 else ("POST", 403)
            seen: list[float | None] = [None, None]
            start = time.perf_counter()
            save(flip_path, flip(method))
            while None in seen:
                if time.perf_counter() - start > 10:
                    raise RuntimeError(f"edit {i}: not enforced within 10 s")
                for k, conn in enumerate(conns):
                    if seen[k] is None and request(port, "/flip", conn=conn).status == want:
                        seen[k] = time.perf_counter() - start
            for k in range(2):
                per_envoy[k].append(seen[k] or 0.0)
            totals.append(max(s or 0.0 for s in seen))
            time.sleep(0.05)
        ms = [t * 1000 for t in totals]
        print(f"save → enforced on both Envoys, {args.edits} edits (ms): p50 {pct(ms, 50):.0f}  "
              f"p99 {pct(ms, 99):.0f}  max {max(ms):.0f}  mean {statistics.mean(ms):.0f}   (target p99 ≤ 250)")
        for k, label in enumerate(("edge-1 (Delta)", "edge-2 (SotW)")):
            v = [t * 1000 for t in per_envoy[k]]
            print(f"  {label}: p50 {pct(v, 50):.0f}  p99 {pct(v, 99):.0f}")
        return 0
    finally:
        for envoy in envoys:
            envoy.stop()
        serve.stop(signal.SIGTERM)
        echo.stop()


if __name__ == "__main__":
    sys.exit(main())
