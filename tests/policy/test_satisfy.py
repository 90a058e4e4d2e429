"""``satisfy``: the short and long forms, and what ``any`` needs (validation, any target)."""

from __future__ import annotations

import pytest

from authplane.policy.loader import load_dir
from tests.policy.test_errors import GATEWAY, RULE, TARGET, policy, problems, route

JWT = "  jwt: {providers: [{name: dev, jwks: {uri: https://idp.example.com/jwks}}]}\n"
KEY = "  apiKey: {file: keys}\n"
BASIC = "  basicAuth: {file: users}\n"
FILES = {"keys": "ci: ci-key\n", "users": "alice:{SHA}" + "A" * 27 + "=\n", "r.yaml": route(RULE)}
GATEWAY_TARGET = "  targetRef: {kind: Gateway, name: edge}\n"


def test_short_and_long_forms(tmp_path):
    for rel, text in {**FILES, "base.yaml": GATEWAY,
                      "p.yaml": policy(TARGET + "  satisfy: any\n" + JWT + KEY),
                      "q.yaml": policy(GATEWAY_TARGET + "  satisfy: {mode: any, methodHeader: x-auth-method}\n"
                                       + JWT + BASIC, name="q")}.items():
        (tmp_path / rel).write_text(text)
    pols = load_dir(str(tmp_path)).auth_policies
    assert pols["p"].resource.spec.satisfy.mode == "any"
    assert pols["q"].resource.spec.satisfy.method_header == "x-auth-method"


@pytest.mark.parametrize(("target", "checks", "message"), [
    (TARGET, KEY, "satisfy: any needs at least two of jwt, apiKey, basicAuth (this policy has apiKey)"),
    (GATEWAY_TARGET, JWT, "satisfy: any needs at least two of jwt, apiKey, basicAuth (this policy has jwt)"),
    (TARGET, JWT.replace("{providers", "{required: false, providers") + KEY, "required: false would let every"),
    (TARGET, JWT + "  apiKey: {file: keys, header: authorization}\n", "the API key needs a header of its own"),
    (TARGET, JWT + "  apiKey: {file: keys, query: access_token}\n", "the API key needs a query of its own"),
])
def test_what_any_needs(tmp_path, target, checks, message):
    found = problems(tmp_path, {**FILES, "p.yaml": policy(target + "  satisfy: any\n" + checks)})
    assert any(message in p for p in found), found


def test_method_header_needs_any(tmp_path):
    found = problems(tmp_path, {**FILES, "p.yaml": policy(TARGET + "  satisfy: {methodHeader: x-m}\n" + JWT)})
    assert found == ["p.yaml:6:12: spec.satisfy: methodHeader needs mode: any"], found
