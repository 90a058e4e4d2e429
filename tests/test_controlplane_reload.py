"""Live reload: editor saves, ignored temporary files, JWKS files outside the directory, git SHA."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from authplane.controlplane.app import ControlPlane, ServeConfig
from authplane.controlplane.store import git_version
from authplane.devtools.idp import DevIdentityProvider
from tests.controlplane_support import InProcess, backend, documents, gateway, metric_sum, wait_for
from tests.helpers import write_policies

POLICIES = {
    "gateway.yaml": documents(gateway("edge", 18997), backend("echo", 9), """
        kind: AuthPolicy
        metadata: {name: jwt}
        spec:
          targetRef: {kind: Gateway, name: edge}
          jwt:
            providers:
              - {name: dev, issuer: "https://idp.authplane.test", audiences: [api], jwks: {file: ../keys/jwks.json}}
        """),
    "routes.yaml": """
        kind: Route
        metadata: {name: app}
        spec: {gateway: edge, rules: [{name: a, backend: echo, timeout: 1s}]}
        """,
}


def reloads(plane: InProcess) -> float:
    return metric_sum(plane.metrics(), "authplane_reloads_total")


@pytest.fixture
def watched(tmp_path, idp):
    os.makedirs(tmp_path / "keys")
    (tmp_path / "keys" / "jwks.json").write_text(json.dumps(idp.jwks()))
    d = write_policies(str(tmp_path / "policies"), POLICIES)
    cp = ControlPlane(ServeConfig(d, xds="127.0.0.1:0", admin="127.0.0.1:0"))
    cp.load()
    plane = InProcess(cp)
    yield plane, d, str(tmp_path / "keys" / "jwks.json")
    plane.close()


def version(plane: InProcess) -> str:
    return plane.status()["fleets"]["edge"]["version"]


def test_saves_via_rename_and_jwks_files_reload_while_temp_files_are_ignored(watched):
    plane, d, jwks = watched
    v0 = version(plane)
    count = reloads(plane)
    for junk in (".routes.yaml.swp", "routes.yaml~", "#routes.yaml#", ".git/x.yaml", "routes.yaml.tmp"):
        os.makedirs(os.path.dirname(os.path.join(d, junk)), exist_ok=True)
        with open(os.path.join(d, junk), "w") as f:
            f.write("kind: [\n")
    time.sleep(0.4)
    assert reloads(plane) == count  # not even looked at
    assert plane.status()["last_reload_error"] is None

    # an editor that writes a temporary file and renames it over the original
    tmp = os.path.join(d, "routes.yaml.new")
    with open(os.path.join(d, "routes.yaml")) as f:
        text = f.read()
    with open(tmp, "w") as f:
        f.write(text.replace("timeout: 1s", "timeout: 2s"))
    os.replace(tmp, os.path.join(d, "routes.yaml"))
    v1 = wait_for(lambda: version(plane) != v0 and version(plane), "the renamed save to be served")

    # the JWKS file lives outside the policy directory and is watched too
    with open(jwks, "w") as f:
        f.write(json.dumps(DevIdentityProvider(issuer="https://other.test").jwks()))
    wait_for(lambda: version(plane) not in (v0, v1), "the JWKS change to be served")
    assert plane.status()["last_reload_error"] is None


def test_git_sha_and_dirty_marker(tmp_path, monkeypatch):
    d = write_policies(str(tmp_path / "repo" / "policies"), {"routes.yaml": POLICIES["routes.yaml"]})
    assert git_version(d) is None  # not a work tree

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path / "repo"), "-c", "user.name=t", "-c", "user.email=t@t",
                               *args], check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "policies")
    sha = git("rev-parse", "--short=12", "HEAD")
    assert git_version(d) == sha
    with open(os.path.join(d, "new.yaml"), "w") as f:
        f.write("# untracked\n")
    assert git_version(d) == f"{sha}-dirty"
    with open(tmp_path / "repo" / "elsewhere.txt", "w") as f:
        f.write("outside the policy directory\n")
    os.unlink(os.path.join(d, "new.yaml"))
    assert git_version(d) == sha  # only the policy directory counts
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert git_version(d) is None  # git not installed
