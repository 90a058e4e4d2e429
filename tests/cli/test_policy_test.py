"""``authplane test`` and ``authplane explain``: PolicyTest cases and single requests through a
real Envoy (from the wheel) running the compiled configuration, with the decision service, an echo
upstream and a stub for your own ext_authz service."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from xml.etree import ElementTree

import pytest

from authplane.cli import main
from authplane.policy.loader import load_dir
from authplane.testrun import Harness
from tests.support import ROOT

POLICIES = textwrap.dedent("""\
    apiVersion: authplane.dev/v1alpha1
    kind: Gateway
    metadata: {name: edge}
    spec:
      fleet: edge
      listeners: [{name: http, port: 10000}]
    ---
    apiVersion: authplane.dev/v1alpha1
    kind: Backend
    metadata: {name: app}
    spec: {endpoints: ["app.internal:8080"]}
    ---
    apiVersion: authplane.dev/v1alpha1
    kind: Backend
    metadata: {name: byo-authz}
    spec: {endpoints: ["10.0.0.9:9000"], protocol: http2}
    ---
    apiVersion: authplane.dev/v1alpha1
    kind: Route
    metadata: {name: api}
    spec:
      gateway: edge
      hostnames: [api.example.com]
      rules:
        - {name: admin, match: {pathPrefix: /admin}, backend: app}
        - {name: partner, match: {pathPrefix: /partner}, backend: app}
        - {name: ops, match: {pathPrefix: /ops}, backend: app}
        - {name: health, match: {path: /healthz}, backend: app}
        - {name: rest, match: {pathPrefix: /}, backend: app}
    ---
    apiVersion: authplane.dev/v1alpha1
    kind: AuthPolicy
    metadata: {name: edge-jwt}
    spec:
      targetRef: {kind: Gateway, name: edge}
      jwt:
        providers:
          - name: corp
            jwks: {uri: https://idp.example.com/jwks.json}
            audiences: [api]
            issuer: https://idp.example.com
            claimsToHeaders: {sub: x-user-id}
      authorization:
        default: allow
        rules:
          - {name: no-trace, action: deny, when: {methods: [TRACE]}}
    ---
    apiVersion: authplane.dev/v1alpha1
    kind: AuthPolicy
    metadata: {name: admins}
    spec:
      targetRef: {kind: Route, name: api, rule: admin}
      authorization:
        default: deny
        rules:
          - {name: admins-only, action: allow, when: {claims: {groups: [admins]}}}
          - {name: no-delete, action: deny, when: {methods: [DELETE]}}
    ---
    apiVersion: authplane.dev/v1alpha1
    kind: AuthPolicy
    metadata: {name: partners}
    spec:
      targetRef: {kind: Route, name: api, rule: partner}
      extAuth:
        service: builtin
        rules:
          - name: blue-team
            action: allow
            when: {headers: {x-team: [blue]}}
            upstreamHeaders: {x-partner: blue}
          - {name: others, action: deny}
    ---
    apiVersion: authplane.dev/v1alpha1
    kind: AuthPolicy
    metadata: {name: ops}
    spec:
      targetRef: {kind: Route, name: api, rule: ops}
      extAuth: {service: byo-authz}
    ---
    apiVersion: authplane.dev/v1alpha1
    kind: AuthPolicy
    metadata: {name: health}
    spec:
      targetRef: {kind: Route, name: api, rule: health}
      public: true
    """)

SUITE = textwrap.dedent("""\
    apiVersion: authplane.dev/v1alpha1
    kind: PolicyTest
    metadata: {name: edge-access}
    spec:
      fleet: edge
      stubs: {byo-authz: allow}
      cases:
        - name: admins reach admin
          request:
            method: GET
            path: /admin/users
            host: api.example.com
            headers: {x-team: blue}
            jwt: {provider: corp, claims: {sub: alice, groups: [admins]}}
          expect: {status: 200, upstreamHeaders: {x-user-id: alice}}
        - name: others do not
          request:
            path: /admin/users
            jwt: {provider: corp, claims: {sub: bob, groups: [dev]}}
          expect: {status: 403}
        - name: no token
          request: {path: /admin/users}
          expect: {status: 401}
        - name: admins cannot delete
          request:
            method: DELETE
            path: /admin/users
            jwt: {provider: corp, claims: {sub: alice, groups: [admins]}}
          expect: {status: 403}
        - name: blue partner
          request:
            path: /partner/x
            headers: {x-team: blue}
            jwt: {provider: corp, claims: {sub: carol}}
          expect: {status: 200, upstreamHeaders: {x-partner: blue, x-user-id: carol}}
        - name: red partner
          request:
            path: /partner/x
            headers: {x-team: red}
            jwt: {provider: corp, claims: {sub: carol}}
          expect: {status: 403}
        - name: ops through the stub
          request:
            path: /ops/x
            jwt: {provider: corp, claims: {sub: dave}}
          expect: {status: 200}
        - name: health is public
          request: {path: /healthz}
          expect: {status: 200, upstreamHeaders: {x-user-id: null}}
        - name: trace refused at the gateway
          request:
            method: TRACE
            path: /x
            jwt: {provider: corp, claims: {sub: alice}}
          expect: {status: 403}
    """)


def line_of(text: str, needle: str, after: str = "") -> int:
    """1-based line of the first ``needle`` after the first ``after``."""
    start = text.index(after) if after else 0
    return text[:text.index(needle, start)].count("\n") + 1


@pytest.fixture
def policy_dir(tmp_path):
    d = tmp_path / "policies"
    d.mkdir()
    (d / "edge.yaml").write_text(POLICIES)
    (d / "edge-test.yaml").write_text(SUITE)
    return d


def test_suite_passes_and_is_ignored_by_validate(policy_dir, capsys):
    assert main(["test", str(policy_dir)]) == 0
    out = capsys.readouterr().out
    assert "9 cases: 9 passed, 0 failed" in out
    assert main(["validate", str(policy_dir)]) == 0
    assert "valid: 1 gateways, 1 routes, 2 backends, 5 policies" in capsys.readouterr().out
    assert list(load_dir(str(policy_dir)).tests) == ["edge-access"]


def test_wrong_expectation_fails_with_name_expected_got_and_position(policy_dir, capsys, tmp_path):
    (policy_dir / "edge-test.yaml").write_text(SUITE.replace(
        "    jwt: {provider: corp, claims: {sub: bob, groups: [dev]}}\n      expect: {status: 403}",
        "    jwt: {provider: corp, claims: {sub: bob, groups: [dev]}}\n      expect: {status: 200}"))
    junit = tmp_path / "junit.xml"
    assert main(["test", str(policy_dir), "--junit", str(junit)]) == 1
    err = capsys.readouterr().err
    case_line = line_of(SUITE, "- name: others do not")
    assert f"FAIL edge-access: others do not ({policy_dir}/edge-test.yaml:{case_line})" in err
    assert "status: expected 200, got 403" in err
    deciding = line_of(POLICIES, "default: deny", after="name: admins}")
    assert f"decided by rbac (route) of policy admins at {policy_dir}/edge.yaml:{deciding}" in err
    assert "9 cases: 8 passed, 1 failed" in err

    root = ElementTree.parse(junit).getroot()
    assert (root.tag, root.get("tests"), root.get("failures")) == ("testsuites", "9", "1")
    [suite] = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == 9 and suite.get("failures") == "1"
    failed = [c for c in cases if c.find("failure") is not None]
    assert [c.get("name") for c in failed] == ["others do not"]
    assert "expected 200, got 403" in (failed[0].find("failure").get("message") or "")


def test_policy_edit_fails_an_unchanged_suite(policy_dir, capsys):
    edited = POLICIES.replace("when: {claims: {groups: [admins]}}", "when: {claims: {groups: [dev]}}")
    edited = edited.replace("upstreamHeaders: {x-partner: blue}", "upstreamHeaders: {x-partner: navy}")
    (policy_dir / "edge.yaml").write_text(edited)
    assert main(["test", str(policy_dir)]) == 1
    err = capsys.readouterr().err
    assert "FAIL edge-access: admins reach admin" in err
    assert "FAIL edge-access: others do not" in err and "status: expected 403, got 200" in err
    assert "FAIL edge-access: blue partner" in err
    assert "upstream header x-partner: expected 'blue', got 'navy'" in err
    assert "9 cases: 6 passed, 3 failed" in err


def test_tests_from_another_path_and_upstream_header_absent(policy_dir, tmp_path, capsys):
    tests = tmp_path / "suites"
    tests.mkdir()
    (policy_dir / "edge-test.yaml").rename(tests / "edge-test.yaml")
    (tests / "more.yaml").write_text(textwrap.dedent("""\
        apiVersion: authplane.dev/v1alpha1
        kind: PolicyTest
        metadata: {name: stub-denies}
        spec:
          fleet: edge
          stubs: {byo-authz: deny}
          cases:
            - name: ops refused by the stub
              request: {path: /ops/x, jwt: {provider: corp, claims: {sub: dave}}}
              expect: {status: 403}
            - name: public route sends no user
              request: {path: /healthz, host: api.example.com}
              expect: {status: 200, upstreamHeaders: {x-user-id: alice}}
        """))
    assert main(["test", str(policy_dir)]) == 2
    assert "no PolicyTest documents" in capsys.readouterr().err
    assert main(["test", str(policy_dir), "--tests", str(tests)]) == 1
    err = capsys.readouterr().err
    assert "FAIL stub-denies: public route sends no user" in err
    assert "upstream header x-user-id: expected 'alice', got (absent)" in err
    assert "11 cases: 10 passed, 1 failed" in err


def test_byo_service_without_stub_is_a_usage_error(policy_dir, capsys):
    (policy_dir / "edge-test.yaml").write_text(SUITE.replace("  stubs: {byo-authz: allow}\n", ""))
    assert main(["test", str(policy_dir)]) == 2
    assert "ext_authz Backend 'byo-authz' needs a stub" in capsys.readouterr().err


def test_duplicate_case_names_are_a_policy_problem(policy_dir, capsys):
    (policy_dir / "edge-test.yaml").write_text(SUITE.replace("- name: no token", "- name: others do not"))
    assert main(["validate", str(policy_dir)]) == 1
    assert "case names must be unique: 'others do not' is used twice" in capsys.readouterr().err


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "authplane.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_explain_names_the_deciding_line_for_deny_and_allow(policy_dir):
    path = f"{policy_dir}/edge.yaml"
    r = run_cli("explain", str(policy_dir), "--fleet", "edge", "GET", "http://api.example.com/admin/users",
                "--claims", '{"sub": "bob", "groups": ["dev"]}')
    assert r.returncode == 0, r.stderr
    default = line_of(POLICIES, "default: deny", after="name: admins}")
    assert f"route: api/admin ({path}:{line_of(POLICIES, '- {name: admin,')})" in r.stdout
    lines = r.stdout.splitlines()
    checks = [[*ln.split()[1:4], ln.split()[5]] for ln in lines if ln.startswith("  ")]
    assert checks == [["jwt_authn", "gateway", "edge-jwt", "pass"], ["rbac", "gateway", "edge-jwt", "pass"],
                      ["rbac", "route", "admins", "deny"]]
    assert "rbac_access_denied_matched_policy[none]" in r.stdout
    assert "status: 403 (answered by Envoy" in r.stdout
    assert f"decided by: rbac (route) of policy admins at {path}:{default}" in r.stdout

    r = run_cli("explain", str(policy_dir), "--fleet", "edge", "GET", "http://api.example.com/partner/x",
                "-H", "x-team: blue", "--claims", '{"sub": "carol"}')
    assert r.returncode == 0, r.stderr
    assert "status: 200 (reached the upstream; via_upstream)" in r.stdout
    assert "ext_authz  route    partners  " in r.stdout
    rule = line_of(POLICIES, "- name: blue-team")
    assert f"decided by: ext_authz (route) of policy partners at {path}:{rule}" in r.stdout

    r = run_cli("explain", str(policy_dir), "--fleet", "edge", "TRACE", "/x", "--claims", '{"sub": "a"}')
    no_trace = line_of(POLICIES, "- {name: no-trace")
    assert f"decided by: rbac (gateway) of policy edge-jwt at {path}:{no_trace}" in r.stdout, r.stdout + r.stderr

    r = run_cli("explain", str(policy_dir), "--fleet", "edge", "GET", "http://api.example.com/admin/users")
    assert "status: 401" in r.stdout and "Jwt_is_missing" in r.stdout
    assert f"decided by: jwt_authn (gateway) of policy edge-jwt at {path}:{line_of(POLICIES, '  jwt:')}" in r.stdout


def test_explain_client_cert_unreadable(policy_dir):
    """``--client-cert`` works over https listeners (tests/cli/test_explain_tls.py); a bad one is one line."""
    r = run_cli("explain", str(policy_dir), "--fleet", "edge", "GET", "/x", "--client-cert", "c.pem")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "authplane explain: --client-cert: cannot read c.pem: No such file or directory"]


def test_harness_stops_every_process(policy_dir):
    h = Harness(load_dir(str(policy_dir)), "edge", {"byo-authz": "allow"}).start()
    try:
        proc = h.envoy.proc
        assert proc is not None and proc.poll() is None
        workdir = h._dir
    finally:
        h.stop()
    assert proc.poll() is not None
    assert not os.path.exists(workdir)
    assert not h._thread.is_alive()


def test_ctrl_c_stops_envoy(policy_dir):
    case = ("    - name: case {i}\n      request: {{path: /admin/users, jwt: {{provider: corp, claims: "
            "{{sub: u{i}, groups: [admins]}}}}}}\n      expect: {{status: 200}}\n")
    (policy_dir / "edge-test.yaml").write_text(
        SUITE.split("  cases:\n")[0] + "  cases:\n" + "".join(case.format(i=i) for i in range(3000)))
    proc = subprocess.Popen([sys.executable, "-m", "authplane.cli", "test", str(policy_dir)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        children: list[str] = []
        for _ in range(600):  # up to 60 s for Envoy to be started
            children = subprocess.run(["pgrep", "-P", str(proc.pid), "-x", "envoy"], capture_output=True,
                                      text=True).stdout.split()
            if children or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert children, "envoy was not started"
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    for pid in children:
        try:
            with open(f"/proc/{pid}/stat") as f:
                assert f.read().split()[2] == "Z", f"envoy {pid} still runs"
        except FileNotFoundError:
            pass
