"""The bounds of the native decision log (``serve --decision-log-transport native``): authplane's
Envoy module buffers records in Envoy (``max_bytes``) and ships them in batches over the xDS
cluster; what does not fit, or is lost with a failed call, is dropped and counted in the next
batch's header. Real Envoy, real ``authplane serve``: requests never wait for any of it."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from authplane.compiler.render import dump, to_dict
from authplane.controlplane.bootstrap import bootstrap
from authplane.envoy_bin import EnvoyProcess
from tests.support.http import request
from tests.support.native import search_path
from tests.support.policies import backend, documents, gateway, write_policies
from tests.support.ports import free_port, wait_for
from tests.support.processes import ServeProcess, start_envoys

NATIVE = ("--decision-log-transport", "native")
FLUSH_S = 0.2  # bootstrap.NATIVE_FLUSH_MS: the module's timer fires at most this often

POLICIES = """
    kind: Route
    metadata: {name: app}
    spec:
      gateway: edge
      rules:
        - {name: ro, match: {pathPrefix: /ro}, backend: echo}
        - {name: open, match: {pathPrefix: /open}, backend: echo}
    ---
    kind: AuthPolicy
    metadata: {name: read-only}
    spec:
      targetRef: {kind: Route, name: app, rule: ro}
      authorization:
        default: allow
        rules: [{name: no-deletes, action: deny, when: {methods: [DELETE]}}]
    ---
    kind: AuthPolicy
    metadata: {name: open}
    spec: {targetRef: {kind: Route, name: app, rule: open}, public: true}
"""


@pytest.fixture
def module(native_module) -> Iterator[str]:
    """Envoy (and serve's validation) find the module meanwhile."""
    with search_path(native_module):
        yield native_module


def _policies(tmp_path, port: int, echo_port: int) -> str:
    return write_policies(str(tmp_path / "policies"), {
        "policies.yaml": documents(gateway("edge", port), backend("echo", echo_port), POLICIES)})


def _lines(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f.read().splitlines()]


def _entries(serve: ServeProcess) -> dict[str, float]:
    return {dict(labels)["result"]: v for (name, labels), v in serve.metrics().items()
            if name == "authplane_decision_log_entries_total"}


def _static_listener(max_bytes: int) -> dict:
    """A listener of the bootstrap (port 0) whose access logger is the module's with ``max_bytes``,
    answering itself; its route names are compiled routes of fleet ``edge``, so serve writes their
    records (a name serve does not know is skipped, uncounted)."""
    def route(prefix: str, name: str) -> dict:
        return {"name": name, "match": {"prefix": prefix}, "direct_response": {"status": 200, "body": {
            "inline_string": "static"}}}

    logger = {"name": "envoy.access_loggers.dynamic_modules", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.dynamic_modules.v3.DynamicModuleAccessLog",
        "dynamic_module_config": {"name": "authplane_rules"}, "logger_name": "decision_log",
        "logger_config": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                          "value": json.dumps({"max_bytes": max_bytes})}}}
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                 "HttpConnectionManager",
        "stat_prefix": "bounded", "access_log": [logger],
        "route_config": {"name": "bounded", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            route("/ro", "app/ro")]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    return {"name": "bounded", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": manager}]}]}


REPORT = re.compile(r'"StreamId":"(\d+)"\] cluster \'_authplane_xds\' match for URL '
                    r"'/authplane\.decisions\.v1\.DecisionLog/Report'")
RESET = re.compile(r'"StreamId":"(\d+)"\] upstream reset')


def _router_debug(envoy: EnvoyProcess) -> None:
    """Envoy logs each upstream request with its stream id: the module's calls by their path."""
    with urllib.request.urlopen(urllib.request.Request(envoy.admin + "/logging?router=debug", method="POST"),
                                timeout=5) as r:
        assert r.status == 200


def _failed_reports(envoy: EnvoyProcess) -> set[str]:
    """Stream ids of the module's calls (``DecisionLog/Report``) that Envoy saw reset."""
    with open(envoy.log_path, errors="replace") as f:
        text = f.read()
    return set(REPORT.findall(text)) & set(RESET.findall(text))


def test_a_full_module_buffer_drops_and_counts_never_blocks(tmp_path, processes, echo, module):
    """``max_bytes: 600`` holds 6 records (``time US request_id US route US status US details
    US sub US san``: 29+36+6+3+15 bytes and 6 separators, 95 bytes, 96 with the RS between two).
    A burst of 400 is answered at once while the module sends at most 6 per timer tick (200 ms):
    the rest is dropped, counted, and reported in the next batch's header."""
    envoys, serves = processes
    log_path = str(tmp_path / "decisions.jsonl")
    serve = ServeProcess(_policies(tmp_path, free_port(), echo.port), str(tmp_path), 0,
                         "--decision-log", log_path, *NATIVE).wait_started()
    serves.append(serve)
    boot = to_dict(bootstrap("edge-1", "edge", serve.xds, admin_port=0, native_log=True))
    boot["static_resources"]["listeners"] = [_static_listener(600)]
    path = tmp_path / "edge-1.yaml"
    path.write_text(dump(boot))
    envoy = EnvoyProcess(str(path), log_path=str(tmp_path / "edge-1.log")).start()
    envoys.append(envoy)
    envoy.wait_ready()
    serve.wait_in_sync("edge-1")
    port = envoy.listener_port("bounded")
    assert _entries(serve) == {"written": 0, "dropped": 0, "failed": 0}

    burst, fits = 400, 6

    def one(_: int) -> tuple[int, float]:
        start = time.monotonic()
        status = request(port, "/ro/x").status
        return status, time.monotonic() - start

    began = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(burst)))
    elapsed = time.monotonic() - began
    assert [s for s, _ in answers] == [200] * burst
    assert max(t for _, t in answers) < 2, "a request waited"  # Envoy never waits for the log

    # Every drop is reported in the header of the next batch, sent even with no record in it.
    wait_for(lambda: sum(_entries(serve).values()) == burst, f"{burst} records written or dropped", 10)
    entries, lines = _entries(serve), _lines(log_path)
    ro = [r for r in lines if r["route"] == "app/ro"]
    assert entries["written"] == len(lines) == len(ro) and entries["failed"] == 0
    assert entries["dropped"] == burst - len(ro)
    assert 0 < len(ro) <= fits * (int(elapsed / FLUSH_S) + 2)  # at most one buffer per tick
    assert all((r["policy"], r["verdict"], r["node"]) == ("read-only", "allow", "edge-1") for r in ro)
    assert len({r["request_id"] for r in ro}) == len(ro)


def test_authplane_down_loses_batches_counts_them_and_envoy_keeps_serving(tmp_path, processes, echo, module):
    """The compiled listener's checks run in Envoy: with serve gone, requests are still decided
    (and logged into the module's buffer); the batches then fail, their records are lost and
    counted, and the next serve on the same xDS port is told how many in the first batch it gets."""
    envoys, serves = processes
    port, xds_port = free_port(), free_port()
    policies = _policies(tmp_path, port, echo.port)
    first_log, second_log = str(tmp_path / "decisions-1.jsonl"), str(tmp_path / "decisions-2.jsonl")
    first = ServeProcess(policies, str(tmp_path), xds_port, "--decision-log", first_log, *NATIVE).wait_started()
    serves.append(first)
    envoys += start_envoys(str(tmp_path), first.xds, [("edge-1", "edge", True)], native_log=True)
    envoy = envoys[-1]
    first.wait_in_sync("edge-1")
    wait_for(lambda: request(port, "/open").status == 200, "the routes in place", 20)

    before = [("GET", 200), ("DELETE", 403), ("GET", 200)]
    for method, status in before:
        assert request(port, "/ro/x", method).status == status
    wait_for(lambda: len(_lines(first_log)) == len(before), "the first requests written", 20)
    assert _entries(first) == {"written": len(before), "dropped": 0, "failed": 0}
    assert first.stop() == 0

    _router_debug(envoy)  # the batches' calls, told apart from the ADS stream's retries by Envoy's log
    down = [("GET", 200), ("DELETE", 403)] * 5
    for method, status in down:  # decided by Envoy's RBAC filter: no control plane needed
        assert request(port, "/ro/x", method).status == status
    # The module takes its whole buffer into each call; a call failing (connection refused) after
    # these requests has taken their records: nothing of them is left for the next serve. (One
    # worker: a request's record is appended before the next request is read. Should the last one
    # miss that call, the next tick's call, 200 ms later, fails the same way, long before the
    # next serve, a new Python process, listens.)
    wait_for(lambda: _failed_reports(envoy), "a failed decision batch", 20)

    second = ServeProcess(policies, str(tmp_path), xds_port, "--decision-log", second_log, *NATIVE).wait_started()
    serves.append(second)
    assert second.xds == first.xds
    second.wait_in_sync("edge-1", timeout=30)  # Envoy's ADS reconnects (back-off up to 5 s)
    assert request(port, "/ro/x", "DELETE").status == 403
    lines = wait_for(lambda: _lines(second_log), "the last request written", 20)
    assert [(r["route"], r["policy"], r["rule"], r["verdict"]) for r in lines] == [
        ("app/ro", "read-only", "no-deletes", "deny")]
    assert _entries(second) == {"written": 1, "dropped": len(down), "failed": 0}
    assert len(_lines(first_log)) == len(before)
