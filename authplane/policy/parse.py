"""The parse stage: YAML text with positions → typed documents, every problem collected.

Messages are pydantic's, reworded for people editing YAML (with a did-you-mean for unknown
fields); the value of a secret field is never quoted.
"""

from __future__ import annotations

import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import pydantic

from authplane.contract import API_VERSION
from authplane.errors import Problem
from authplane.policy.documents import Located, Source, dotted, relative_to
from authplane.policy.model import DOCUMENT_KINDS, KINDS, SecretRef
from authplane.policy.yamlpos import Document, YamlProblem, load_documents


def _translate(err: Any, secret: bool = False) -> str:
    """pydantic's messages, reworded for people editing YAML; a secret's value is never shown."""
    kind, loc = err["type"], err["loc"]
    value = _Hidden() if secret else _Quoted(err.get("input"))
    if kind == "missing":
        return "missing required field"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "value_error":
        return str(err["msg"]).removeprefix("Value error, ")
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"must be one of {expected}, got {value!r}"
    ctx = err.get("ctx", {})
    bounds = {"less_than_equal": ("at most", "le"), "greater_than_equal": ("at least", "ge"),
              "less_than": ("less than", "lt"), "greater_than": ("greater than", "gt")}
    if kind in bounds:
        word, key = bounds[kind]
        return f"must be {word} {ctx[key]}, got {value!r}"
    if kind == "too_short":
        return f"needs at least {ctx['min_length']} item{'s' if ctx['min_length'] != 1 else ''}"
    if kind == "string_too_long":
        return f"too long (at most {ctx['max_length']} characters)"
    if kind == "string_pattern_mismatch":
        field_name = str(loc[-2] if isinstance(loc[-1], int) and len(loc) > 1 else loc[-1])
        return f"invalid {field_name} {value!r}: does not match {err['ctx']['pattern']}"
    type_names = {"string_type": "a string", "int_type": "an integer", "int_parsing": "an integer",
                  "bool_type": "true or false", "bool_parsing": "true or false",
                  "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
                  "model_attributes_type": "a mapping", "float_type": "a number",
                  "int_from_float": "an integer"}
    if kind in type_names:
        return f"expected {type_names[kind]}, got {_describe(err.get('input'), secret)}"
    return str(err["msg"])


QUOTE_LIMIT = 60


class _Quoted:
    """A value as quoted in a message: its repr, cut to ``QUOTE_LIMIT`` characters."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        text = repr(self.value)
        return text if len(text) <= QUOTE_LIMIT else text[:QUOTE_LIMIT] + "…"


class _Hidden:
    def __repr__(self) -> str:
        return "(not shown: a secret)"


def _describe(value: Any, secret: bool = False) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {_Hidden() if secret else _Quoted(value)!r}"


def _is_secret(model: type[pydantic.BaseModel], loc: tuple[Any, ...]) -> bool:
    """Whether ``loc`` runs through a secret field (a ``SecretRef``): inline secrets and secrets
    written where a variable name belongs must not reach logs and /status."""
    current = model
    for part in loc:
        fields = {(f.alias or n): f for n, f in current.model_fields.items()}
        if isinstance(part, str) and part in fields:
            inner = _inner_model(fields[part].annotation)
            if inner is SecretRef:
                return True
            current = inner or current
    return False


def _known_fields(model: type[pydantic.BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names allowed where an unknown field was found, for a did-you-mean hint."""
    current = model
    for part in loc[:-1]:
        fields = {(f.alias or n): f for n, f in current.model_fields.items()}
        if isinstance(part, str) and part in fields:
            current = _inner_model(fields[part].annotation) or current
    return [(f.alias or n) for n, f in current.model_fields.items()]


def _inner_model(annotation: Any) -> type[pydantic.BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _check_document(path: str, doc: Document, out: list[Problem],
                    broken: set[tuple[str, str]]) -> Located[Any] | None:
    src = Source(path, doc.line, doc.col, doc)
    data = doc.data
    if not isinstance(data, dict):
        out.append(src.problem((), "expected a mapping with apiVersion, kind, metadata and spec, "
                                   f"got {_describe(data)}"))
        return None
    problems_before = len(out)
    if data.get("apiVersion") != API_VERSION:
        got = data.get("apiVersion")
        msg = "missing required field" if got is None else f"must be {API_VERSION}, got {_Quoted(got)!r}"
        out.append(src.problem(("apiVersion",), msg, key=got is None))
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in DOCUMENT_KINDS:
        msg = ("missing required field" if kind is None
               else f"unknown kind {_Quoted(kind)!r}: expected one of {', '.join(KINDS)}")
        out.append(src.problem(("kind",), msg))
        return None
    if len(out) > problems_before:
        return None
    model = DOCUMENT_KINDS[kind]
    try:
        obj = model.model_validate(data)
    except pydantic.ValidationError as e:
        name = (data.get("metadata") or {}).get("name") if isinstance(data.get("metadata"), dict) else None
        if isinstance(name, str):
            broken.add((kind, name))
        for err in e.errors():
            loc = tuple(err["loc"])
            on_key = err["type"] == "extra_forbidden"
            if loc and loc[-1] == "[key]":  # a bad mapping key: point at the key itself
                loc, on_key = loc[:-1], True
            msg = _translate(err, secret=_is_secret(model, loc))
            if err["type"] == "extra_forbidden":
                known = _known_fields(model, loc)
                close = difflib.get_close_matches(str(loc[-1]), known, n=1)
                msg += f" (did you mean {close[0]!r}?)" if close else (
                    f" (expected one of: {', '.join(known)})" if known else "")
            out.append(src.problem(loc, msg, key=on_key))
        return None
    return Located(obj, src)


SECRET_FILES = (("oidc", "clientSecret", "file"), ("oidc", "hmacSecret", "file"), ("basicAuth", "file"),
                ("apiKey", "file"), ("extAuth", "apiKeys", "file"))
"""Where an AuthPolicy's ``spec`` names a file holding secrets (client secrets, hashes, keys)."""


def _secret_files(path: str, data: Any) -> dict[str, str]:
    """{file: field that names it} for the secret files a document names, valid or not."""
    out: dict[str, str] = {}
    spec = data.get("spec") if isinstance(data, dict) and data.get("kind") == "AuthPolicy" else None
    if not isinstance(spec, dict):
        return out
    for fields in SECRET_FILES:
        value = spec
        for name in fields:
            value = value.get(name) if isinstance(value, dict) else None
        if isinstance(value, str):
            out[relative_to(path, value)] = "spec." + ".".join(fields)
    return out


def hide_secret_files(problems: list[Problem], texts: dict[str, str],
                       secrets: dict[str, tuple[str, str]]) -> list[Problem]:
    """A secret file named ``*.yaml`` in the policy directory is read as a policy file too: say
    so once, instead of problems that could quote its content."""
    loaded = {os.path.normpath(path): path for path in texts}
    hidden = {loaded[n] for n in secrets.keys() & loaded.keys()}
    out = [p for p in problems if p.path not in hidden]
    for path in sorted(hidden & {p.path for p in problems}):
        named, where = secrets[os.path.normpath(path)]
        out.append(Problem(path, 1, 1, "", f"holds a secret ({where} of the AuthPolicy at {named}) and is "
                           "also read as a policy file: rename it (not *.yaml/*.yml) or move it out of the "
                           "policy directory (its content is not shown)"))
    return out


@dataclass
class Parsed:
    """Every document of a set of policy files that passed the model, and what did not."""

    documents: list[Located[Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    broken: set[tuple[str, str]] = field(default_factory=set)
    """(kind, name) of documents that failed the model: references to them are not reported again."""
    secret_files: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Path of a secret file a document names → (the document's position, the field naming it)."""


def parse_file(path: str, text: str) -> Parsed:
    """One policy file's documents and problems: a function of its path and text alone, so a
    reload can keep it for a file whose content did not change (``loader.Loader``)."""
    out = Parsed()
    try:
        docs = load_documents(text)
    except YamlProblem as e:
        out.problems.append(Problem(path, e.line, e.col, dotted(e.path), e.message))
        return out
    for doc in docs:
        for secret, where in _secret_files(path, doc.data).items():
            out.secret_files.setdefault(secret, (f"{path}:{doc.line}:{doc.col}", where))
        item = _check_document(path, doc, out.problems, out.broken)
        if item is not None:
            out.documents.append(item)
        doc.data = None  # the typed document replaces it; positions come from the file's text
    return out


def merge(files: list[Parsed]) -> Parsed:
    """Per-file results (in path order) as one, as ``parse`` gives it."""
    out = Parsed()
    for one in files:
        out.documents += one.documents
        out.problems += one.problems
        out.broken |= one.broken
        for secret, where in one.secret_files.items():
            out.secret_files.setdefault(secret, where)
    return out


def parse(texts: dict[str, str]) -> Parsed:
    """``{path: yaml text}`` → typed documents with their positions, in path order."""
    return merge([parse_file(path, texts[path]) for path in sorted(texts)])
