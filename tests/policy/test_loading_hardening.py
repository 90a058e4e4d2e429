"""Hostile or unlucky policy directories: unreadable parts, files caught mid-write, alias bombs,
FIFOs and devices, oversized files, secrets in errors, huge numbers and control characters.
Each must fail the load with one clear ``path:line:col`` line (never a traceback), and ``serve``
must keep enforcing the last good policies."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading

import pytest

from authplane.controlplane.app import ControlPlane, ServeConfig
from authplane.errors import PolicyError
from authplane.policy.files import read_file
from authplane.policy.loader import load_dir
from tests.support.http import metric_sum, request
from tests.support.policies import backend, documents, gateway, write_policies
from tests.support.ports import free_port, wait_for
from tests.support.processes import InProcess, ServeProcess, start_envoys

UNPRIVILEGED = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"]
"""Root without the capabilities that ignore file permissions (the tests run as root)."""

ROUTES = """
    kind: Route
    metadata: {name: app}
    spec:
      gateway: edge
      rules:
        - {name: admin, backend: echo, match: {pathPrefix: /admin}}
        - {name: open, backend: echo}
    """
PROTECT = """
    kind: AuthPolicy
    metadata: {name: protect}
    spec: {targetRef: {kind: Route, name: app, rule: admin}, authorization: {default: deny}}
    """
BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def policies(directory: str, port: int = 8080, echo_port: int = 9) -> str:
    return write_policies(directory, {"base.yaml": documents(gateway("edge", port), backend("echo", echo_port)),
                                      "routes.yaml": ROUTES, "authz/protect.yaml": PROTECT})


def validate(directory: str, *extra: str, unprivileged: bool = False) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "authplane.cli", "validate", directory, *extra]
    return subprocess.run((UNPRIVILEGED if unprivileged else []) + args, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def rejected(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The problem lines of a failed ``validate``: exit 1, no traceback, a count at the end."""
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[-1] == f"{len(lines) - 1} problem{'s' if len(lines) != 2 else ''} found", lines
    return lines[:-1]


def version(plane: InProcess) -> str:
    return plane.status()["fleets"]["edge"]["version"]


def reload_problems(plane: InProcess) -> list[str]:
    return (plane.status()["last_reload_error"] or {}).get("problems", [])


@pytest.fixture
def served(tmp_path, echo):
    """``policies`` in an in-process control plane with one real Envoy: (plane, directory, port)."""
    port = free_port()
    d = policies(str(tmp_path / "p"), port, echo.port)
    cp = ControlPlane(ServeConfig(d, xds="127.0.0.1:0", admin="127.0.0.1:0"))
    cp.load()
    plane = InProcess(cp)
    envoys = []
    try:
        envoys = start_envoys(str(tmp_path), plane.xds, [("edge-1", "edge", True)])
        plane.wait_in_sync("edge-1")
        assert (request(port, "/admin").status, request(port, "/x").status) == (403, 200)
        yield plane, d, port
    finally:
        for envoy in envoys:
            envoy.stop()
        plane.close()


def test_an_unreadable_directory_or_file_fails_validate(tmp_path):
    d = policies(str(tmp_path / "p"))
    os.chmod(os.path.join(d, "authz"), 0)
    try:
        assert rejected(validate(d, unprivileged=True)) == [f"{d}/authz:1:1: cannot read directory: Permission denied"]
    finally:
        os.chmod(os.path.join(d, "authz"), 0o755)
    os.chmod(os.path.join(d, "authz", "protect.yaml"), 0)
    assert rejected(validate(d, unprivileged=True)) == [f"{d}/authz/protect.yaml:1:1: cannot read: Permission denied"]


def test_serve_keeps_enforcing_when_a_directory_becomes_unreadable(tmp_path, echo, monkeypatch):
    port = free_port()
    d = policies(str(tmp_path / "p"), port, echo.port)
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\nexec {' '.join(UNPRIVILEGED)} {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(wrapper))  # ServeProcess runs `sys.executable -m authplane.cli`
    serve = ServeProcess(d, str(tmp_path), 0, "--no-authz")
    monkeypatch.undo()
    envoys = []
    try:
        serve.wait_started()
        envoys = start_envoys(str(tmp_path), serve.xds, [("edge-1", "edge", True)])
        serve.wait_in_sync("edge-1")
        v0 = serve.status()["fleets"]["edge"]["version"]
        assert request(port, "/admin").status == 403
        os.chmod(os.path.join(d, "authz"), 0)
        error = wait_for(lambda: serve.status()["last_reload_error"], "the unreadable directory to be reported")
        assert f"{d}/authz:1:1: cannot read directory: Permission denied" in error["problems"]
        serve.wait_in_sync("edge-1", version=v0)
        assert request(port, "/admin").status == 403
        os.chmod(os.path.join(d, "authz"), 0o755)
        wait_for(lambda: serve.status()["last_reload_error"] is None, "the directory to load again")
        assert request(port, "/admin").status == 403
    finally:
        os.chmod(os.path.join(d, "authz"), 0o755)
        for envoy in envoys:
            envoy.stop()
        serve.stop()


def test_an_emptied_policy_file_keeps_its_documents_until_it_has_content_or_is_deleted(served, caplog):
    plane, d, port = served
    caplog.set_level(logging.WARNING, logger="authplane.reload")
    protect = os.path.join(d, "authz", "protect.yaml")
    with open(protect) as f:
        text = f.read()
    v0, count = version(plane), metric_sum(plane.metrics(), "authplane_reloads_total")
    open(protect, "w").close()  # `: > protect.yaml`, as a shell redirection starts a rewrite
    wait_for(lambda: metric_sum(plane.metrics(), "authplane_reloads_total") > count, "the emptied file's reload")
    plane.wait_in_sync("edge-1", version=version(plane))
    assert version(plane) == v0
    assert request(port, "/admin").status == 403
    warning = (f"{protect}:1:1: the file is empty (being written?): its previous documents stay in force "
               "until it has content or is deleted")
    assert warning in [str(w) for w in plane.cp.store.current.policies.warnings]
    assert warning in caplog.messages

    with open(protect, "w") as f:  # the rewrite completes
        f.write(text)
    wait_for(lambda: plane.cp.store.current.policies.warnings == [], "the rewritten file to be loaded")
    assert version(plane) == v0 and request(port, "/admin").status == 403

    os.remove(protect)  # deleting it (unlike emptying it) removes its policy
    wait_for(lambda: request(port, "/admin").status == 200, "/admin open once its policy file is deleted")


def test_hostile_files_are_refused_by_serve_with_positions_and_later_saves_still_apply(served):
    plane, d, port = served
    v0 = version(plane)
    for name, text, problem in (
            ("int.yaml", "kind: Route\nspec: {rules: " + "9" * 5000 + "}\n",
             "int.yaml:2:15: spec.rules: integer too long (5000 characters); quote it to make it a string"),
            ("bomb.yaml", BOMB, "bomb.yaml:5:8: e[0]: alias *d: aliases expand to more than 10000 nodes in this "
                                "file; repeat fewer or smaller parts")):
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
        wait_for(lambda p=problem: reload_problems(plane) == [f"{d}/{p}"],
                 f"{name} to be refused")
        os.remove(os.path.join(d, name))
        wait_for(lambda: plane.status()["last_reload_error"] is None, f"the directory without {name} to load")
    os.mkfifo(os.path.join(d, "pipe.yaml"))  # nobody ever writes: opening it must not block
    wait_for(lambda: reload_problems(plane) == [
        f"{d}/pipe.yaml:1:1: cannot read: not a regular file (a FIFO)"], "the FIFO to be refused")
    os.remove(os.path.join(d, "pipe.yaml"))
    os.symlink("/dev/zero", os.path.join(d, "zero.yaml"))
    wait_for(lambda: reload_problems(plane) == [
        f"{d}/zero.yaml:1:1: cannot read: not a regular file (a character device)"], "/dev/zero to be refused")
    os.remove(os.path.join(d, "zero.yaml"))
    with open(os.path.join(d, "routes.yaml"), "a") as f:
        f.write("# a later save\n")
    wait_for(lambda: plane.status()["last_reload_error"] is None, "a later save to load")
    assert version(plane) == v0 and request(port, "/admin").status == 403


def test_special_and_oversized_files_fail_validate_with_their_path(tmp_path):
    d = policies(str(tmp_path / "p"))
    os.mkfifo(os.path.join(d, "pipe.yaml"))
    os.symlink("/dev/zero", os.path.join(d, "zero.yaml"))
    assert rejected(validate(d)) == [f"{d}/pipe.yaml:1:1: cannot read: not a regular file (a FIFO)",
                                     f"{d}/zero.yaml:1:1: cannot read: not a regular file (a character device)"]
    os.remove(os.path.join(d, "pipe.yaml"))
    os.remove(os.path.join(d, "zero.yaml"))
    with open(os.path.join(d, "big.yaml"), "w") as f:
        f.write("# padding\n" * 200)
    assert rejected(validate(d, "--max-file-size", "1KiB")) == [
        f"{d}/big.yaml:1:1: cannot read: larger than 1024 bytes (see --max-file-size)"]
    assert validate(d).returncode == 0  # within the 4 MiB default
    render = subprocess.run([sys.executable, "-m", "authplane.cli", "render", d, "--fleet", "edge", "--max-file-size",
                             "1024"], capture_output=True, text=True, timeout=120)
    assert (render.returncode, render.stderr.splitlines()[0]) == (
        1, f"{d}/big.yaml:1:1: cannot read: larger than 1024 bytes (see --max-file-size)")
    serve = subprocess.run([sys.executable, "-m", "authplane.cli", "serve", d, "--max-file-size", "1KiB", "--xds",
                            "127.0.0.1:0", "--admin", "127.0.0.1:0", "--no-authz"], capture_output=True, text=True,
                           timeout=120)  # the start-up load fails: serve exits
    assert serve.returncode == 1
    assert f"{d}/big.yaml:1:1: cannot read: larger than 1024 bytes (see --max-file-size)" in serve.stderr
    os.symlink("big.yaml", os.path.join(d, "linked.yaml"))  # symlinks to regular files are read
    assert validate(d).returncode == 0


def test_files_the_policies_name_are_read_by_the_same_rules(tmp_path):
    d = policies(str(tmp_path / "p"))
    os.symlink("/dev/zero", os.path.join(d, "authz", "jwks.json"))
    os.mkfifo(os.path.join(d, "authz", "users.htpasswd"))
    os.mkfifo(os.path.join(d, "authz", "client-secret.txt"))
    with open(os.path.join(d, "authz", "keys.txt"), "w") as f:
        f.write("client: " + "k" * 2000 + "\n")
    write_policies(d, {"authz/more.yaml": documents("""
        kind: AuthPolicy
        metadata: {name: jwt}
        spec:
          targetRef: {kind: Gateway, name: edge}
          jwt: {providers: [{name: a, issuer: "https://idp.test", jwks: {file: jwks.json}}]}
        """, """
        kind: Route
        metadata: {name: more}
        spec: {gateway: edge, rules: [{name: b, backend: echo, match: {pathPrefix: /b}},
                                      {name: k, backend: echo, match: {pathPrefix: /k}}]}
        """, """
        kind: AuthPolicy
        metadata: {name: basic}
        spec: {targetRef: {kind: Route, name: more, rule: b}, basicAuth: {file: users.htpasswd}}
        """, """
        kind: AuthPolicy
        metadata: {name: keys}
        spec: {targetRef: {kind: Route, name: more, rule: k}, apiKey: {file: keys.txt}}
        """)})
    lines = rejected(validate(d, "--max-file-size", "1KiB"))
    assert [line.partition(": spec.")[2] for line in lines] == [
        "jwt.providers[0].jwks.file: cannot read JWKS file 'jwks.json': not a regular file (a character device)",
        "basicAuth.file: cannot read 'users.htpasswd': not a regular file (a FIFO)",
        "apiKey.file: cannot read 'keys.txt': larger than 1024 bytes (see --max-file-size)"]
    with pytest.raises(PolicyError) as e:  # and the oidc secret files (here without discovery)
        write_policies(d, {"authz/oidc.yaml": """
            kind: AuthPolicy
            metadata: {name: sso}
            spec:
              targetRef: {kind: Route, name: more, rule: b}
              oidc: {issuer: "https://idp.test", clientId: c, clientSecret: {file: client-secret.txt},
                     authorizationEndpoint: "https://idp.test/a", tokenEndpoint: "https://idp.test/t",
                     jwksUri: "https://idp.test/k", redirectPath: /callback}
            """})
        load_dir(d)
    assert "spec.oidc.clientSecret: cannot read 'client-secret.txt': not a regular file (a FIFO)" in str(e.value)


def test_a_file_is_read_once_it_has_stopped_changing(tmp_path):
    path = tmp_path / "growing.yaml"
    path.write_text("kind: Route\n")
    started, result = threading.Event(), []

    def reader() -> None:
        started.set()
        result.append(read_file(str(path), settle=2.0))  # the file is younger than 2 s: wait for it

    thread = threading.Thread(target=reader)
    thread.start()
    started.wait()
    with open(path, "a") as f:  # the writer finishes well within the window
        f.write("metadata: {name: app}\n")
    thread.join(60)
    assert result == [b"kind: Route\nmetadata: {name: app}\n"]


def test_alias_bombs_and_recursive_aliases_are_refused_at_the_alias(tmp_path):
    d = policies(str(tmp_path / "p"))
    with open(os.path.join(d, "bomb.yaml"), "w") as f:
        f.write(BOMB)
    with open(os.path.join(d, "loop.yaml"), "w") as f:
        f.write("kind: Route\nspec: &s {rules: [*s]}\n")
    assert rejected(validate(d)) == [
        f"{d}/bomb.yaml:5:8: e[0]: alias *d: aliases expand to more than 10000 nodes in this file; "
        "repeat fewer or smaller parts",
        f"{d}/loop.yaml:2:19: spec.rules[0]: alias *s: recursive alias: it names a node that contains it"]


def test_a_few_small_aliases_keep_working(tmp_path):
    d = write_policies(str(tmp_path / "p"), {"all.yaml": documents(gateway("edge", 8080), backend("echo", 9), """
        kind: Route
        metadata: {name: app}
        spec:
          gateway: edge
          rules:
            - {name: a, backend: echo, match: &m {pathPrefix: /a, methods: [GET, HEAD]}}
            - {name: b, backend: echo, match: *m}
        """)})
    rules = load_dir(d).routes["app"].resource.spec.rules
    assert rules[0].match == rules[1].match and rules[1].match.methods == ["GET", "HEAD"]


def test_huge_numbers_deep_nesting_and_control_characters_give_one_line_each(tmp_path):
    d = policies(str(tmp_path / "p"))
    write_policies(d, {
        "int.yaml": "kind: Gateway\nmetadata: {name: big}\nspec: {fleet: big, listeners: [{name: h, port: "
                    + "9" * 5000 + "}]}",
        "keys.yaml": "kind: Gateway\nmetadata: {name: keys}\n"
                     'spec: {fleet: k, listeners: [{name: h, port: 1}], "fle\\r\\net\\u2028x": 1}',
        "deep.yaml": "kind: Route\nmetadata: {name: deep}\nspec: " + "[" * 150 + "]" * 150})
    assert rejected(validate(d)) == [
        f"{d}/deep.yaml:4:107: nested more than 100 levels deep",
        f"{d}/int.yaml:4:48: spec.listeners[0].port: integer too long (5000 characters); quote it to make it "
        "a string",
        f"{d}/keys.yaml:4:51: spec.fle\\r\\net\\u2028x: unknown field (did you mean 'fleet'?)"]


def test_a_kind_that_is_not_a_string_is_a_problem_not_a_crash(tmp_path):
    d = policies(str(tmp_path / "p"))  # found by the policy fuzzer: TypeError (unhashable type)
    write_policies(d, {"list.yaml": "kind: [Gateway]\nmetadata: {name: a}\nspec: {}",
                       "map.yaml": "kind: {a: b}\nmetadata: {name: b}\nspec: {}"})
    assert rejected(validate(d)) == [
        f"{d}/list.yaml:2:7: kind: unknown kind ['Gateway']: expected one of Gateway, Backend, Route, AuthPolicy",
        f"{d}/map.yaml:2:7: kind: unknown kind {{'a': 'b'}}: expected one of Gateway, Backend, Route, AuthPolicy"]


@pytest.mark.parametrize(("where", "problem"), [
    ("clientSecret: TOPSECRET-inline-0123456789",
     "oidc.yaml:6:65: spec.oidc.clientSecret: expected a mapping, got str (not shown: a secret)"),
    ("clientSecret: {env: TOPSECRET-in-env-0123456789}",
     "oidc.yaml:6:71: spec.oidc.clientSecret.env: invalid env (not shown: a secret): does not match "
     "^[A-Za-z_][A-Za-z0-9_]*$"),
    ("clientSecret: {env: TopSecretInEnv0123456789}",
     "oidc.yaml:6:65: spec.oidc.clientSecret: environment variable (name not shown: not an upper-case "
     "variable name) is not set or empty"),
    ("clientSecret: {file: secret.yaml}",  # a secret file named *.yaml in the policy directory
     "secret.yaml:1:1: holds a secret (spec.oidc.clientSecret.file of the AuthPolicy at {d}/authz/oidc.yaml:1:1) "
     "and is also read as a policy file: rename it (not *.yaml/*.yml) or move it out of the policy directory "
     "(its content is not shown)"),
], ids=["inline", "env-not-a-name", "env-odd-name", "yaml-file"])
def test_secrets_never_reach_an_error(tmp_path, where, problem):
    d = policies(str(tmp_path / "p"))
    if "secret.yaml" in where:
        with open(os.path.join(d, "authz", "secret.yaml"), "w") as f:
            f.write("TOPSECRET-in-a-file-0123456789\n")
    write_policies(d, {"authz/oidc.yaml": f"""
        kind: AuthPolicy
        metadata: {{name: sso}}
        spec:
          targetRef: {{kind: Route, name: app, rule: open}}
          oidc: {{issuer: "https://idp.test", clientId: c, {where},
                 authorizationEndpoint: "https://idp.test/a", tokenEndpoint: "https://idp.test/t",
                 jwksUri: "https://idp.test/k", redirectPath: /callback}}
        """})
    result = validate(d)
    assert f"{d}/authz/{problem.format(d=d)}" in rejected(result)
    assert "TOPSECRET" not in result.stderr.upper()


def test_setpriv_drops_the_permission_override():
    """The unprivileged tests above mean something only if root really loses DAC override."""
    assert shutil.which("setpriv")
    result = subprocess.run([*UNPRIVILEGED, "cat", "/proc/self/status"], capture_output=True, text=True, check=True)
    effective = next(line for line in result.stdout.splitlines() if line.startswith("CapEff:"))
    assert int(effective.split()[1], 16) & 0b110 == 0  # CAP_DAC_OVERRIDE (1), CAP_DAC_READ_SEARCH (2)


def test_swaps_and_saves_made_while_a_reload_is_applied_are_not_missed(tmp_path):
    """git-sync may repoint the directory, and an editor save, right while a reload is applied;
    a hook of the store makes that moment exact: neither change may wait for another event."""
    def tree(sha: str, prefix: str) -> None:
        route = f"kind: Route\nmetadata: {{name: app}}\nspec: {{gateway: edge, rules: [{{name: a, backend: echo, " \
                f"match: {{pathPrefix: {prefix}}}}}]}}"
        write_policies(str(tmp_path / sha), {"all.yaml": documents(gateway("edge", 8080), backend("echo", 9), route)})

    def point(sha: str) -> None:
        os.symlink(tmp_path / sha, tmp_path / "policies.new")
        os.replace(tmp_path / "policies.new", tmp_path / "policies")

    def prefix(policies) -> str:  # -> the route's path prefix
        return policies.routes["app"].resource.spec.rules[0].match.path_prefix

    for sha in ("aaa", "bbb", "ccc"):
        tree(sha, f"/{sha}")
    point("aaa")
    cp = ControlPlane(ServeConfig(str(tmp_path / "policies"), xds="127.0.0.1:0", admin="127.0.0.1:0"))
    cp.load()

    def meanwhile(revision) -> None:  # runs in the watcher's reload, before it is published
        if prefix(revision.policies) == "/bbb":
            point("ccc")
        elif prefix(revision.policies) == "/ccc":
            tree("ccc", "/edited")

    cp.store.add_hook(meanwhile)
    plane = InProcess(cp)
    try:
        point("bbb")
        wait_for(lambda: prefix(cp.store.current.policies) == "/edited", "the swap and the save made meanwhile")
    finally:
        plane.close()
