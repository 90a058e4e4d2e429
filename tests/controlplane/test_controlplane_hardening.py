"""``serve`` under hostile or unlucky conditions: a restart on a broken directory, SIGTERM during
a stuck reload, checks during a reload that holds the server, and ADS clients that send too much,
send control characters or claim another node's id. Real Envoys, real gRPC, real processes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
import pytest

from authplane.authz.component import decision_service
from authplane.cli import build_parser
from authplane.compiler.ir import CompileOptions
from authplane.compiler.resources import CLUSTER
from authplane.controlplane.admin import format_status
from authplane.controlplane.ads import MAX_REQUEST_BYTES
from authplane.controlplane.app import ControlPlane, ServeConfig
from authplane.controlplane.stream import MAX_ID, MAX_NAMES, MAX_TYPES
from authplane.envoy_bin import EnvoyProcess
from tests.support.ads import AdsClient, sotw_request
from tests.support.http import metric_sum, request
from tests.support.policies import backend, documents, gateway, write_policies
from tests.support.ports import free_port, wait_for
from tests.support.processes import InProcess, ServeProcess, start_envoys


def app_route(port: int, echo_port: int) -> str:
    return documents(gateway("edge", port), backend("echo", echo_port),
                     "kind: Route\nmetadata: {name: app}\nspec: {gateway: edge, rules: [{name: all, backend: echo}]}")


def methods_policy(methods: str) -> str:
    return f"""
        kind: AuthPolicy
        metadata: {{name: by-method}}
        spec:
          targetRef: {{kind: Route, name: app}}
          authorization:
            rules:
              - {{name: allowed, action: allow, when: {{methods: [{methods}]}}}}
        """


def save_until(directory: str, files: dict[str, str], done: Callable[[], object], what: str) -> None:
    """Save ``files`` until ``done()``: serve's watcher starts just after serve reports its
    addresses, so a save made at once can precede the watch (saving again is harmless)."""
    def saved() -> object:
        write_policies(directory, files)
        try:
            return wait_for(done, what, timeout=2)
        except AssertionError:
            return False

    wait_for(saved, what, timeout=60, every=0)


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_allow_empty_restart_on_a_broken_directory_keeps_every_envoy_config(tmp_path, processes, echo):
    envoys, serves = processes
    port = free_port()
    d = write_policies(str(tmp_path / "policies"), {"app.yaml": app_route(port, echo.port),
                                                    "policy.yaml": methods_policy("GET")})
    serves.append(first := ServeProcess(d, str(tmp_path), 0, "--no-authz").wait_started())
    envoys += start_envoys(str(tmp_path), first.xds, [("edge-1", "edge", True)])
    first.wait_in_sync("edge-1")
    assert (request(port, "/x").status, request(port, "/x", "POST").status) == (200, 403)

    first.stop(signal.SIGKILL)
    write_policies(d, {"policy.yaml": methods_policy("GET").replace("action: allow", "action: maybe")})
    serves.append(second := ServeProcess(d, str(tmp_path), first.xds_port, "--no-authz", "--allow-empty"))
    second.wait_started()
    assert http_status(f"http://{second.address}/readyz") == 503
    assert http_status(f"http://{second.address}/healthz") == 200
    node = wait_for(lambda: next((n for n in second.status()["nodes"] if n["connected"]), None),
                    "the Envoy to reconnect to the second serve")
    assert (node["id"], node["state"], node["current_version"]) == ("edge-1", "waiting", None)
    text = format_status(second.status())
    assert "in sync" not in text and "edge-1: sent nothing yet" in text
    # the Envoy got no response: it keeps its listener and its rules
    assert (request(port, "/x").status, request(port, "/x", "POST").status) == (200, 403)

    save_until(d, {"policy.yaml": methods_policy("GET, POST")},  # fixed, and different
               lambda: request(port, "/x", "POST").status == 200, "the fixed directory to reach the Envoy")
    second.wait_in_sync("edge-1")
    assert http_status(f"http://{second.address}/readyz") == 200


@contextmanager
def trickling_provider() -> Iterator[tuple[str, threading.Event]]:
    """An OpenID provider that answers its discovery document one byte every 0.2 s, for ever:
    each read ends well within the client's socket timeout, so whoever fetches it is stuck.
    Yields its issuer URL and an event set once a fetch has started."""
    server = socket.create_server(("127.0.0.1", 0))
    fetching, stop = threading.Event(), threading.Event()

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n")
                fetching.set()
                while not stop.wait(0.2):
                    conn.sendall(b" ")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", fetching
    finally:
        stop.set()
        server.close()
        thread.join(10)


def sso_policy(issuer: str) -> str:
    return f"""
        kind: AuthPolicy
        metadata: {{name: sso}}
        spec:
          targetRef: {{kind: Gateway, name: edge}}
          oidc:
            issuer: "{issuer}"
            clientId: app
            clientSecret: {{file: secret.txt}}
            cookie: {{domain: .localtest}}
        """


def test_sigterm_stops_serve_during_a_stuck_reload(tmp_path):
    """A reload stuck in its worker thread (here fetching an OpenID discovery document that never
    ends) does not keep serve alive. SIGTERM is an orderly stop: the reload is dropped, streams and
    the decision process are closed, and serve exits 0 (not the signal's code)."""
    d = write_policies(str(tmp_path / "policies"), {"app.yaml": app_route(free_port(), 9),
                                                    "secret.txt": "development-only\n"})
    serve = ServeProcess(d, str(tmp_path), 0).wait_started()
    try:
        with trickling_provider() as (issuer, fetching):
            save_until(d, {"sso.yaml": sso_policy(issuer)}, fetching.is_set, "the reload to fetch discovery")
            assert serve.stop(signal.SIGTERM, timeout=30) == 0
    finally:
        serve.stop(signal.SIGKILL)
    assert "reload abandoned: stopping" in serve.log()


def builtin_policy() -> str:
    return """
        kind: AuthPolicy
        metadata: {name: decide}
        spec:
          targetRef: {kind: Route, name: app}
          extAuth:
            service: builtin
            timeout: 10s
            rules:
              - {name: allow, action: allow, when: {headers: {x-pass: [one]}}}
              - {name: rest, action: deny, deny: {status: 403}}
        """


def test_checks_get_their_answer_while_a_reload_holds_the_server(tmp_path, echo):
    """The default decision service does not share the server's event loop: a reload step that
    holds it (here a revision hook that blocks, as loading and compiling a large repository does)
    delays no check. Envoy waits up to 10 s for a decision, so a check that waited for the
    reload would time out with 503."""
    port, grpc_port, http_port = free_port(), free_port(), free_port()
    grpc_addr, http_addr = f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}"
    d = write_policies(str(tmp_path / "policies"), {"app.yaml": app_route(port, echo.port),
                                                    "decide.yaml": builtin_policy()})
    cp = ControlPlane(ServeConfig(d, CompileOptions(authz_grpc=grpc_addr, authz_http=http_addr),
                                  xds="127.0.0.1:0", admin="127.0.0.1:0", watch=False))
    authz = decision_service(build_parser().parse_args(["serve"]).authz_workers, grpc_addr, http_addr)
    cp.add_component(authz, registry=authz.registry, on_revision=authz.on_revision)
    holding, entered, release = threading.Event(), threading.Event(), threading.Event()

    def slow_reload_step(_rev: object) -> None:
        if holding.is_set():
            entered.set()
            release.wait(60)

    cp.store.add_hook(slow_reload_step)
    cp.load()
    plane = InProcess(cp)
    envoys: list[EnvoyProcess] = []
    try:
        envoys += start_envoys(str(tmp_path), plane.xds, [("edge-1", "edge", True)])
        plane.wait_in_sync("edge-1")
        assert request(port, "/x", headers={"x-pass": "one"}).status == 200

        holding.set()
        write_policies(d, {"app.yaml": app_route(port, echo.port).replace("name: all", "name: every")})
        reload = asyncio.run_coroutine_threadsafe(cp.store.reload(), plane.loop)
        wait_for(entered.is_set, "the reload to hold the server")
        answers = [request(port, "/x", headers={"x-pass": "one"} if i % 2 == 0 else {}).status for i in range(6)]
        assert not reload.done()  # every check was answered while the reload held the loop
        release.set()
        assert reload.result(30)
        assert answers == [200, 403] * 3
    finally:
        release.set()
        for envoy in envoys:
            envoy.stop()
        plane.close()


def test_a_second_stream_claiming_a_real_nodes_id_cannot_rewrite_its_status(tmp_path, processes, echo):
    envoys, serves = processes
    port = free_port()
    d = write_policies(str(tmp_path / "policies"), {"app.yaml": app_route(port, echo.port)})
    serves.append(serve := ServeProcess(d, str(tmp_path), 0, "--no-authz").wait_started())
    envoys += start_envoys(str(tmp_path), serve.xds, [("edge-1", "edge", True)])
    serve.wait_in_sync("edge-1")

    impostor = AdsClient(serve.xds, delta=False)
    try:
        impostor.send(sotw_request(CLUSTER, node_id="edge-1", fleet="edge"))
        r = impostor.recv()
        impostor.send(sotw_request(CLUSTER, nonce=r.nonce, error="forged: cluster echo rejected"))
        wait_for(lambda: metric_sum(serve.metrics(), "authplane_xds_nacks_total") == 1, "the impostor's NACK")
        node = serve.node("edge-1")
        assert (node["state"], node["connected"], node["last_rejection"]) == ("in sync", True, None)
        assert node["protocol"] == "delta" and len(node["other_streams"]) == 1  # the real Envoy's row
        assert node["other_streams"][0]["protocol"] == "sotw"
        text = format_status(serve.status())
        assert "REJECTS" not in text and "edge-1: another stream claims this id (sotw from" in text
        assert "a second stream (sotw ADS from" in serve.log()
    finally:
        impostor.close()
    wait_for(lambda: serve.node("edge-1")["other_streams"] == [], "the impostor's stream to be gone")
    serve.wait_in_sync("edge-1")


@pytest.fixture
def plane(tmp_path) -> Iterator[InProcess]:
    d = write_policies(str(tmp_path / "policies"), {"app.yaml": app_route(18997, 9)})  # never bound
    cp = ControlPlane(ServeConfig(d, xds="127.0.0.1:0", admin="127.0.0.1:0", watch=False))
    cp.load()
    running = InProcess(cp)
    yield running
    running.close()


def refused(client: AdsClient) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        client.recv()
    return raised.value


def test_oversized_client_input_ends_only_that_stream_with_a_clear_status(plane, caplog):
    caplog.set_level(logging.INFO, logger="authplane.xds")
    clients: list[AdsClient] = []

    def client() -> AdsClient:
        clients.append(AdsClient(plane.xds, delta=False))
        return clients[-1]

    try:
        long_id = "n" * (MAX_ID + 1)
        c = client()
        c.send(sotw_request(CLUSTER, node_id=long_id, fleet="edge"))
        e = refused(c)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.details() == f"authplane: node.id is {MAX_ID + 1} characters long: at most {MAX_ID} allowed"
        assert long_id not in caplog.text and plane.status()["nodes"] == []

        c = client()
        c.send(sotw_request(CLUSTER, [f"n{i}" for i in range(MAX_NAMES + 1)], node_id="many-names", fleet="edge"))
        assert refused(c).code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        c = client()  # a message over the size limit is refused by gRPC before it is buffered whole
        c.send(sotw_request(CLUSTER, node_id="huge", fleet="edge", error="e" * MAX_REQUEST_BYTES))
        assert refused(c).code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        c = client()
        c.send(sotw_request(CLUSTER, node_id="many-types", fleet="edge"))
        c.recv()
        for i in range(1, MAX_TYPES):  # unknown types are answered (empty), up to the bound
            c.send(sotw_request(f"type.googleapis.com/made.up.Type{i}"))
            assert list(c.recv().resources) == []
        labels = {dict(labels)["type"] for (name, labels) in plane.metrics() if name == "authplane_xds_requests_total"}
        assert labels <= {"clusters", "endpoints", "listeners", "routes", "secrets", "other"} and "other" in labels
        c.send(sotw_request(f"type.googleapis.com/made.up.Type{MAX_TYPES}"))
        assert refused(c).code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        c = client()  # the server goes on serving everyone else
        c.send(sotw_request(CLUSTER, node_id="fine", fleet="edge"))
        assert [r.type_url for r in c.recv().resources] == [CLUSTER]
    finally:
        for c in clients:
            c.close()


def test_node_ids_with_control_characters_cannot_fake_status_rows(plane):
    evil = "evil\x1b[2J\rfake-node  edge  sotw  in sync\n"
    c = AdsClient(plane.xds, delta=False)
    try:
        c.send(sotw_request(CLUSTER, node_id=evil, fleet="edge"))
        r = c.recv()
        c.send(sotw_request(CLUSTER, nonce=r.nonce, error="bad\x1b[31m\nfake-node: REJECTS everything"))
        wait_for(lambda: plane.node(evil)["last_rejection"], "the NACK")
        text = format_status(plane.status())
    finally:
        c.close()
    assert not any(ch in text for ch in "\x1b\r")
    assert not any(line.startswith("fake-node") for line in text.splitlines())
    assert "evil\\x1b[2J\\rfake-node  edge  sotw  in sync\\n" in text


def test_a_trickling_discovery_document_cannot_hold_a_load(tmp_path):
    """Every read of a trickling provider ends within the socket timeout; the fetch as a whole
    still ends at the discovery timeout, with an error on the policy's issuer field."""
    from authplane.policy import oidc

    with trickling_provider() as (issuer, _fetching), pytest.raises(oidc.OidcError, match="not complete within 1s"):
        oidc.discover(issuer + "/never", timeout=1.0)  # the old code never returned
