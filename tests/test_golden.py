"""Golden tests: ``testdata/<case>.in.yaml`` → ``<case>.out.yaml`` (every fleet's Envoy resources).

Regenerate with ``pytest tests/test_golden.py --update-golden`` and review the diff: a compiler
change shows up as a change of expected Envoy YAML. Every output also passes ``envoy --mode
validate`` (as a static bootstrap).
"""

from __future__ import annotations

import glob
import os

import pytest

from authplane.compiler.render import dump, snapshot_dict, static_bootstrap, to_dict
from authplane.compiler.snapshot import compile_policies
from authplane.envoy_bin import validate_config
from authplane.policy.loader import load_dir

HERE = os.path.join(os.path.dirname(__file__), "testdata")
CASES = sorted(os.path.basename(p)[: -len(".in.yaml")] for p in glob.glob(f"{HERE}/*.in.yaml"))


def render_all(case: str) -> tuple[str, dict]:
    snapshots = compile_policies(load_dir(os.path.join(HERE, f"{case}.in.yaml")))
    data = {"fleets": {name: snapshot_dict(s) for name, s in snapshots.items()}}
    return dump(data), snapshots


def test_cases_exist():
    assert len(CASES) >= 10


@pytest.mark.parametrize("case", CASES)
def test_golden(case, request):
    out, _ = render_all(case)
    path = os.path.join(HERE, f"{case}.out.yaml")
    if request.config.getoption("--update-golden"):
        with open(path, "w") as f:
            f.write(out)
    with open(path) as f:
        expected = f.read()
    assert out == expected, f"{case}: output differs; rerun with --update-golden and review the diff"


@pytest.mark.parametrize("case", CASES)
def test_golden_output_passes_envoy_validate(case):
    _, snapshots = render_all(case)
    assert snapshots
    for fleet, snap in snapshots.items():
        ok, message = validate_config(dump(to_dict(static_bootstrap(snap))))
        assert ok, f"{case}/{fleet}: {message}"


def test_output_is_deterministic_across_processes():
    import subprocess
    import sys

    code = ("import sys; from tests.test_golden import render_all; "
            "sys.stdout.write(render_all('layering-all-levels')[0])")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, cwd=os.path.dirname(HERE) + "/..").stdout for _ in range(3)}
    assert len(runs) == 1
