"""The policy reference is generated from the model and matches the JSON Schema."""

from __future__ import annotations

import argparse
import glob
import os
import re

from authplane.policy.loader import load_texts
from authplane.policy.reference import EXAMPLE, generate
from authplane.policy.schema import json_schema
from tests.support import ROOT


def test_reference_is_up_to_date():
    with open(os.path.join(ROOT, "docs", "policy-reference.md")) as f:
        assert f.read() == generate(), (
            "run: python -m authplane.policy.reference > docs/policy-reference.md")


def test_reference_documents_every_schema_field():
    text = generate()
    for name, definition in json_schema()["$defs"].items():
        for field, prop in definition.get("properties", {}).items():
            if name in ("Gateway", "Backend", "Route", "AuthPolicy"):
                continue  # document envelopes: described in the introduction
            assert f"| `{field}` |" in text, f"{name}.{field} missing from the reference"
            assert prop.get("description"), f"{name}.{field} has no description"


def test_reference_example_is_valid():
    policies = load_texts({"example.yaml": EXAMPLE})
    assert set(policies.auth_policies) == {"edge-auth", "openai-chat", "openai-health"}


def _docs() -> dict[str, str]:
    paths = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
    out = {}
    for path in paths:
        with open(path) as f:
            out[path] = f.read()
    return out


def test_links_and_named_files_exist():
    for path, text in _docs().items():
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in target:
                assert os.path.exists(os.path.join(os.path.dirname(path), target)), f"{path}: link to {target}"
        for named in set(re.findall(r"`((?:policies|envoy|bench|tests|docs)/[\w./-]*\w)`", text)):
            assert os.path.exists(os.path.join(ROOT, named)), f"{path}: names {named}, which does not exist"


def test_readme_lists_every_command_and_runs_the_demo():
    from authplane.cli import build_parser

    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for command in sub.choices:
        assert f"| `authplane {command}" in readme, f"README's command table lacks {command}"
    run = readme.split("<!-- run-command -->\n```sh\n")[1].split("\n")[0]
    assert run.endswith(".venv/bin/authplane demo")
    test = readme.split("<!-- test-command -->\n```sh\n")[1].split("\n")[0]
    assert "pytest" in test
