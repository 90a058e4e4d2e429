"""The command line as a user runs it: exit codes, one line per problem, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from tests.support import ROOT

POLICIES = os.path.join(ROOT, "policies")


def run(*args: str, cwd: str = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "authplane.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def test_validate_examples_with_envoy():
    r = run("validate", "policies", "--envoy")
    assert r.returncode == 0, r.stderr
    assert "valid" in r.stdout and "Envoy accepts every fleet" in r.stdout


def test_validate_reports_each_problem_and_exits_1(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "apiVersion: authplane.dev/v1alpha1\nkind: Route\nmetadata: {name: r}\n"
        "spec: {gateway: nope, rules: [{name: a, backend: b, timeout: soon}]}\n"
        "---\nkind: [\n")
    r = run("validate", str(tmp_path))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines == [
        f"{tmp_path}/a.yaml:7:1: invalid YAML: did not find expected node content",
        "1 problem found"]
    assert "Traceback" not in r.stderr


def test_render_yaml_and_json_agree():
    y = run("render", "policies", "--fleet", "edge")
    j = run("render", "policies", "--fleet", "edge", "--format", "json")
    assert y.returncode == j.returncode == 0
    assert yaml.safe_load(y.stdout) == json.loads(j.stdout)
    data = json.loads(j.stdout)
    assert {lst["name"] for lst in data["resources"]["listeners"]} == {"edge/http", "llm/http"}
    assert len(data["version"]) == 16


def test_render_unknown_fleet_and_misuse_are_one_line():
    r = run("render", "policies", "--fleet", "nope")
    assert r.returncode == 1
    assert r.stderr.strip() == "authplane render: unknown fleet 'nope' (fleets in policies: edge, sso)"
    r = run("render", "policies")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1
    r = run("validate", "/does/not/exist")
    assert r.returncode == 1
    assert r.stderr.splitlines()[0] == "/does/not/exist:1:1: no such directory"


def test_schema_is_json_schema_of_all_kinds():
    r = run("schema")
    assert r.returncode == 0
    schema = json.loads(r.stdout)
    assert {"Gateway", "Backend", "Route", "AuthPolicy"} <= set(schema["$defs"])
    assert schema["$defs"]["AuthPolicySpec"]["additionalProperties"] is False
