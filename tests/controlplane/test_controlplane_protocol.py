"""ADS protocol behaviour of ``serve`` over real gRPC (SotW and Delta), with a raw client.

The control plane runs in-process without the file watcher; tests change policies and reload.
"""

from __future__ import annotations

import logging

import grpc
import pytest

from authplane.compiler.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE
from authplane.controlplane.app import ControlPlane, ServeConfig
from tests.support.ads import AdsClient, delta_request, sotw_request
from tests.support.policies import documents, gateway, write_policies
from tests.support.ports import wait_for
from tests.support.processes import InProcess

GATEWAY = documents(gateway("edge", 18999), gateway("internal", 18998))  # never bound: no Envoy here


def backends(echo_timeout: str = "2s", other: bool = True, other_timeout: str = "2s") -> str:
    text = f"""
        kind: Backend
        metadata: {{name: echo}}
        spec: {{endpoints: ["127.0.0.1:9"], connectTimeout: {echo_timeout}}}
        """
    if other:
        text += f"""
        ---
        kind: Backend
        metadata: {{name: other}}
        spec: {{endpoints: ["127.0.0.2:9"], connectTimeout: {other_timeout}}}
        """
    return text


def routes(timeout: str = "5s", other: bool = True) -> str:
    text = f"""
        kind: Route
        metadata: {{name: app}}
        spec:
          gateway: edge
          rules:
            - {{name: a, match: {{pathPrefix: /a}}, backend: echo, timeout: {timeout}}}
        """
    if other:
        text += """
            - {name: b, match: {pathPrefix: /b}, backend: other}
        """
    return text


@pytest.fixture
def plane(tmp_path):
    d = write_policies(str(tmp_path / "policies"), {
        "gateway.yaml": GATEWAY, "backends.yaml": backends(), "routes.yaml": routes()})
    cp = ControlPlane(ServeConfig(d, xds="127.0.0.1:0", admin="127.0.0.1:0", watch=False))
    cp.load()
    running = InProcess(cp)
    clients: list[AdsClient] = []

    def client(delta: bool) -> AdsClient:
        clients.append(AdsClient(running.xds, delta))
        return clients[-1]

    def edit(files: dict[str, str]) -> None:
        write_policies(d, files)
        assert running.run(cp.store.reload())

    running.client = client  # type: ignore[attr-defined]
    running.edit = edit  # type: ignore[attr-defined]
    yield running
    for c in clients:
        c.close()
    running.close()


def names(response) -> list[str]:
    return [r.name for r in response.resources]


def unpacked_names(response, type_url: str) -> list[str]:
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.endpoint.v3 import endpoint_pb2
    from envoy.config.listener.v3 import listener_pb2
    from envoy.config.route.v3 import route_pb2

    cls = {CLUSTER: cluster_pb2.Cluster, LISTENER: listener_pb2.Listener, ROUTE: route_pb2.RouteConfiguration,
           ENDPOINT: endpoint_pb2.ClusterLoadAssignment}[type_url]
    out = []
    for any_msg in response.resources:
        assert any_msg.type_url == type_url
        msg = cls()
        any_msg.Unpack(msg)
        out.append(msg.cluster_name if type_url == ENDPOINT else msg.name)
    return out


def test_sotw_wildcard_named_ack_and_push_of_changed_types_only(plane):
    c = plane.client(delta=False)
    version = plane.status()["fleets"]["edge"]["version"]
    c.send(sotw_request(CLUSTER, node_id="edge-1", fleet="edge"))
    r = c.recv()
    assert (r.type_url, r.version_info) == (CLUSTER, version)
    assert r.nonce and r.control_plane.identifier == "authplane"
    assert unpacked_names(r, CLUSTER) == ["echo", "other"]
    c.send(sotw_request(CLUSTER, nonce=r.nonce, version=r.version_info))  # ACK: nothing more to send
    c.send(sotw_request(LISTENER))
    r = c.recv()
    assert unpacked_names(r, LISTENER) == ["edge/http"]  # only the fleet's gateway
    c.send(sotw_request(LISTENER, nonce=r.nonce, version=r.version_info))
    c.send(sotw_request(ROUTE, ["edge/http", "no-such-route"]))
    r = c.recv()
    assert unpacked_names(r, ROUTE) == ["edge/http"]  # a name the fleet lacks is simply absent
    c.send(sotw_request(ROUTE, ["edge/http", "no-such-route"], nonce=r.nonce, version=r.version_info))
    c.send(sotw_request(ENDPOINT, ["echo"]))
    r = c.recv()
    assert unpacked_names(r, ENDPOINT) == ["echo"]  # named: only what was asked for
    c.send(sotw_request(ENDPOINT, ["echo"], nonce=r.nonce, version=r.version_info))
    c.expect_nothing()
    plane.wait_in_sync("edge-1", version=version)

    plane.edit({"routes.yaml": routes(timeout="7s")})  # only the route configuration changes
    new = plane.status()["fleets"]["edge"]["version"]
    assert new != version
    r = c.recv()
    assert (r.type_url, r.version_info, unpacked_names(r, ROUTE)) == (ROUTE, new, ["edge/http"])
    c.expect_nothing()
    c.send(sotw_request(ROUTE, ["edge/http", "no-such-route"], nonce=r.nonce, version=r.version_info))
    plane.wait_in_sync("edge-1", version=new)  # unchanged types count as running the new version
    assert set(plane.node("edge-1")["acked"].values()) == {new}


def test_sotw_change_waits_for_ack_and_stale_nonces_are_ignored(plane):
    c = plane.client(delta=False)
    c.send(sotw_request(CLUSTER, node_id="edge-1", fleet="edge"))
    first = c.recv()
    plane.edit({"backends.yaml": backends(echo_timeout="3s")})
    c.expect_nothing()  # no request is waiting: the change goes out with the answer to the ACK
    c.send(sotw_request(CLUSTER, nonce=first.nonce, version=first.version_info))
    second = c.recv()
    assert second.version_info != first.version_info and second.nonce != first.nonce
    c.send(sotw_request(CLUSTER, nonce=first.nonce, version=first.version_info))  # stale
    c.expect_nothing()


def test_sotw_nack_is_recorded_traced_and_not_resent(plane):
    c = plane.client(delta=False)
    c.send(sotw_request(CLUSTER, node_id="edge-1", fleet="edge"))
    good = c.recv()
    c.send(sotw_request(CLUSTER, nonce=good.nonce, version=good.version_info))
    plane.edit({"backends.yaml": backends(echo_timeout="3s")})
    bad = c.recv()
    error = "Error adding/updating cluster(s) echo: something Envoy dislikes"
    c.send(sotw_request(CLUSTER, nonce=bad.nonce, version=good.version_info, error=error))
    c.expect_nothing(0.6)  # the rejected version is not sent again

    node = plane.node("edge-1")
    assert node["state"] == "rejected"
    assert node["acked"]["clusters"] == good.version_info  # Envoy keeps the last good version
    rej = node["last_rejection"]
    assert rej["active"] and rej["type"] == "clusters" and rej["version"] == bad.version_info
    assert rej["error_detail"] == error and rej["resources"] == ["echo"]
    assert len(rej["sources"]) == 1 and rej["sources"][0].startswith("Backend 'echo' (")
    assert "backends.yaml:1:1)" in rej["sources"][0]
    assert plane.metrics()[("authplane_xds_nacks_total", (("type", "clusters"),))] == 1

    plane.edit({"routes.yaml": routes(timeout="9s")})  # a change elsewhere: clusters not resent
    c.expect_nothing()
    plane.edit({"backends.yaml": backends(echo_timeout="4s")})  # new cluster content: sent once
    fixed = c.recv()
    c.send(sotw_request(CLUSTER, nonce=fixed.nonce, version=fixed.version_info))
    wait_for(lambda: plane.node("edge-1")["acked"]["clusters"] == fixed.version_info, "the ACK")
    node = plane.node("edge-1")
    assert node["state"] != "rejected" and node["last_rejection"]["active"] is False


def test_delta_sends_only_changes_removals_and_missing_names(plane):
    c = plane.client(delta=True)
    c.send(delta_request(CLUSTER, node_id="edge-1", fleet="edge"))  # legacy wildcard
    r = c.recv()
    assert names(r) == ["echo", "other"] and not r.removed_resources
    versions = {res.name: res.version for res in r.resources}
    c.send(delta_request(CLUSTER, nonce=r.nonce))
    c.send(delta_request(ROUTE, subscribe=["edge/http", "no-such-route"]))
    r = c.recv()
    assert names(r) == ["edge/http"] and list(r.removed_resources) == ["no-such-route"]  # "does not exist"
    c.send(delta_request(ROUTE, nonce=r.nonce))
    c.expect_nothing()

    plane.edit({"backends.yaml": backends(echo_timeout="3s")})
    r = c.recv()
    assert (r.type_url, names(r), list(r.removed_resources)) == (CLUSTER, ["echo"], [])
    assert r.system_version_info == plane.status()["fleets"]["edge"]["version"]
    c.send(delta_request(CLUSTER, nonce=r.nonce))
    versions["echo"] = r.resources[0].version
    c.expect_nothing()

    plane.edit({"routes.yaml": routes(other=False), "backends.yaml": backends(echo_timeout="3s", other=False)})
    r = c.recv()
    assert (r.type_url, names(r), list(r.removed_resources)) == (CLUSTER, [], ["other"])
    c.send(delta_request(CLUSTER, nonce=r.nonce))
    r = c.recv()
    assert (r.type_url, names(r), list(r.removed_resources)) == (ROUTE, ["edge/http"], [])
    c.send(delta_request(ROUTE, nonce=r.nonce))
    plane.wait_in_sync("edge-1")


def test_delta_reconnect_with_current_versions_gets_nothing_new(plane):
    c = plane.client(delta=True)
    c.send(delta_request(CLUSTER, node_id="edge-1", fleet="edge"))
    r = c.recv()
    versions = {res.name: res.version for res in r.resources}
    c.close()

    again = plane.client(delta=True)  # a restarted control plane sees exactly this
    again.send(delta_request(CLUSTER, node_id="edge-1", fleet="edge", initial=versions))
    r = again.recv()
    assert (names(r), list(r.removed_resources)) == ([], [])  # answered, nothing resent
    assert r.system_version_info == plane.status()["fleets"]["edge"]["version"]

    stale = plane.client(delta=True)
    stale.send(delta_request(CLUSTER, node_id="edge-2", fleet="edge",
                             initial={"echo": "old", "other": versions["other"], "gone": "x"}))
    r = stale.recv()
    assert (names(r), list(r.removed_resources)) == (["echo"], ["gone"])


def test_delta_nack_keeps_rejection_until_the_resource_changes(plane):
    c = plane.client(delta=True)
    c.send(delta_request(CLUSTER, node_id="edge-1", fleet="edge"))
    r = c.recv()
    c.send(delta_request(CLUSTER, nonce=r.nonce))
    plane.edit({"backends.yaml": backends(echo_timeout="3s")})
    bad = c.recv()
    c.send(delta_request(CLUSTER, nonce=bad.nonce, error="cluster echo: rejected"))
    c.expect_nothing()
    # "other" changes: sent alone; echo (still the rejected content) is not resent
    plane.edit({"backends.yaml": backends(echo_timeout="3s", other_timeout="5s")})
    r = c.recv()
    assert names(r) == ["other"]
    c.send(delta_request(CLUSTER, nonce=r.nonce))
    c.expect_nothing()
    assert plane.node("edge-1")["state"] == "rejected"
    plane.edit({"backends.yaml": backends(echo_timeout="4s", other_timeout="5s")})
    r = c.recv()
    assert names(r) == ["echo"]
    c.send(delta_request(CLUSTER, nonce=r.nonce))
    plane.wait_in_sync("edge-1")


def test_unknown_fleet_gets_an_empty_config_and_a_warning(plane, caplog):
    caplog.set_level(logging.WARNING, logger="authplane.xds")
    c = plane.client(delta=False)
    c.send(sotw_request(CLUSTER, node_id="stray-1", fleet="nowhere"))
    r = c.recv()
    assert list(r.resources) == [] and r.version_info
    c.send(sotw_request(CLUSTER, nonce=r.nonce, version=r.version_info))
    d = plane.client(delta=True)
    d.send(delta_request(LISTENER, node_id="stray-2", fleet="nowhere"))
    r = d.recv()
    assert list(r.resources) == [] and list(r.removed_resources) == []
    d.send(delta_request(LISTENER, nonce=r.nonce))
    plane.wait_in_sync("stray-1", "stray-2")
    assert plane.node("stray-1")["known_fleet"] is False
    assert "node 'stray-1': unknown fleet 'nowhere'" in caplog.text


def test_shutdown_ends_streams_with_ok(tmp_path):
    d = write_policies(str(tmp_path / "p"), {"gateway.yaml": GATEWAY, "backends.yaml": backends(),
                                              "routes.yaml": routes()})
    cp = ControlPlane(ServeConfig(d, xds="127.0.0.1:0", admin="127.0.0.1:0", watch=False))
    cp.load()
    running = InProcess(cp)
    c = AdsClient(running.xds, delta=True)
    try:
        c.send(delta_request(CLUSTER, node_id="edge-1", fleet="edge"))
        c.recv()
        running.close()
        c._reader.join(10)
        assert c.call.code() == grpc.StatusCode.OK
    finally:
        c.close()
