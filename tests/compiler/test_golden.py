"""Golden tests: ``testdata/<case>.in.yaml`` → the Envoy resources of every fleet, one file per
resource type so a review sees which resource a change touched:

* ``<case>.listeners.yaml`` (and each fleet's ``version``), ``<case>.routes.yaml``,
  ``<case>.clusters.yaml``, ``<case>.endpoints.yaml`` (ClusterLoadAssignments),
  ``<case>.secrets.yaml``: each ``fleets: {<fleet>: {<type>: [...]}}``, as ``authplane render``
  shows them (secrets redacted); a file only for the types the case has;
* ``<case>.ir.yaml`` for the cases in ``IR_CASES``: the policy → IR stage (``translate.build``),
  repr=False fields (secrets) left out.

Regenerate with ``pytest tests/compiler/test_golden.py --update-golden`` and review the diff: it rewrites
the outputs and deletes stale ones (types a case no longer has, cases whose ``.in.yaml`` is gone).
Every case also passes ``envoy --mode validate`` (as a static bootstrap).
"""

from __future__ import annotations

import glob
import os
import shutil
from typing import Any

import pytest

from authplane.compiler import translate
from authplane.compiler.render import SECTION, dump, ir_dict, snapshot_dict, static_bootstrap, to_dict
from authplane.compiler.snapshot import Snapshot, compile_policies
from authplane.envoy_bin import validate_config
from authplane.policy.loader import load_dir
from tests.support import ROOT, TESTDATA

HERE = TESTDATA
CASES = sorted(os.path.basename(p)[: -len(".in.yaml")] for p in glob.glob(f"{HERE}/*.in.yaml"))
IR_CASES = ("layering-all-levels", "layering-public-route", "layering-route-only")
"""Cases whose IR is golden too: the layering of gateway- and route-level checks lives there."""
KINDS = (*sorted(SECTION.values()), "ir")
"""``<case>.<kind>.yaml`` is an output of ``<case>.in.yaml``."""


def cases(directory: str) -> list[str]:
    return sorted(os.path.basename(p)[: -len(".in.yaml")] for p in glob.glob(f"{directory}/*.in.yaml"))


def compile_case(directory: str, case: str) -> tuple[dict[str, str], dict[str, Snapshot]]:
    """(output file name → expected text, the snapshots) of ``<directory>/<case>.in.yaml``."""
    policies = load_dir(os.path.join(directory, f"{case}.in.yaml"))
    snapshots = compile_policies(policies)
    fleets = {name: snapshot_dict(s) for name, s in snapshots.items()}
    outputs = {}
    for section in sorted(SECTION.values()):
        per_fleet: dict[str, dict[str, Any]] = {}
        for name, snap in fleets.items():
            entry = {section: snap["resources"][section]} if snap["resources"].get(section) else {}
            if section == "listeners":  # the version once, not in every file: it changes with any
                entry["version"] = snap["version"]
            if entry:
                per_fleet[name] = entry
        if any(section in entry for entry in per_fleet.values()):
            outputs[f"{case}.{section}.yaml"] = dump({"fleets": per_fleet})
    if case in IR_CASES:
        ir = _relative(ir_dict(translate.build(policies)), os.path.join(directory, ""))
        outputs[f"{case}.ir.yaml"] = dump({"fleets": ir})
    return outputs, snapshots


def _relative(data: Any, prefix: str) -> Any:
    """``data`` with ``prefix`` cut from the paths (policy origins) in it: the same on every machine."""
    if isinstance(data, dict):
        return {k: _relative(v, prefix) for k, v in data.items()}
    if isinstance(data, list):
        return [_relative(v, prefix) for v in data]
    return data.removeprefix(prefix) if isinstance(data, str) else data


def outputs_in(directory: str) -> dict[str, str]:
    """Output file name → its case, for every ``<case>.<kind>.yaml`` in ``directory``."""
    found = {}
    for name in os.listdir(directory):
        case, _, rest = name.partition(".")
        if rest.removesuffix(".yaml") in KINDS and rest.endswith(".yaml"):
            found[name] = case
    return found


def write_case(directory: str, case: str) -> None:
    """Rewrite the outputs of ``case``; delete its outputs of types it no longer has."""
    outputs, _ = compile_case(directory, case)
    for name in {n for n, c in outputs_in(directory).items() if c == case} - outputs.keys():
        os.remove(os.path.join(directory, name))
    for name, text in outputs.items():
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)


def orphans(directory: str) -> set[str]:
    """Outputs whose ``.in.yaml`` is gone."""
    live = set(cases(directory))
    return {n for n, c in outputs_in(directory).items() if c not in live}


def update_golden(directory: str) -> None:
    """What ``--update-golden`` does to ``directory``: every case rewritten, stale outputs deleted."""
    for case in cases(directory):
        write_case(directory, case)
    for name in orphans(directory):
        os.remove(os.path.join(directory, name))


def render_all(case: str) -> tuple[str, dict[str, Snapshot]]:
    """Every output of ``case`` as one text (file name headers), and its snapshots."""
    outputs, snapshots = compile_case(HERE, case)
    return "".join(f"# {name}\n{text}" for name, text in sorted(outputs.items())), snapshots


def test_cases_exist():
    assert len(CASES) >= 10
    assert set(IR_CASES) <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_golden(case, request):
    if request.config.getoption("--update-golden"):
        write_case(HERE, case)
    outputs, _ = compile_case(HERE, case)
    existing = {n for n, c in outputs_in(HERE).items() if c == case}
    assert existing == outputs.keys(), f"{case}: stale or missing outputs; rerun with --update-golden"
    for name, text in outputs.items():
        with open(os.path.join(HERE, name)) as f:
            assert text == f.read(), f"{name}: output differs; rerun with --update-golden and review the diff"


def test_no_orphan_outputs(request):
    if request.config.getoption("--update-golden"):
        for name in orphans(HERE):
            os.remove(os.path.join(HERE, name))
    assert not orphans(HERE), "outputs without an .in.yaml; rerun with --update-golden"


def test_update_golden_deletes_stale_outputs(tmp_path):
    case = "layering-all-levels"
    for name in (f"{case}.in.yaml", "jwks"):
        copy = shutil.copytree if os.path.isdir(os.path.join(HERE, name)) else shutil.copy
        copy(os.path.join(HERE, name), tmp_path / name)
    stale = {f"{case}.secrets.yaml", f"{case}.routes.yaml", "gone.clusters.yaml", "gone.ir.yaml"}
    for name in stale:
        (tmp_path / name).write_text("stale: true\n")
    (tmp_path / "notes.yaml").write_text("not an output\n")

    update_golden(str(tmp_path))

    expected, _ = compile_case(HERE, case)
    assert f"{case}.secrets.yaml" not in expected and {f"{case}.routes.yaml", f"{case}.ir.yaml"} <= expected.keys()
    assert set(os.listdir(tmp_path)) == expected.keys() | {f"{case}.in.yaml", "jwks", "notes.yaml"}
    for name, text in expected.items():
        assert (tmp_path / name).read_text() == text, name
    assert (tmp_path / "notes.yaml").read_text() == "not an output\n"


def test_ir_has_no_secrets():
    """``repr=False`` fields (OIDC client and cookie HMAC secrets) never reach an ``.ir.yaml``."""
    import dataclasses

    fleets = translate.build(load_dir(os.path.join(HERE, "oidc-sso.in.yaml")))
    secrets: list[bytes] = []

    def collect(value: Any) -> None:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                v = getattr(value, f.name)
                if not f.repr and isinstance(v, bytes):
                    secrets.append(v)
                collect(v)
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, list | tuple):
            for v in value:
                collect(v)

    collect(fleets)
    assert len(secrets) >= 4  # two OIDC policies, each a client secret and an HMAC secret
    text = dump(ir_dict(fleets))
    for secret in secrets:
        for form in (secret.decode("utf-8", "replace").strip(), secret.hex(), repr(secret)):
            assert form not in text


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

    code = ("import sys; from tests.compiler.test_golden import render_all; "
            "sys.stdout.write(render_all('layering-all-levels')[0])")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, cwd=ROOT).stdout for _ in range(3)}
    assert len(runs) == 1
