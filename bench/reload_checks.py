"""Builtin checks through a real Envoy while ``serve`` reloads a large policy repository.

A repository of ``--routes`` routes, each with a builtin ext_authz policy (so both the Envoy
configuration and the decision service's rule table are large), plus one checked route. A loop
sends checks to the checked route through Envoy, alternating an allowed request (200) and a
denied one (403), while the repository is saved ``--reloads`` times (each save changes one
route's rule, so every reload compiles, pushes and swaps rules). Printed per decision-service
mode (``--workers``: 0 = in the server's process, the old default; 1 = one decision process,
the default since): latency p50/p99/max of the checks sent while a reload was in progress
(and p50 between reloads), and how many answers were not the expected 200 or 403.

    python bench/reload_checks.py [--routes 3000] [--reloads 3] [--workers 0,1]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from authplane.devtools.echo import EchoServer  # noqa: E402
from tests.support.http import request  # noqa: E402
from tests.support.policies import HEAD  # noqa: E402
from tests.support.ports import free_port, wait_for  # noqa: E402
from tests.support.processes import ServeProcess, start_envoys  # noqa: E402


def builtin(name: str, target: str, value: str) -> str:
    return (f"kind: AuthPolicy\nmetadata: {{name: {name}}}\nspec:\n  targetRef: {{kind: Route, name: {target}}}\n"
            "  extAuth:\n    service: builtin\n    rules:\n"
            f"      - {{name: allow, action: allow, when: {{headers: {{x-pass: [{value}]}}}}}}\n"
            "      - {name: rest, action: deny, deny: {status: 403}}\n")


def repository(port: int, echo_port: int, routes: int, generation: int) -> str:
    docs = [f"kind: Gateway\nmetadata: {{name: edge}}\n"
            f"spec: {{fleet: edge, listeners: [{{name: http, port: {port}, address: 127.0.0.1}}]}}\n",
            f"kind: Backend\nmetadata: {{name: echo}}\nspec: {{endpoints: ['127.0.0.1:{echo_port}']}}\n",
            "kind: Route\nmetadata: {name: checked}\n"
            "spec: {gateway: edge, rules: [{name: c, match: {pathPrefix: /checked}, backend: echo}]}\n",
            builtin("checked", "checked", "pass")]
    for i in range(routes):
        prefix = f"/svc{i}/" if i else f"/svc0-{generation}/"  # the one change of each save
        docs.append(f"kind: Route\nmetadata: {{name: r{i}}}\n"
                    f"spec: {{gateway: edge, rules: [{{name: m, match: {{pathPrefix: {prefix}}}, backend: echo}}]}}\n")
        docs.append(builtin(f"p{i}", f"r{i}", f"v{generation}" if i == 0 else f"t{i}"))
    return "---\n".join(HEAD + d for d in docs)


def save(path: str, text: str) -> None:
    with open(path + ".new", "w") as f:
        f.write(text)
    os.replace(path + ".new", path)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def run(workers: int, routes: int, reloads: int) -> None:
    work = tempfile.mkdtemp(prefix="authplane-bench-reload-checks-")
    d = os.path.join(work, "policies")
    os.makedirs(d)
    echo = EchoServer().start()
    port = free_port()
    path = os.path.join(d, "repo.yaml")
    save(path, repository(port, echo.port, routes, 0))
    authz = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    serve = ServeProcess(d, work, 0, "--log-level", "warning", "--authz-workers", str(workers),
                         "--authz-grpc", authz[0], "--authz-http", authz[1],
                         "--authz-grpc-listen", authz[0], "--authz-http-listen", authz[1])
    envoys = []
    try:
        serve.wait_started(120)
        envoys = start_envoys(work, serve.xds, [("edge-1", "edge", True)])
        serve.wait_in_sync("edge-1", timeout=120)
        assert request(port, "/checked", headers={"x-pass": "pass"}).status == 200, serve.log()[-2000:]
        reloading = threading.Event()
        done = threading.Event()

        def edits() -> None:
            try:
                for g in range(1, reloads + 1):
                    before = serve.status()["fleets"]["edge"]["version"]
                    reloading.set()
                    save(path, repository(port, echo.port, routes, g))
                    wait_for(lambda b=before: serve.status()["fleets"]["edge"]["version"] != b, "the reload", 120, 0.05)
                    serve.wait_in_sync("edge-1", timeout=120)
                    reloading.clear()
                    time.sleep(0.5)
            finally:
                done.set()

        editor = threading.Thread(target=edits)
        editor.start()
        during: list[float] = []
        idle: list[float] = []
        total = bad = 0
        statuses: dict[int, int] = {}
        while not done.is_set():
            allowed = total % 2 == 0
            start = time.perf_counter()
            status = request(port, "/checked", headers={"x-pass": "pass"} if allowed else {}).status
            elapsed = time.perf_counter() - start
            total += 1
            (during if reloading.is_set() else idle).append(elapsed * 1000)
            if status != (200 if allowed else 403):
                bad += 1
                statuses[status] = statuses.get(status, 0) + 1
        editor.join()
        mode = "in the server's process" if workers == 0 else f"{workers} decision process(es)"
        print(f"--authz-workers {workers} ({mode}), {routes} routes, {reloads} reloads: {total} checks, "
              f"{len(during)} during reloads (ms): p50 {pct(during, 50):.1f}  p99 {pct(during, 99):.1f}  "
              f"max {max(during):.1f}; between reloads p50 {pct(idle, 50):.1f}; "
              f"wrong answers {bad} {statuses or ''}")
    finally:
        for envoy in envoys:
            envoy.stop()
        serve.stop(signal.SIGTERM, timeout=60)
        echo.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--routes", type=int, default=3000)
    ap.add_argument("--reloads", type=int, default=3)
    ap.add_argument("--workers", default="0,1", help="decision-service modes to measure, comma-separated")
    args = ap.parse_args()
    for workers in (int(w) for w in args.workers.split(",")):
        run(workers, args.routes, args.reloads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
