"""A policy's ``filters``: the example C module (native/example_filter), built here with the
machine's compiler, loaded by a real Envoy at each declared place; per-route enable/disable;
validation of the module file (absent, not a shared object, another ABI) and, with
``validate --envoy``, a configuration the module refuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from authplane.devtools.echo import EchoServer
from authplane.devtools.idp import DevIdentityProvider
from authplane.policy.modules import ENVOY_ABI
from tests.support.http import request
from tests.support.native import build_all, compiled_bootstrap, search_path, start_refused
from tests.support.policies import write_policies
from tests.support.processes import start_static_envoy

IDP = DevIdentityProvider(issuer="https://idp.authplane.test")
TOKEN = IDP.mint(groups=["dev"])


def _mod(name: str, place: str, config: str | None = None, **extra: object) -> dict[str, object]:
    return {"name": name, "module": "example_filter", "place": place, **({"config": config} if config else {}), **extra}


JWT = {"required": True, "providers": [{"name": "dev", "issuer": IDP.issuer, "jwks": {"file": "jwks.json"}}]}
ROLE = {"default": "deny", "rules": [{"name": "admins", "action": "allow", "when": {"headers": {"x-role": ["admin"]}}}]}
ROUTE_POLICIES: dict[str, dict[str, object]] = {
    # every place in one chain: the gateway's two and this route's
    "order": {"filters": [_mod("mid", "beforeAuthorization"), _mod("early", "afterAuthentication")],
              "authorization": {"default": "allow"}},
    # the gateway's "first" off on this route, its "last" still on
    "off": {"filters": [{"name": "first", "enabled": False}]},
    # a module before the JWT check can supply the token; after it, too late (401)
    "authn-before": {"jwt": JWT, "filters": [_mod("tok", "beforeAuthentication", f"authorization: Bearer {TOKEN}")]},
    "authn-after": {"jwt": JWT, "filters": [_mod("tok", "afterAuthentication", f"authorization: Bearer {TOKEN}")]},
    # a module before the authorization rules can set what they read; after them, too late (403)
    "authz-before": {"authorization": ROLE, "filters": [_mod("role", "beforeAuthorization", "x-role: admin")]},
    "authz-after": {"authorization": ROLE, "filters": [_mod("role", "afterAuthorization", "x-role: admin")]},
    # a route-level entry named like the gateway's replaces it (here: another config)
    "replaced": {"filters": [_mod("last", "afterAuthorization", "x-replaced: yes")]},
}


def _policy_dir(root: Path, gateway_filters: list[dict[str, object]]) -> str:
    rules = [{"name": g, "match": {"pathPrefix": f"/{g}"}, "backend": "echo"} for g in ROUTE_POLICIES]
    docs = [{"kind": "AuthPolicy", "metadata": {"name": "edge-modules"},
             "spec": {"targetRef": {"kind": "Gateway", "name": "edge"}, "filters": gateway_filters}}]
    docs += [{"kind": "AuthPolicy", "metadata": {"name": g},
              "spec": {"targetRef": {"kind": "Route", "name": "app", "rule": g}, **spec}}
             for g, spec in ROUTE_POLICIES.items()]
    return write_policies(str(root), {
        "jwks.json": json.dumps(IDP.jwks()),
        "gateway.yaml": """
            kind: Gateway
            metadata: {name: edge}
            spec: {fleet: edge, listeners: [{name: http, port: 8080}]}
            ---
            kind: Backend
            metadata: {name: echo}
            spec: {endpoints: ["127.0.0.1:1"]}
            """,
        "routes.yaml": yaml.safe_dump({"kind": "Route", "metadata": {"name": "app"},
                                       "spec": {"gateway": "edge", "rules": rules}}, sort_keys=False),
        "policies.yaml": "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs),
    })


GATEWAY = [_mod("first", "beforeAuthentication"), _mod("last", "afterAuthorization")]


@pytest.fixture(scope="module")
def modules(tmp_path_factory) -> Path:
    return build_all(tmp_path_factory.mktemp("modules"))


@pytest.fixture(scope="module")
def envoy(tmp_path_factory, modules):
    tmp = tmp_path_factory.mktemp("filters")
    echo = EchoServer().start()
    d = _policy_dir(tmp / "policies", GATEWAY)
    gateway = Path(d, "gateway.yaml")
    gateway.write_text(gateway.read_text().replace("127.0.0.1:1", f"127.0.0.1:{echo.port}"))
    with search_path(modules):
        proc = start_static_envoy(d, "edge", str(tmp))
    yield proc.listener_port("edge/http")
    proc.stop()
    echo.stop()


def _upstream(port: int, path: str) -> tuple[int, dict[str, str]]:
    r = request(port, path)
    return r.status, (json.loads(r.body)["headers"] if r.status == 200 else {})


def test_modules_run_in_the_declared_order(envoy):
    status, headers = _upstream(envoy, "/order")
    assert status == 200
    assert headers["x-module-trace"] == "first,early,mid,last"


def test_a_route_turns_a_gateway_module_off(envoy):
    status, headers = _upstream(envoy, "/off")
    assert (status, headers["x-module-trace"]) == (200, "last")


def test_before_authentication_runs_before_the_jwt_check(envoy):
    status, headers = _upstream(envoy, "/authn-before")
    assert status == 200 and headers["x-module-trace"] == "first,tok,last"
    assert request(envoy, "/authn-after").status == 401


def test_before_authorization_runs_before_the_rules(envoy):
    status, headers = _upstream(envoy, "/authz-before")
    assert status == 200 and headers["x-role"] == "admin"
    assert request(envoy, "/authz-after").status == 403


def test_a_route_entry_replaces_the_gateways(envoy):
    status, headers = _upstream(envoy, "/replaced")
    assert (status, headers["x-module-trace"], headers["x-replaced"]) == (200, "first,last", "yes")


def _validate(d: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "authplane.cli", "validate", d, *args],
                          capture_output=True, text=True, timeout=180)


def test_validate_envoy_loads_the_module_and_reports_a_refused_config(tmp_path, modules):
    good = _policy_dir(tmp_path / "good", GATEWAY)
    bad = _policy_dir(tmp_path / "bad", [_mod("first", "beforeAuthentication", "not a header line")])
    with search_path(modules):
        ok = _validate(good, "--envoy")
        refused = _validate(bad, "--envoy")
    assert ok.returncode == 0, ok.stderr
    assert "Envoy accepts every fleet" in ok.stdout
    assert refused.returncode == 1
    assert "fleet 'edge': Envoy rejected the configuration" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_envoy_refuses_a_config_the_module_refuses_without_crashing(tmp_path, modules):
    d = _policy_dir(tmp_path / "policies", [_mod("first", "beforeAuthentication", "garbage\x01")])
    with search_path(modules):
        r = start_refused(compiled_bootstrap(d, "edge"), tmp_path)
    # exit code 1 with Envoy's message, not a signal: the module said no, nothing crashed
    assert r.returncode == 1, r.stderr
    assert "Failed to initialize per-route dynamic module" in r.stderr


def _problems(d: str) -> list[str]:
    r = _validate(d)
    assert r.returncode == 1, r.stdout
    return r.stderr.strip().splitlines()


def test_an_absent_module_is_reported_at_its_line(tmp_path, monkeypatch):
    monkeypatch.delenv("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", raising=False)
    d = _policy_dir(tmp_path, [{"name": "first", "module": "nosuchmodule"},
                               {"name": "second", "module": "mods/libgone.so"}])
    lines = _problems(d)
    path = Path(d, "policies.yaml")
    assert any(line.startswith(f"{path}:11:13: spec.filters[0].module: module 'nosuchmodule' not found: "
                               "libnosuchmodule.so is in none of ") for line in lines), lines
    assert f"{path}:13:13: spec.filters[1].module: module file '{tmp_path}/mods/libgone.so' does not exist" in lines


def test_a_file_that_is_no_shared_object_or_for_another_abi_is_refused(tmp_path, modules):
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "libtext.so").write_text("not a library\n")
    old = mods / "libold.so"
    old.write_bytes((modules / "libexample_filter.so").read_bytes().replace(
        f"authplane-envoy-abi={ENVOY_ABI}".encode(), b"authplane-envoy-abi=v0.0.9"))
    d = _policy_dir(tmp_path, [{"name": "a", "module": "mods/libtext.so"}, {"name": "b", "module": "mods/libold.so"}])
    lines = _problems(d)
    path = Path(d, "policies.yaml")
    assert f"{path}:11:13: spec.filters[0].module: {mods}/libtext.so is not a shared object (no ELF header)" in lines
    assert (f"{path}:13:13: spec.filters[1].module: {mods}/libold.so is built for the dynamic modules ABI "
            f"v0.0.9; this Envoy (1.40) speaks {ENVOY_ABI}: rebuild it") in lines


def test_turning_off_a_filter_the_gateway_does_not_have_is_an_error(tmp_path, modules):
    d = _policy_dir(tmp_path, GATEWAY)
    Path(d, "policies.yaml").write_text(Path(d, "policies.yaml").read_text().replace(
        "- name: first\n    enabled: false", "- name: frist\n    enabled: false"))
    with search_path(modules):
        lines = _problems(d)
    assert any(line.endswith("spec.filters[0].enabled: enabled: false turns off a gateway-level filter, and the "
                             "gateway's policy has no filter 'frist'") for line in lines), lines
