"""``authplane explain --client-cert``: the request goes over TLS to the fleet's https listener with
the client certificate, through a real Envoy, and ``when.clientCert`` rules are explained."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT
from tests.support.certs import CA

POLICIES = """\
apiVersion: authplane.dev/v1alpha1
kind: Gateway
metadata: {name: edge}
spec:
  fleet: edge
  listeners:
    - name: https
      port: 8443
      protocol: https
      tls:
        certificates: [{certFile: pki/edge.crt, keyFile: pki/edge.key}]
        clientValidation: {caFile: pki/clients-ca.crt}
---
apiVersion: authplane.dev/v1alpha1
kind: Backend
metadata: {name: app}
spec: {endpoints: ["127.0.0.1:9"]}
---
apiVersion: authplane.dev/v1alpha1
kind: Route
metadata: {name: app}
spec:
  gateway: edge
  hostnames: [app.example.com]
  rules: [{name: all, backend: app}]
---
apiVersion: authplane.dev/v1alpha1
kind: AuthPolicy
metadata: {name: services}
spec:
  targetRef: {kind: Gateway, name: edge}
  authorization:
    default: deny
    rules:
      - name: billing
        action: allow
        when: {clientCert: {sans: ["spiffe://corp.example/ns/billing/*"]}}
"""


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.fixture
def policy_dir(tmp_path):
    d = tmp_path / "policies"
    pki = d / "pki"
    CA(str(pki), "edge-ca").issue("edge", ["app.example.com"])
    clients = CA(str(pki), "clients-ca")
    (d / "edge.yaml").write_text(POLICIES)
    billing = clients.issue("billing", ["spiffe://corp.example/ns/billing/api"], client=True)
    (tmp_path / "billing.pem").write_text(  # certificate and key in one file
        (tmp_path / billing.cert).read_text() + (tmp_path / billing.key).read_text())
    clients.issue("web", ["spiffe://corp.example/ns/web/site"], client=True)
    CA(str(tmp_path / "elsewhere"), "other-ca").issue("stranger", ["spiffe://corp.example/ns/billing/api"],
                                                      client=True)
    return d


def explain(policy_dir, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "authplane.cli", "explain", str(policy_dir), "--fleet", "edge",
                           "GET", "https://app.example.com/pay", *flags], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_client_certificate_rules_are_explained(policy_dir, tmp_path):
    path = f"{policy_dir}/edge.yaml"
    r = explain(policy_dir, "--client-cert", str(tmp_path / "billing.pem"))
    assert r.returncode == 0, r.stderr
    assert "route: app/all" in r.stdout
    assert "status: 200 (reached the upstream" in r.stdout
    assert f"decided by: rbac (gateway) of policy services at {path}:{line_of(POLICIES, '- name: billing')}" \
        in r.stdout

    pki = policy_dir / "pki"
    r = explain(policy_dir, "--client-cert", str(pki / "web.crt"), "--client-key", str(pki / "web.key"))
    assert r.returncode == 0, r.stderr
    assert "status: 403 (answered by Envoy" in r.stdout and "rbac_access_denied" in r.stdout
    assert f"decided by: rbac (gateway) of policy services at {path}:{line_of(POLICIES, 'default: deny')}" \
        in r.stdout


def test_client_certificate_problems_are_one_line(policy_dir, tmp_path):
    stranger = tmp_path / "elsewhere"
    r = explain(policy_dir, "--client-cert", str(stranger / "stranger.crt"), "--client-key",
                str(stranger / "stranger.key"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "listener edge/https refused the TLS connection" in r.stderr and "Traceback" not in r.stderr

    for flags, message in ((["--client-cert", str(tmp_path / "missing.pem")], "cannot read"),
                           (["--client-cert", str(policy_dir / "pki" / "web.crt")], "--client-key"),
                           (["--client-key", str(policy_dir / "pki" / "web.key")], "needs --client-cert")):
        r = explain(policy_dir, *flags)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
        assert r.stderr.startswith("authplane explain: ")


SUITE = """\
apiVersion: authplane.dev/v1alpha1
kind: PolicyTest
metadata: {name: mtls}
spec:
  fleet: edge
  cases:
    - name: billing passes
      request: {path: /pay, clientCert: ../billing.pem}
      expect: {status: 200}
    - name: web does not
      request: {path: /pay, clientCert: pki/web.crt, clientKey: pki/web.key}
      expect: {status: 200}
"""


def test_policy_test_cases_with_client_certificates(policy_dir):
    (policy_dir / "mtls-test.yaml").write_text(SUITE)
    r = subprocess.run([sys.executable, "-m", "authplane.cli", "test", str(policy_dir)], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"FAIL mtls: web does not ({policy_dir}/mtls-test.yaml:{line_of(SUITE, '- name: web')})" in r.stderr
    assert "status: expected 200, got 403" in r.stderr
    assert "2 cases: 1 passed, 1 failed" in r.stderr
