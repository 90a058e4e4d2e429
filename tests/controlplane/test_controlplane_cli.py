"""``authplane bootstrap``, ``serve`` start-up and ``status`` as a user runs them."""

from __future__ import annotations

import glob
import json
import os
import shlex
import signal
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from authplane.cli import main
from authplane.envoy_bin import validate_config
from tests.cli.test_cli import run
from tests.support import ROOT
from tests.support.http import get
from tests.support.policies import backend, documents, gateway, write_policies
from tests.support.ports import wait_for
from tests.support.processes import ServeProcess

GATEWAY = documents(gateway("edge", 18996), backend("echo", 9))

class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.returncode, self.stdout, self.stderr = code, out, err


@pytest.fixture
def cli(capsys):
    """The command line in-process (fast); ``run`` from test_cli starts a real process."""
    def invoke(*args: str) -> Result:
        try:
            code = main(list(args))
        except SystemExit as e:
            code = int(e.code or 0)
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return invoke


BROKEN_ROUTE = """
    kind: Route
    metadata: {name: app}
    spec: {gateway: edge, rules: [{name: a, backend: nope}]}
    """


def test_bootstrap_defaults_and_flags(cli):
    r = cli("bootstrap", "--node-id", "edge-7", "--fleet", "edge")
    assert r.returncode == 0, r.stderr
    boot = yaml.safe_load(r.stdout)
    assert boot["node"] == {"id": "edge-7", "cluster": "edge"}
    assert boot["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9901}
    ads = boot["dynamic_resources"]["ads_config"]
    assert ads["api_type"] == "DELTA_GRPC" and ads["transport_api_version"] == "V3"
    assert boot["dynamic_resources"]["lds_config"] == boot["dynamic_resources"]["cds_config"] == {
        "ads": {}, "resource_api_version": "V3"}
    (xds,) = boot["static_resources"]["clusters"]
    assert ads["grpc_services"][0]["envoy_grpc"]["cluster_name"] == xds["name"]
    endpoint = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert (xds["type"], endpoint) == ("STATIC", {"address": "127.0.0.1", "port_value": 18000})

    r = cli("bootstrap", "--node-id", "n", "--fleet", "f", "--xds", "authplane:18001", "--admin-port", "0", "--sotw")
    boot = yaml.safe_load(r.stdout)
    assert boot["dynamic_resources"]["ads_config"]["api_type"] == "GRPC"
    assert boot["admin"]["address"]["socket_address"]["port_value"] == 0
    assert boot["static_resources"]["clusters"][0]["type"] == "STRICT_DNS"


@pytest.mark.parametrize("args", [
    ("--node-id", "n", "--fleet", "f", "--xds", "nowhere"),
    ("--node-id", "n", "--fleet", "f", "--delta", "--sotw"),
    ("--node-id", "n", "--fleet", "f", "--admin-port", "70000"),
    ("--node-id", "", "--fleet", "f"),
    ("--fleet", "f"),
])
def test_bootstrap_misuse_is_one_line(cli, args):
    r = cli("bootstrap", *args)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_example_bootstraps_are_current_and_valid(cli):
    paths = sorted(glob.glob(os.path.join(ROOT, "envoy", "*.yaml")))
    assert {os.path.basename(p) for p in paths} >= {"edge-1.yaml", "edge-2.yaml", "sso-1.yaml"}
    texts = []
    for path in paths:
        with open(path) as f:
            texts.append(f.read())
        command = next(line for line in texts[-1].splitlines() if line.startswith("# Written by: "))
        args = shlex.split(command.removeprefix("# Written by: "))
        assert args[:2] == ["authplane", "bootstrap"]
        r = cli(*args[1:])
        assert r.returncode == 0 and r.stdout == texts[-1], f"{path} is out of date: regenerate it with {args}"
    with ThreadPoolExecutor(len(texts)) as pool:
        for path, (ok, out) in zip(paths, pool.map(validate_config, texts), strict=True):
            assert ok, f"{path}: {out}"


def test_serve_refuses_an_invalid_directory_at_start_up(tmp_path, cli):
    d = write_policies(str(tmp_path / "p"), {"gateway.yaml": GATEWAY, "routes.yaml": BROKEN_ROUTE})
    r = run("serve", d, "--xds", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--no-authz")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[-1] == "1 problem found"
    assert lines[0].startswith(f"{d}/routes.yaml:") and "nope" in lines[0]
    assert "Traceback" not in r.stderr

    r = cli("serve", d, "--xds", "nonsense")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_serve_reports_a_port_in_use_in_one_line(tmp_path):
    d = write_policies(str(tmp_path / "p"), {"gateway.yaml": GATEWAY})
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = run("serve", d, "--xds", f"127.0.0.1:{busy.getsockname()[1]}", "--admin", "127.0.0.1:0", "--no-authz")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("authplane serve: cannot listen on 127.0.0.1:")
    assert "Traceback" not in r.stderr


def test_serve_allow_empty_then_fixed_and_status_cli(tmp_path):
    d = write_policies(str(tmp_path / "p"), {"gateway.yaml": GATEWAY, "routes.yaml": BROKEN_ROUTE})
    serve = ServeProcess(d, str(tmp_path), 0, "--allow-empty")
    try:
        serve.wait_started()
        assert get(f"http://{serve.address}/healthz") == "ok\n"
        status = serve.status()
        assert status["fleets"] == {} and "nope" in status["last_reload_error"]["problems"][0]
        r = run("status", "--admin", serve.address)
        assert r.returncode == 0 and "no fleets" in r.stdout and "REJECTED" in r.stdout

        write_policies(d, {"routes.yaml": BROKEN_ROUTE.replace("nope", "echo")})
        wait_for(lambda: "edge" in serve.status()["fleets"], "the fixed directory to be served")
        r = run("status", "--admin", serve.address, "--json")
        assert r.returncode == 0
        doc = json.loads(r.stdout)
        assert doc["last_reload_error"] is None and doc["nodes"] == []
        r = run("status", "--admin", serve.address)
        assert doc["fleets"]["edge"]["version"] in r.stdout and "no Envoy has connected" in r.stdout
        assert serve.stop(signal.SIGTERM) == 0
    finally:
        serve.stop(signal.SIGKILL)


def test_status_of_an_unreachable_server_is_one_line(cli):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = cli("status", "--admin", f"127.0.0.1:{port}")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == f"authplane status: cannot reach http://127.0.0.1:{port}/status: Connection refused"
