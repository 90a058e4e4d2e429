"""``authplane serve`` driving real Envoys (Delta and SotW bootstraps) over loopback.

Two Envoys of fleet ``edge`` share the gateway's port (SO_REUSEPORT); each test pins one kept-alive
client connection to each of them, so every check runs against both.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from authplane.envoy_bin import EnvoyProcess
from tests.support.http import metric_sum, request
from tests.support.policies import backend, documents, gateway, write_policies
from tests.support.ports import free_port, wait_for
from tests.support.processes import ServeProcess, envoy_stat, pin_connections, start_envoys


def listener_names(envoy: EnvoyProcess) -> set[str]:
    _, body = envoy.admin_get("/listeners?format=json")
    return {lst["name"] for lst in json.loads(body).get("listener_statuses", [])}


def prefix_rules(*names: str) -> str:
    """Route rules ``/<name>`` → echo, as a YAML flow sequence body."""
    return ", ".join(f"{{name: {n}, match: {{pathPrefix: /{n}}}, backend: echo}}" for n in names)


def flip(methods: str) -> str:
    return f"""
        kind: AuthPolicy
        metadata: {{name: flip}}
        spec:
          targetRef: {{kind: Route, name: app, rule: flip}}
          authorization:
            rules:
              - {{name: by-method, action: allow, when: {{methods: [{methods}]}}}}
        """


def test_fleets_statuses_live_edits_and_rejected_changes(tmp_path, processes, jwks_file, idp, echo, sample_authz):
    envoys, serves = processes
    edge_port, internal_port = free_port(), free_port()
    d = write_policies(str(tmp_path / "policies"), {
        "gateway.yaml": documents(
            gateway("edge", edge_port), gateway("internal", internal_port), backend("echo", echo.port),
            backend("sample-authz", sample_authz.port, http2=True), """
            kind: AuthPolicy
            metadata: {name: edge-jwt}
            spec:
              targetRef: {kind: Gateway, name: edge}
              jwt:
                providers:
                  - {name: dev, issuer: "https://idp.authplane.test", audiences: [api], jwks: {file: jwks.json}}
            """),
        "routes.yaml": f"""
            kind: Route
            metadata: {{name: app}}
            spec:
              gateway: edge
              rules: [{prefix_rules("api", "admin", "byo", "flip")}, {{name: health, match: {{path: /healthz}},
                       backend: echo}}]
            ---
            kind: Route
            metadata: {{name: inside}}
            spec: {{gateway: internal, rules: [{{name: all, backend: echo}}]}}
            ---
            kind: AuthPolicy
            metadata: {{name: admins}}
            spec:
              targetRef: {{kind: Route, name: app, rule: admin}}
              authorization: {{rules: [{{name: admins, action: allow, when: {{claims: {{groups: [admins]}}}}}}]}}
            ---
            kind: AuthPolicy
            metadata: {{name: byo}}
            spec: {{targetRef: {{kind: Route, name: app, rule: byo}}, extAuth: {{service: sample-authz}}}}
            ---
            kind: AuthPolicy
            metadata: {{name: health}}
            spec: {{targetRef: {{kind: Route, name: app, rule: health}}, public: true}}
            """,
        "flip.yaml": flip("POST"),
    })
    serves.append(serve := ServeProcess(d, str(tmp_path)).wait_started())
    envoys += start_envoys(str(tmp_path), serve.xds, [
        ("edge-1", "edge", True), ("edge-2", "edge", False), ("internal-1", "internal", True)])
    serve.wait_in_sync("edge-1", "edge-2", "internal-1")
    status = serve.status()
    assert {n["id"]: n["protocol"] for n in status["nodes"]} == {
        "edge-1": "delta", "edge-2": "sotw", "internal-1": "delta"}
    assert [listener_names(e) for e in envoys] == [{"edge/http"}, {"edge/http"}, {"internal/http"}]

    conns = list(pin_connections(edge_port, envoys[:2], "edge_http").values())
    token = {"authorization": f"Bearer {idp.mint()}"}
    admin = {"authorization": f"Bearer {idp.mint(groups=['admins'])}"}

    def on_both(path: str, headers: dict[str, str] | None = None) -> list[int]:
        return [request(edge_port, path, headers=headers, conn=c).status for c in conns]

    assert on_both("/api/x") == [401, 401]
    assert on_both("/api/x", token) == [200, 200]
    assert on_both("/admin", token) == [403, 403]
    assert on_both("/admin", admin) == [200, 200]
    assert on_both("/byo", token) == [403, 403]
    assert on_both("/byo", {**token, "x-ext-authz": "allow"}) == [200, 200]
    assert request(internal_port, "/anything").status == 200  # fleet internal: its own gateway only
    assert on_both("/flip", token) == [403, 403]

    # A save flips the route on both Envoys, on the kept-alive connections too, and back.
    write_policies(d, {"flip.yaml": flip("GET")})
    wait_for(lambda: on_both("/flip", token) == [200, 200], "/flip allowed on both Envoys")
    assert request(edge_port, "/flip", headers=token).status == 200
    write_policies(d, {"flip.yaml": flip("POST")})
    wait_for(lambda: on_both("/flip", token) == [403, 403], "/flip denied again on both Envoys")
    version = serve.status()["fleets"]["edge"]["version"]

    # Invalid YAML, then a dangling reference: rejected whole, reported with file and line.
    flip_path = os.path.join(d, "flip.yaml")
    for text, expected in (("kind: AuthPolicy\nmetadata: {name: flip\n", "YAML"),
                           (flip("GET").replace("rule: flip", "rule: nope"), "'nope'")):
        write_policies(d, {"flip.yaml": text})

        def rejected(expected: str = expected) -> dict | None:
            error = serve.status()["last_reload_error"]
            entries = [e for e in (error or {}).get("entries", []) if e["path"] == flip_path]
            return entries[0] if entries and expected in entries[0]["message"] else None

        entry = wait_for(rejected, f"the change to be rejected ({expected})")
        problems = serve.status()["last_reload_error"]["problems"]
        assert any(p.startswith(f"{flip_path}:{entry['line']}:{entry['col']}: ") for p in problems)
        samples = serve.metrics()
        assert samples[("authplane_reload_problem", (("col", str(entry["col"])), ("line", str(entry["line"])),
                                                      ("path", flip_path)))] == 1
        assert samples[("authplane_last_reload_success", ())] == 0
        assert on_both("/flip", token) == [403, 403]  # the last good snapshot keeps serving
        assert on_both("/api/x", token) == [200, 200]
        assert serve.status()["fleets"]["edge"]["version"] == version
    assert serve.metrics()[("authplane_reloads_total", (("result", "error"),))] >= 2

    write_policies(d, {"flip.yaml": flip("GET")})  # fixed: recovers
    wait_for(lambda: on_both("/flip", token) == [200, 200], "/flip allowed after the fix")
    status = serve.status()
    assert status["last_reload_error"] is None
    assert not any(name == "authplane_reload_problem" for name, _ in serve.metrics())
    serve.wait_in_sync("edge-1", "edge-2", version=status["fleets"]["edge"]["version"])
    serve.wait_in_sync("internal-1", version=status["fleets"]["internal"]["version"])
    for c in conns:
        c.close()
    assert serve.stop(signal.SIGINT) == 0


def test_rejected_config_restart_and_unknown_fleet(tmp_path, processes, echo):
    envoys, serves = processes
    port = free_port()
    d = write_policies(str(tmp_path / "policies"), {"gateway.yaml": documents(
        gateway("edge", port), backend("echo", echo.port), "kind: Route\nmetadata: {name: app}\n"
        "spec: {gateway: edge, rules: [{name: open, backend: echo}]}")})
    serves.append(serve := ServeProcess(d, str(tmp_path)).wait_started())
    envoys += start_envoys(str(tmp_path), serve.xds, [
        ("edge-1", "edge", True), ("edge-2", "edge", False), ("stray-1", "nowhere", True)])
    serve.wait_in_sync("edge-1", "edge-2", "stray-1")  # the stray Envoy is ready, with nothing
    assert listener_names(envoys[2]) == set()
    assert "node 'stray-1': unknown fleet 'nowhere'" in serve.log()
    conns = list(pin_connections(port, envoys[:2], "edge_http").values())
    assert [request(port, "/x", conn=c).status for c in conns] == [200, 200]

    # Valid for authplane, rejected by Envoy: an address it cannot bind.
    write_policies(d, {"bad.yaml": documents(
        gateway("bad", free_port(), fleet="edge").replace("127.0.0.1", "192.0.2.1"),
        "kind: Route\nmetadata: {name: bad}\nspec: {gateway: bad, rules: [{name: open, backend: echo}]}")})

    def rejections() -> list[dict] | None:
        nodes = [serve.node(n) for n in ("edge-1", "edge-2")]
        rejs = [n["last_rejection"] for n in nodes]
        return rejs if all(r and r["active"] for r in rejs) and all(n["state"] == "rejected" for n in nodes) else None

    bad_path = os.path.join(d, "bad.yaml")
    for rej in wait_for(rejections, "both Envoys to reject the listener"):
        assert rej["type"] == "listeners" and rej["resources"] == ["bad/http"]
        assert "192.0.2.1" in rej["error_detail"]
        assert rej["sources"] == [f"Gateway 'bad' ({bad_path}:1:1)"]
    assert [request(port, "/x", conn=c).status for c in conns] == [200, 200]  # old config serves
    cli = subprocess.run([sys.executable, "-m", "authplane.cli", "status", "--admin", serve.address],
                         capture_output=True, text=True, timeout=30)
    assert cli.returncode == 0 and "REJECTS listeners" in cli.stdout and f"{bad_path}:1:1" in cli.stdout
    # no resend loop: nothing more is asked or sent while the rejected version stands
    before = serve.metrics()
    time.sleep(2)
    after = serve.metrics()
    for name in ("authplane_xds_requests_total", "authplane_xds_pushes_total", "authplane_xds_nacks_total"):
        assert metric_sum(after, name) == metric_sum(before, name), name
    assert metric_sum(after, "authplane_xds_nacks_total") == 2

    os.unlink(bad_path)
    wait_for(lambda: all(not serve.node(n)["last_rejection"]["active"] for n in ("edge-1", "edge-2")),
             "the rejection to be resolved")
    version = serve.status()["fleets"]["edge"]["version"]
    serve.wait_in_sync("edge-1", "edge-2", version=version)

    # Kill the control plane while requests flow; restart it: Envoys keep serving, resync, no churn.
    churn = ["listener_manager.listener_added", "listener_manager.listener_modified",
             "listener_manager.listener_removed", "cluster_manager.cluster_modified"]
    stats_before = [[envoy_stat(e, s) for s in churn] for e in envoys[:2]]
    results: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                results.append(request(port, "/x").status)
            except OSError:
                results.append(0)
            time.sleep(0.01)

    client = threading.Thread(target=traffic)
    client.start()
    try:
        serve.stop(signal.SIGKILL)
        time.sleep(0.5)
        serves.append(again := ServeProcess(d, str(tmp_path), serve.xds_port).wait_started())
        again.wait_in_sync("edge-1", "edge-2", version=version)
        again.wait_in_sync("stray-1")
        assert again.status()["fleets"]["edge"]["version"] == version
    finally:
        stop.set()
        client.join()
    assert results and set(results) == {200}, f"{len(results)} requests, statuses {set(results)}"
    assert [[envoy_stat(e, s) for s in churn] for e in envoys[:2]] == stats_before
    for c in conns:
        c.close()
    assert again.stop(signal.SIGTERM) == 0
    assert request(port, "/x").status == 200  # Envoy keeps its config without a control plane


def builtin_policy(header_value: str) -> str:
    return f"""
        kind: AuthPolicy
        metadata: {{name: decide}}
        spec:
          targetRef: {{kind: Route, name: app}}
          extAuth:
            service: builtin
            rules:
              - {{name: allow, action: allow, when: {{headers: {{x-pass: [{header_value}]}}}},
                 upstreamHeaders: {{x-decided-by: authplane}}}}
              - {{name: rest, action: deny, deny: {{status: 403, body: "no pass"}}}}
        """


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_runs_the_decision_service_and_reloads_its_rules(tmp_path, processes, echo, workers):
    """``serve`` alone is the whole control plane: Envoy's builtin ext_authz reaches the decision
    service (in the same process, or in worker processes), and a saved rule change is enforced
    like any other edit."""
    envoys, serves = processes
    port, grpc_port, http_port = free_port(), free_port(), free_port()
    d = write_policies(str(tmp_path / "policies"), {
        "gateway.yaml": documents(gateway("edge", port), backend("echo", echo.port),
                                  "kind: Route\nmetadata: {name: app}\n"
                                  "spec: {gateway: edge, rules: [{name: all, backend: echo}]}"),
        "decide.yaml": builtin_policy("one")})
    serves.append(serve := ServeProcess(
        d, str(tmp_path), 0, "--authz-grpc", f"127.0.0.1:{grpc_port}", "--authz-http", f"127.0.0.1:{http_port}",
        "--authz-grpc-listen", f"127.0.0.1:{grpc_port}", "--authz-http-listen", f"127.0.0.1:{http_port}",
        "--authz-workers", str(workers),
    ).wait_started())
    assert (serve.authz_grpc, serve.authz_http) == (f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}")
    envoys += start_envoys(str(tmp_path), serve.xds, [("edge-1", "edge", True)])
    serve.wait_in_sync("edge-1")

    denied = request(port, "/x")
    assert (denied.status, denied.body) == (403, "no pass")
    allowed = request(port, "/x", headers={"x-pass": "one"})
    assert allowed.status == 200 and allowed.json()["headers"]["x-decided-by"] == "authplane"

    write_policies(d, {"decide.yaml": builtin_policy("two")})
    wait_for(lambda: request(port, "/x", headers={"x-pass": "two"}).status == 200, "the new rule to apply")
    assert request(port, "/x", headers={"x-pass": "one"}).status == 403
    assert metric_sum(serve.metrics(), "authplane_authz_decisions_total") >= 3
    if workers > 1:
        children = subprocess.run(["pgrep", "-P", str(serve.proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == workers
        assert serve.stop(signal.SIGTERM) == 0
        assert all(not os.path.exists(f"/proc/{pid}") for pid in children)  # workers stopped with it
