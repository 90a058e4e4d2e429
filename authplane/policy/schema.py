"""JSON Schema of policy files, generated from the model (for editors and CI)."""

from __future__ import annotations

from typing import Any

import pydantic

from authplane.contract import API_VERSION
from authplane.policy.model import PolicyDocument


def json_schema() -> dict[str, Any]:
    schema = pydantic.TypeAdapter(PolicyDocument).json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = f"authplane policy document ({API_VERSION})"
    return schema
