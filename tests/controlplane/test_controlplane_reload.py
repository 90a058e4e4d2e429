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
from tests.support.http import metric_sum
from tests.support.policies import backend, documents, gateway, write_policies
from tests.support.ports import wait_for
from tests.support.processes import InProcess

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


def _route(timeout: str) -> dict[str, str]:
    return {**POLICIES, "routes.yaml": POLICIES["routes.yaml"].replace("timeout: 1s", f"timeout: {timeout}")}


def _serve(directory: str) -> InProcess:
    cp = ControlPlane(ServeConfig(directory, xds="127.0.0.1:0", admin="127.0.0.1:0"))
    cp.load()
    return InProcess(cp)


def test_configmap_volume_updates_are_followed(tmp_path, idp):
    """Kubernetes' atomic writer: files are symlinks into ``..data``, itself a symlink to a
    timestamped directory; an update writes a new directory and renames ``..data_tmp`` over ``..data``."""
    os.makedirs(tmp_path / "keys")
    (tmp_path / "keys" / "jwks.json").write_text(json.dumps(idp.jwks()))
    vol = tmp_path / "vol"
    os.makedirs(vol)
    write_policies(str(vol / "..2026_11_23_01"), _route("1s"))
    os.symlink("..2026_11_23_01", vol / "..data")
    for name in POLICIES:
        os.symlink(os.path.join("..data", name), vol / name)
    plane = _serve(str(vol))
    try:
        v0 = version(plane)
        write_policies(str(vol / "..2026_11_23_02"), _route("2s"))
        os.symlink("..2026_11_23_02", vol / "..data_tmp")
        os.replace(vol / "..data_tmp", vol / "..data")
        wait_for(lambda: version(plane) != v0, "the ConfigMap update to be served", timeout=5)
        assert plane.status()["last_reload_error"] is None
    finally:
        plane.close()


def test_git_sync_symlink_swaps_are_followed(tmp_path, idp):
    """git-sync: the policy directory is a symlink that is repointed at each new worktree."""
    for keys in (tmp_path / "keys", tmp_path / "worktrees" / "keys"):  # ../keys, lexically or resolved
        os.makedirs(keys)
        (keys / "jwks.json").write_text(json.dumps(idp.jwks()))
    write_policies(str(tmp_path / "worktrees" / "aaa"), _route("1s"))
    link = tmp_path / "policies"
    os.symlink(tmp_path / "worktrees" / "aaa", link)
    plane = _serve(str(link))
    try:
        current = version(plane)
        for sha, timeout in (("bbb", "2s"), ("ccc", "3s")):
            write_policies(str(tmp_path / "worktrees" / sha), _route(timeout))
            os.symlink(tmp_path / "worktrees" / sha, tmp_path / "policies.new")
            os.replace(tmp_path / "policies.new", link)
            current = wait_for(lambda b=current: version(plane) != b and version(plane), f"swap {sha} to be served",
                               timeout=5)
        # and an edit inside the current worktree
        (tmp_path / "worktrees" / "ccc" / "routes.yaml").write_text(
            (tmp_path / "worktrees" / "ccc" / "routes.yaml").read_text().replace("timeout: 3s", "timeout: 4s"))
        wait_for(lambda: version(plane) != current, "an edit in the new worktree to be served", timeout=5)
    finally:
        plane.close()
