"""HTTPS listeners, client-certificate conditions and Backend TLS in the policy model and the
resolve stage: what is refused, where, and that private keys stay out of reprs."""

from __future__ import annotations

import os

import pytest

from authplane.errors import PolicyError
from authplane.policy.loader import load_dir
from tests.support.certs import CA
from tests.support.policies import write_policies

BACKEND_AND_ROUTE = """
kind: Backend
metadata: {name: app}
spec: {endpoints: ["127.0.0.1:9"]}
---
kind: Route
metadata: {name: app}
spec: {gateway: edge, rules: [{name: main, backend: app}]}
"""


def _load(tmp_path, listeners: str, extra: str = ""):
    ca = CA(str(tmp_path / "p" / "tls"), "ca")
    ca.issue("a", ["a.example.com", "shared.example.com"])
    ca.issue("b", ["b.example.com", "shared.example.com"])
    ca.issue("old", ["a.example.com"], expired=True)
    gateway = f"kind: Gateway\nmetadata: {{name: edge}}\nspec:\n  fleet: edge\n  listeners:\n{listeners}"
    d = write_policies(str(tmp_path / "p"), {"p.yaml": "---\n".join(
        x for x in (gateway, BACKEND_AND_ROUTE, extra) if x)})
    return d, load_dir(d)


def _problems(tmp_path, listeners: str, extra: str = "") -> list[str]:
    with pytest.raises(PolicyError) as e:
        _load(tmp_path, listeners, extra)
    return [str(p) for p in e.value.problems]


HTTPS = "    - {{name: https, port: 8443, protocol: https, tls: {{certificates: [{certs}]}}}}\n"


def test_certificates_read_with_their_names_and_keys_kept_out_of_reprs(tmp_path):
    _, policies = _load(tmp_path, HTTPS.format(certs="{certFile: tls/a.crt, keyFile: tls/a.key}"))
    material = policies.listener_tls["edge/https"]
    assert material.certificates[0].dns_names == ("a.example.com", "shared.example.com")
    assert "PRIVATE KEY" in material.certificates[0].key and "PRIVATE KEY" not in repr(policies)
    assert any(p.endswith("a.key") for p in policies.files)  # watched: a rotation is a reload


@pytest.mark.parametrize(("certs", "message"), [
    ("{certFile: tls/a.crt, keyFile: tls/b.key}", "is not the key of the certificate in 'tls/a.crt'"),
    ("{certFile: tls/old.crt, keyFile: tls/old.key}", "expired on"),
    ("{certFile: tls/a.key, keyFile: tls/a.key}", "is not a PEM certificate"),
    ("{certFile: tls/a.crt, keyFile: tls/a.crt}", "is not a PEM private key"),
    ("{certFile: tls/none.crt, keyFile: tls/a.key}", "cannot read certFile 'tls/none.crt'"),
    ("{certFile: tls/a.crt, keyFile: tls/a.key}, {certFile: tls/b.crt, keyFile: tls/b.key}",
     "'shared.example.com' is also a name of certificate 0"),
])
def test_a_bad_certificate_is_refused_at_its_cert_file(tmp_path, certs, message):
    problems = _problems(tmp_path, HTTPS.format(certs=certs))
    assert len(problems) == 1 and message in problems[0], problems
    index = 1 if "also a name" in message else 0
    assert f"spec.listeners[0].tls.certificates[{index}].certFile" in problems[0]
    path = os.path.join(str(tmp_path / "p"), "p.yaml")
    with open(path) as f:
        line = f.read().splitlines()[6]  # the listener, in flow style
    col = [i for i in range(len(line)) if line.startswith("certFile: ", i)][index] + len("certFile: ") + 1
    assert problems[0].startswith(f"{path}:7:{col}:"), problems


@pytest.mark.parametrize(("listeners", "message"), [
    ("    - {name: h, port: 1, protocol: https}\n", "protocol: https needs tls"),
    ("    - {name: h, port: 1, tls: {certificates: [{certFile: a, keyFile: b}]}}\n", "tls needs protocol: https"),
    ("    - {name: h, port: 1, redirectToHttps: true}\n", "redirectToHttps needs a protocol: https listener"),
])
def test_listener_shapes(tmp_path, listeners, message):
    problems = _problems(tmp_path, listeners)
    assert any(message in p for p in problems), problems


def test_client_cert_conditions_are_for_authorization_rules_only(tmp_path):
    policy = """
kind: AuthPolicy
metadata: {name: app}
spec:
  targetRef: {kind: Route, name: app}
  extAuth:
    service: builtin
    rules: [{name: r, action: allow, when: {clientCert: {sans: [a]}}}]
"""
    problems = _problems(tmp_path, "    - {name: h, port: 1}\n", policy)
    assert any("clientCert conditions are for authorization rules" in p for p in problems), problems


def test_backend_tls_needs_cert_and_key_together(tmp_path):
    backend = "kind: Backend\nmetadata: {name: up}\nspec: {endpoints: [\"x:1\"], tls: {certFile: tls/a.crt}}\n"
    problems = _problems(tmp_path, "    - {name: h, port: 1}\n", backend)
    assert any("set both certFile and keyFile" in p for p in problems), problems


def test_backend_tls_true_still_means_the_system_trust_store(tmp_path):
    backend = "kind: Backend\nmetadata: {name: up}\nspec: {endpoints: [\"x:1\"], tls: true}\n"
    _, policies = _load(tmp_path, "    - {name: h, port: 1}\n", backend)
    assert policies.backends["up"].resource.spec.tls is True and "up" not in policies.backend_tls


def test_client_cert_rules_without_client_validation_are_warned_about(tmp_path):
    policy = """
kind: AuthPolicy
metadata: {name: app}
spec:
  targetRef: {kind: Route, name: app}
  authorization: {rules: [{name: r, action: allow, when: {not: {clientCert: {sans: [a]}}}}]}
"""
    _, policies = _load(tmp_path, HTTPS.format(certs="{certFile: tls/a.crt, keyFile: tls/a.key}"), policy)
    assert any("clientCert conditions never match" in str(w) for w in policies.warnings), policies.warnings
    with_ca = "    - {name: https, port: 8443, protocol: https, tls: {certificates: [{certFile: tls/a.crt, " \
              "keyFile: tls/a.key}], clientValidation: {caFile: tls/ca.crt}}}\n"
    _, policies = _load(tmp_path, with_ca, policy)
    assert not any("clientCert" in str(w) for w in policies.warnings), policies.warnings


def test_a_later_certificate_without_dns_names_is_warned_about(tmp_path):
    CA(str(tmp_path / "p" / "tls"), "ip-ca").issue("ip", ["127.0.0.1"])
    _, policies = _load(tmp_path, HTTPS.format(
        certs="{certFile: tls/a.crt, keyFile: tls/a.key}, {certFile: tls/ip.crt, keyFile: tls/ip.key}"))
    assert any("no client's SNI selects it" in str(w) for w in policies.warnings), policies.warnings
