"""Through ``authplane serve`` and a real Envoy: route rules without names are served under their
derived names, and an edit of builtin decision rules changes the version status, log and metrics
show (the rules' digest is part of the fleet's Envoy config)."""

from __future__ import annotations

import json

from authplane.envoy_bin import EnvoyProcess
from tests.support.http import request
from tests.support.policies import backend, documents, gateway, write_policies
from tests.support.ports import free_port, wait_for
from tests.support.processes import ServeProcess, start_envoys


def decide(action: str) -> str:
    return f"""
        kind: AuthPolicy
        metadata: {{name: decide}}
        spec:
          targetRef: {{kind: Route, name: app}}
          extAuth:
            service: builtin
            rules:
              - {{name: by-header, action: {action}, when: {{headers: {{x-pass: ["1"]}}}}}}
              - {{name: rest, action: deny}}
        """


def route_names(envoy: EnvoyProcess) -> set[str]:
    _, body = envoy.admin_get("/config_dump?resource=dynamic_route_configs")
    return {r["name"] for c in json.loads(body)["configs"]
            for vh in c["route_config"].get("virtual_hosts", []) for r in vh.get("routes", [])}


def snapshot_versions(serve: ServeProcess) -> set[str]:
    return {dict(labels)["version"] for (name, labels), value in serve.metrics().items()
            if name == "authplane_snapshot_info" and value == 1}


def test_unnamed_rules_and_builtin_rule_edit_change_the_version(tmp_path, processes, echo):
    envoys, serves = processes
    port = free_port()
    d = write_policies(str(tmp_path / "policies"), {
        "gateway.yaml": documents(
            gateway("edge", port), backend("echo", echo.port),
            "kind: Route\nmetadata: {name: app}\n"
            "spec: {gateway: edge, rules: [{match: {pathPrefix: /app}, backend: echo}]}",
            "kind: Route\nmetadata: {name: open}\nspec: {gateway: edge, rules: [{backend: echo}]}"),
        "decide.yaml": decide("allow")})
    http_port = free_port()
    serves.append(serve := ServeProcess(d, str(tmp_path), 0, "--authz-http", f"127.0.0.1:{http_port}",
                                        "--authz-http-listen", f"127.0.0.1:{http_port}").wait_started())
    envoys += start_envoys(str(tmp_path), serve.xds, [("edge-1", "edge", True)])
    serve.wait_in_sync("edge-1")
    assert {"app/rule-0", "open/rule-0"} <= route_names(envoys[0])
    assert request(port, "/open").status == 200
    assert request(port, "/app", headers={"x-pass": "1"}).status == 200
    before = serve.status()["fleets"]["edge"]["version"]
    serve.wait_in_sync("edge-1", version=before)
    assert snapshot_versions(serve) == {before}

    write_policies(d, {"decide.yaml": decide("deny")})
    wait_for(lambda: request(port, "/app", headers={"x-pass": "1"}).status == 403, "the deny rule to apply")
    after = wait_for(lambda: serve.status()["fleets"]["edge"]["version"] != before
                     and serve.status()["fleets"]["edge"]["version"], "a new fleet version in status")
    serve.wait_in_sync("edge-1", version=after)  # Envoy acked it: status shows it for the node
    assert snapshot_versions(serve) == {after}
    assert f"edge {after} (was {before})" in serve.log()
    reloads = {dict(labels)["result"]: value for (name, labels), value in serve.metrics().items()
               if name == "authplane_reloads_total"}
    assert reloads.get("unchanged", 0) == 0 and reloads["applied"] >= 2
