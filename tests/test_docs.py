"""The policy reference is generated from the model and matches the JSON Schema."""

from __future__ import annotations

import os

from authplane.policy.loader import load_texts
from authplane.policy.reference import EXAMPLE, generate
from authplane.policy.schema import json_schema

ROOT = os.path.join(os.path.dirname(__file__), "..")


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
    assert set(policies.policies) == {"edge-auth", "openai-chat", "openai-health"}
