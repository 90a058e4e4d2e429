"""The resolve stage: every referenced file read once, and what it holds checked against the policy."""

from __future__ import annotations

import pytest

from authplane.errors import PolicyError
from authplane.policy.loader import load_dir
from tests.support.policies import app_gateway, write_policies

KEYED = """
kind: AuthPolicy
metadata: {{name: app}}
spec:
  targetRef: {{kind: Route, name: app}}
  extAuth:
    service: builtin
    apiKeys: {{file: keys.txt}}
    rules:
      - {{name: r, action: allow, when: {when}}}
      - {{name: rest, action: deny}}
"""


def _load(tmp_path, when: str):
    d = write_policies(str(tmp_path / "p"), {"p.yaml": app_gateway(9) + "---\n" + KEYED.format(when=when),
                                             "keys.txt": "acme: k1\n"})
    return load_dir(d)


def test_key_file_read_once_into_the_set(tmp_path):
    policies = _load(tmp_path, "{apiKeys: [acme]}")
    assert policies.resolved["app"].ext_keys == "acme: k1\n"
    assert "acme: k1" not in repr(policies.resolved["app"])  # keys never in a repr


@pytest.mark.parametrize(("when", "field"), [
    ("{apiKeys: [ghost]}", "when.apiKeys"),
    ("{not: {apiKeys: [ghost]}}", "when.not.apiKeys"),
])
def test_unknown_api_key_client_is_reported_also_under_not(tmp_path, when, field):
    with pytest.raises(PolicyError) as e:
        _load(tmp_path, when)
    [problem] = e.value.problems
    assert problem.field == f"spec.extAuth.rules[0].{field}"
    assert problem.message == "no client 'ghost' in the API key file 'keys.txt'"
