"""Large repositories: serve cold start and one-file edits until a real Envoy enforces them.

Generates a repository of N routes in files of 100 routes (one team a directory, each route with
a JWT + RBAC AuthPolicy; the JWKS file is shared), starts ``authplane serve`` and one Envoy, and
measures:
- cold start → Envoy enforcing: from spawning ``serve`` until the Envoy (started as soon as
  serve listens) answers 200 to an allowed request and 403 to a denied one on the last route;
- one-file edit → Envoy enforcing, p50/p99 over ``--edits`` edits: each edit flips the allowed
  group of one route in one team's file (403 ↔ 200), renamed over the old file as editors save;
  the time runs from the rename until a kept-alive connection sees the new status;
- ``render --format json`` time (and CLI start-up alone: ``authplane --help``);
- serve's peak RSS (VmHWM) at the end;
- an invalid save of one file: the time until ``/status`` reports it at its path:line:col, and
  that the Envoy still enforces the last good snapshot.

Issue 17 targets: see README (Figures).

    python bench/reload.py [--sizes 1000,10000] [--edits 20]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from authplane.devtools.echo import EchoServer  # noqa: E402
from authplane.devtools.idp import DevIdentityProvider  # noqa: E402
from tests.support.http import request  # noqa: E402
from tests.support.policies import HEAD  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.processes import ServeProcess, start_envoys  # noqa: E402

PER_FILE = 100
ISSUER = "https://idp.authplane.test"


def route_docs(i: int, group: str) -> str:
    return (f"{HEAD}kind: Route\nmetadata: {{name: r{i}}}\nspec:\n  gateway: edge\n"
            f"  rules: [{{name: main, match: {{pathPrefix: /svc{i}/}}, backend: echo}}]\n---\n"
            f"{HEAD}kind: AuthPolicy\nmetadata: {{name: p{i}}}\nspec:\n  targetRef: {{kind: Route, name: r{i}}}\n"
            f"  jwt: {{providers: [{{name: corp, issuer: '{ISSUER}', audiences: [api], "
            "jwks: {file: ../jwks.json}}]}\n"
            "  authorization:\n    rules:\n"
            f"      - {{name: team, action: allow, when: {{claims: {{groups: [{group}]}}}}}}\n")


def team_file(team: int, flipped: dict[int, str]) -> str:
    return "---\n".join(route_docs(i, flipped.get(i, f"team{team}"))
                        for i in range(team * PER_FILE, (team + 1) * PER_FILE))


def save(path: str, text: str) -> None:
    with open(path + ".new", "w") as f:
        f.write(text)
    os.replace(path + ".new", path)


def generate(d: str, n: int, port: int, echo_port: int, jwks: dict[str, object]) -> None:
    with open(os.path.join(d, "jwks.json"), "w") as f:
        json.dump(jwks, f)
    with open(os.path.join(d, "gateway.yaml"), "w") as f:
        f.write(f"{HEAD}kind: Gateway\nmetadata: {{name: edge}}\n"
                f"spec: {{fleet: edge, listeners: [{{name: http, port: {port}, address: 127.0.0.1}}]}}\n---\n"
                f"{HEAD}kind: Backend\nmetadata: {{name: echo}}\nspec: {{endpoints: ['127.0.0.1:{echo_port}']}}\n")
    for team in range(n // PER_FILE):
        os.makedirs(os.path.join(d, f"team{team:03d}"))
        with open(os.path.join(d, f"team{team:03d}", "routes.yaml"), "w") as f:
            f.write(team_file(team, {}))


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def wait_status(port: int, path: str, token: str, want: int, timeout: float,
                conn: http.client.HTTPConnection | None = None) -> float:
    start = time.perf_counter()
    while True:
        try:
            status = request(port, path, headers={"authorization": f"Bearer {token}"}, conn=conn).status
        except OSError:
            status = 0
            if conn is not None:
                raise
        if status == want:
            return time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            raise RuntimeError(f"{path}: still {status}, want {want} after {timeout} s")
        time.sleep(0.002 if conn is not None else 0.05)


def cli_seconds(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "authplane.cli", *args], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def invalid_edit(serve: ServeProcess, d: str, port: int, tokens: dict[int, str], teams: int,
                 flipped: dict[int, dict[int, str]], conn: http.client.HTTPConnection) -> tuple[float, str]:
    """An invalid save of one team's file (an unknown backend on its last route, and the route
    flipped as well): (ms until ``/status`` reports it with the file's path:line:col, the first
    problem). Then checks that the Envoy still enforces the last good snapshot on that route."""
    team = teams - 1
    i = (team + 1) * PER_FILE - 1
    want = 403 if i in flipped[team] else 200
    path = os.path.join(d, f"team{team:03d}", "routes.yaml")
    text = team_file(team, {**flipped[team], i: "nobody" if want == 200 else f"team{team}"})
    head, sep, tail = text.rpartition("backend: echo")
    start = time.perf_counter()
    save(path, head + sep + "-missing" + tail)
    where = f"team{team:03d}/routes.yaml:"
    while True:
        error = serve.status().get("last_reload_error") or {}
        found = [p for p in error.get("problems", []) if where in p]
        if found:
            reported = (time.perf_counter() - start) * 1000
            break
        if time.perf_counter() - start > 60:
            raise RuntimeError(f"the invalid edit of {path} was not reported: {error}")
        time.sleep(0.01)
    time.sleep(0.5)  # had the change gone through, the Envoy would have it by now
    status = request(port, f"/svc{i}/x", headers={"authorization": f"Bearer {tokens[team]}"}, conn=conn).status
    if status != want:
        raise RuntimeError(f"after the invalid edit /svc{i}/x answers {status}, want {want} (last good)")
    save(path, team_file(team, flipped[team]))
    return reported, found[0]


def measure(n: int, edits: int, echo: EchoServer, idp: DevIdentityProvider) -> dict[str, float | str]:
    work = tempfile.mkdtemp(prefix=f"authplane-bench-reload-{n}-")
    d = os.path.join(work, "policies")
    os.makedirs(d)
    port = free_port()
    generate(d, n, port, echo.port, idp.jwks())
    teams = n // PER_FILE
    tokens = {t: idp.mint(groups=[f"team{t}"]) for t in range(teams)}
    render = cli_seconds("render", d, "--fleet", "edge", "--format", "json")
    started = time.perf_counter()
    serve = ServeProcess(d, work, 0, "--log-level", "warning")
    envoys = []
    try:
        serve.wait_started(timeout=120)
        listening = time.perf_counter() - started
        envoys = start_envoys(work, serve.xds, [("edge-1", "edge", True)])
        last = n - 1
        wait_status(port, f"/svc{last}/x", tokens[teams - 1], 200, 120)
        wait_status(port, f"/svc{last}/x", tokens[0] if teams > 1 else idp.mint(groups=["x"]), 403, 30)
        cold = time.perf_counter() - started
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        flipped: dict[int, dict[int, str]] = {t: {} for t in range(teams)}
        times: list[float] = []
        for k in range(edits):
            team = (k * 7) % teams
            i = team * PER_FILE + (k * 13) % PER_FILE
            deny = i not in flipped[team]
            if deny:
                flipped[team][i] = "nobody"
            else:
                del flipped[team][i]
            text = team_file(team, flipped[team])
            start = time.perf_counter()
            save(os.path.join(d, f"team{team:03d}", "routes.yaml"), text)
            wait_status(port, f"/svc{i}/x", tokens[team], 403 if deny else 200, 60, conn)
            times.append(time.perf_counter() - start)
            time.sleep(0.2)  # the next edit is a new save, not part of this one's debounce
        invalid_ms, problem = invalid_edit(serve, d, port, tokens, teams, flipped, conn)
        rss = peak_rss_mb(serve.proc.pid)
        return {"routes": n, "render_s": render, "listening_s": listening, "cold_s": cold,
                "edit_p50_ms": pct(times, 50) * 1000, "edit_p99_ms": pct(times, 99) * 1000,
                "edit_max_ms": max(times) * 1000, "rss_mb": rss, "invalid_ms": invalid_ms,
                "problem": problem}
    finally:
        for envoy in envoys:
            envoy.stop()
        serve.stop(signal.SIGTERM, timeout=60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000", help="route counts, multiples of 100")
    ap.add_argument("--edits", type=int, default=20)
    args = ap.parse_args()
    echo = EchoServer().start()
    idp = DevIdentityProvider(issuer=ISSUER)
    try:
        startup = cli_seconds("--help")
        print(f"CLI start-up alone (authplane --help): {startup:.2f} s")
        print(f"{'routes':>7} {'render':>8} {'serve listens':>14} {'cold→enforcing':>15} "
              f"{'edit p50':>9} {'edit p99':>9} {'edit max':>9} {'serve RSS':>10}")
        for n in (int(s) for s in args.sizes.split(",")):
            r = measure(n, args.edits, echo, idp)
            print(f"{n:>7} {r['render_s']:>6.2f} s {r['listening_s']:>12.2f} s {r['cold_s']:>13.2f} s "
                  f"{r['edit_p50_ms']:>6.0f} ms {r['edit_p99_ms']:>6.0f} ms {r['edit_max_ms']:>6.0f} ms "
                  f"{r['rss_mb']:>7.0f} MB", flush=True)
            print(f"{'':>7} invalid edit reported in {r['invalid_ms']:.0f} ms, last good kept serving: "
                  f"{r['problem']}", flush=True)
        return 0
    finally:
        echo.stop()


if __name__ == "__main__":
    sys.exit(main())
