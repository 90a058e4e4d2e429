"""Two ``authplane serve`` replicas on one policy directory are interchangeable for an Envoy whose
bootstrap lists both: killing the one it is connected to moves it to the other, which serves the
same versions (content hashes) and keeps delivering policy edits."""

from __future__ import annotations

import os
import shlex
import signal
from typing import Any

import yaml

from authplane.controlplane.bootstrap import bootstrap_yaml
from authplane.envoy_bin import EnvoyProcess, validate_config
from tests.cli.test_cli import run
from tests.support.http import request
from tests.support.policies import backend, documents, gateway, write_policies
from tests.support.ports import free_port, wait_for
from tests.support.processes import ServeProcess, envoy_stat


def routes(*prefixes: str) -> str:
    rules = ", ".join(f"{{name: {p}, match: {{pathPrefix: /{p}}}, backend: echo}}" for p in prefixes)
    return f"kind: Route\nmetadata: {{name: app}}\nspec: {{gateway: edge, rules: [{rules}]}}"


def connected_node(serve: ServeProcess, node_id: str) -> dict[str, Any] | None:
    return next((n for n in serve.status()["nodes"] if n["id"] == node_id and n["connected"]), None)


def fleet_versions(serve: ServeProcess) -> dict[str, str]:
    return {f: info["version"] for f, info in serve.status()["fleets"].items()}


def test_envoy_fails_over_to_the_other_replica(tmp_path, processes, echo):
    envoys, serves = processes
    port = free_port()
    d = write_policies(str(tmp_path / "policies"), {
        "gateway.yaml": documents(gateway("edge", port), backend("echo", echo.port)),
        "routes.yaml": routes("a")})
    for name in ("one", "two"):
        work = os.path.join(str(tmp_path), name)
        os.makedirs(work)
        serves.append(ServeProcess(d, work, 0, "--no-authz"))
    for serve in serves:
        serve.wait_started()
    assert fleet_versions(serves[0]) == fleet_versions(serves[1])  # same directory, same content hashes

    path = os.path.join(str(tmp_path), "edge-1.yaml")
    with open(path, "w") as f:
        f.write(bootstrap_yaml("edge-1", "edge", [s.xds for s in serves], admin_port=0))
    envoys.append(envoy := EnvoyProcess(path, log_path=os.path.join(str(tmp_path), "edge-1.log")).start())
    envoy.wait_ready()

    def holder() -> ServeProcess | None:
        """The one replica the Envoy's single ADS stream is on, once it runs the current version."""
        found = [s for s in serves if connected_node(s, "edge-1")]
        return found[0] if len(found) == 1 and found[0].node("edge-1")["state"] == "in sync" else None

    first = wait_for(holder, "edge-1 in sync with one replica", 20)
    other = next(s for s in serves if s is not first)
    version = first.node("edge-1")["current_version"]
    assert version == fleet_versions(other)["edge"]
    assert request(port, "/a").status == 200 and request(port, "/b").status == 404

    first.stop(signal.SIGKILL)
    other.wait_in_sync("edge-1", version=version, timeout=30)  # reconnected, and nothing to change
    assert envoy_stat(envoy, "control_plane.connected_state") == 1
    assert set(other.node("edge-1")["acked"].values()) == {version}

    write_policies(d, {"routes.yaml": routes("a", "b")})
    wait_for(lambda: request(port, "/b").status == 200, "the edit to reach the Envoy through the other replica", 20)
    new = fleet_versions(other)["edge"]
    assert new != version
    other.wait_in_sync("edge-1", version=new)


def test_bootstrap_lists_every_replica():
    r = run("bootstrap", "--node-id", "edge-1", "--fleet", "edge", "--xds", "10.0.0.1:18000", "--xds", "cp-2:18001")
    assert r.returncode == 0, r.stderr
    (xds,) = yaml.safe_load(r.stdout)["static_resources"]["clusters"]
    (locality,) = xds["load_assignment"]["endpoints"]
    endpoints = [e["endpoint"]["address"]["socket_address"] for e in locality["lb_endpoints"]]
    assert endpoints == [{"address": "10.0.0.1", "port_value": 18000}, {"address": "cp-2", "port_value": 18001}]
    assert xds["type"] == "STRICT_DNS"  # a host name among them: Envoy resolves it
    command = next(line for line in r.stdout.splitlines() if line.startswith("# Written by: "))
    assert run(*shlex.split(command.removeprefix("# Written by: "))[1:]).stdout == r.stdout  # the header reproduces it
    ok, out = validate_config(r.stdout)
    assert ok, out

    tls = run("bootstrap", "--node-id", "n", "--fleet", "f", "--xds", "cp-1:1", "--xds", "cp-2:1", "--xds-ca", "ca.pem")
    assert tls.returncode == 2 and tls.stdout == "" and "--xds-server-name" in tls.stderr
    named = run("bootstrap", "--node-id", "n", "--fleet", "f", "--xds", "cp-1:1", "--xds", "cp-2:1", "--xds-ca",
                "ca.pem", "--xds-server-name", "authplane.internal")
    assert named.returncode == 0 and "sni: authplane.internal" in named.stdout
