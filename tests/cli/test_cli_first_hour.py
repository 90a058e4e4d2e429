"""The CLI as a newcomer meets it: ``--version``, readable help, did-you-mean for a mistyped
command, ``init`` and ``status --check``."""

from __future__ import annotations

import signal
import subprocess
import sys
from importlib.metadata import version

import pytest

from authplane.demo import example_files
from tests.support.policies import backend, documents, gateway, write_policies
from tests.support.ports import free_port, wait_for
from tests.support.processes import ServeProcess, start_envoys


def cli(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "authplane.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def test_version():
    r = cli("--version")
    assert (r.returncode, r.stdout.strip()) == (0, f"authplane {version('authplane')}")


def test_top_level_help_has_no_rest_markup():
    r = cli("--help")
    assert r.returncode == 0 and "authplane command line" in r.stdout
    assert "``" not in r.stdout


@pytest.mark.parametrize("command, expected", [
    ("validate", ["policy directory (default: policies)"]),
    ("render", ["policy directory (default: policies)", "the fleet (Gateway spec.fleet) to render",
                "output format (default: yaml)"]),
    ("demo", ["(default: authplane-demo)", "xDS port (default: 18000)", "(default: 9100)",
              "gRPC port (default: 9001)", "HTTP port (default: 9002)", "(default: 9901 9902)"]),
])
def test_help_shows_what_each_argument_is_and_its_default(command, expected):
    text = " ".join(cli(command, "--help").stdout.split())  # argparse wraps lines
    for phrase in expected:
        assert phrase in text, f"{command} --help lacks {phrase!r}:\n{text}"


def test_mistyped_command_gets_one_line_with_a_suggestion():
    r = cli("serv")
    assert r.returncode == 2
    assert r.stderr == "authplane: error: unknown command 'serv' (did you mean 'serve'?) (see 'authplane --help')\n"
    assert cli("frobnicate").stderr.startswith("authplane: error: unknown command 'frobnicate'; commands: validate,")


def test_init_writes_the_starter_set_and_refuses_to_overwrite(tmp_path):
    r = cli("init", "mine", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert str(tmp_path / "mine") in r.stdout
    assert sorted(str(p.relative_to(tmp_path / "mine")) for p in (tmp_path / "mine").rglob("*") if p.is_file()) \
        == sorted(example_files())
    assert cli("validate", str(tmp_path / "mine")).returncode == 0
    (tmp_path / "mine" / "gateway.yaml").write_text("# mine\n")
    again = cli("init", str(tmp_path / "mine"))
    assert again.returncode == 1
    assert again.stderr.count("\n") == 1 and "already exists; nothing written" in again.stderr
    assert (tmp_path / "mine" / "gateway.yaml").read_text() == "# mine\n"


def test_status_check_fails_on_a_rejected_change(tmp_path, echo):
    d = write_policies(str(tmp_path / "policies"), {
        "gateway.yaml": documents(gateway("edge", free_port()), backend("echo", echo.port),
                                  "kind: Route\nmetadata: {name: app}\n"
                                  "spec: {gateway: edge, rules: [{backend: echo}]}")})
    serve = ServeProcess(d, str(tmp_path), 0, "--no-authz").wait_started()
    try:
        ok = cli("status", "--check", "--admin", serve.address)
        assert (ok.returncode, ok.stderr) == (0, ""), ok.stderr
        write_policies(d, {"bad.yaml": "kind: Route\nmetadata: {name: bad}\nspec: {gateway: nope}\n"})
        wait_for(lambda: serve.status().get("last_reload_error"), "the bad change to be rejected")
        bad = cli("status", "--check", "--admin", serve.address)
        assert bad.returncode == 1 and "last change REJECTED" in bad.stdout
        assert "authplane status --check: the last policy change was rejected at" in bad.stderr
        assert cli("status", "--admin", serve.address).returncode == 0  # without --check: informative only
    finally:
        serve.stop(signal.SIGKILL)


def test_status_check_fails_while_a_connected_envoy_is_out_of_sync(tmp_path, echo, processes):
    """A change authplane accepts but Envoy rejects (a listener on an address it cannot bind):
    no reload error, yet the node no longer runs its fleet's version."""
    envoys, serves = processes
    d = write_policies(str(tmp_path / "policies"), {
        "gateway.yaml": documents(gateway("edge", free_port()), backend("echo", echo.port),
                                  "kind: Route\nmetadata: {name: app}\n"
                                  "spec: {gateway: edge, rules: [{backend: echo}]}")})
    serve = ServeProcess(d, str(tmp_path), 0, "--no-authz").wait_started()
    serves.append(serve)
    envoys += start_envoys(str(tmp_path), serve.xds, [("edge-1", "edge", True)])
    wait_for(lambda: serve.status()["nodes"] and serve.status()["nodes"][0]["state"] == "in sync",
             "the Envoy to be in sync")
    ok = cli("status", "--check", "--admin", serve.address)
    assert (ok.returncode, ok.stderr) == (0, ""), ok.stderr
    write_policies(d, {"unbindable.yaml": documents(
        gateway("far", free_port(), fleet="edge").replace("127.0.0.1", "192.0.2.1"),
        "kind: Route\nmetadata: {name: far}\nspec: {gateway: far, rules: [{backend: echo}]}")})
    wait_for(lambda: serve.status()["nodes"][0]["state"] != "in sync", "Envoy to reject the change")
    assert not serve.status().get("last_reload_error")  # authplane itself accepted it
    bad = cli("status", "--check", "--admin", serve.address)
    assert bad.returncode == 1, bad.stdout
    assert bad.stderr.startswith("authplane status --check: node edge-1 (fleet edge) is "), bad.stderr
    assert "in sync" not in bad.stderr
