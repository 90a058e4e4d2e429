"""Load every policy file of a directory into the typed model, collecting every problem."""

from __future__ import annotations

import difflib
import os
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any, Generic, TypeVar

import pydantic

from authplane import API_VERSION
from authplane.errors import PolicyError, Problem
from authplane.policy.model import KINDS, AuthPolicy, Backend, Gateway, Route
from authplane.policy.oidc import ResolvedOidc
from authplane.policy.yamlpos import Document, Path, YamlProblem, load_documents

T = TypeVar("T", Gateway, Backend, Route, AuthPolicy)

_TEMP_SUFFIXES = ("~", ".swp", ".swx", ".tmp", ".bak", ".orig")


@dataclass(frozen=True)
class Source:
    """Where a policy object was written; ``doc`` maps field paths to positions."""

    path: str
    line: int
    col: int
    doc: Document = field(compare=False, repr=False)

    def at(self, path: Path, key: bool = False) -> tuple[int, int]:
        return self.doc.pos(path, key)

    def problem(self, path: Path, message: str, key: bool = False) -> Problem:
        line, col = self.at(path, key)
        return Problem(self.path, line, col, _dotted(path), message)

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Item(Generic[T]):
    obj: T
    source: Source

    @property
    def name(self) -> str:
        return self.obj.metadata.name


@dataclass
class Policies:
    """Every valid object of a policy directory, in a stable order (by name)."""

    root: str
    gateways: dict[str, Item[Gateway]] = field(default_factory=dict)
    backends: dict[str, Item[Backend]] = field(default_factory=dict)
    routes: dict[str, Item[Route]] = field(default_factory=dict)
    policies: dict[str, Item[AuthPolicy]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    """Other files the policies read (JWKS files ...): path → content, part of the version."""
    oidc: dict[str, ResolvedOidc] = field(default_factory=dict, repr=False)
    """AuthPolicy name → its ``oidc`` section's endpoints and secrets, resolved at load time."""
    warnings: list[Problem] = field(default_factory=list)
    broken: set[tuple[str, str]] = field(default_factory=set)
    """(kind, name) of documents that failed to load: references to them are not reported again."""

    def table(self, kind: str) -> dict[str, Item[Any]]:
        return {"Gateway": self.gateways, "Backend": self.backends, "Route": self.routes,
                "AuthPolicy": self.policies}[kind]


def _dotted(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def policy_files(root: str) -> list[str]:
    """``*.yaml``/``*.yml`` under root, recursively, without hidden and editor temporary files."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith((".", "#", "~")) or name.endswith(_TEMP_SUFFIXES):
                continue
            if name.endswith((".yaml", ".yml")):
                found.append(os.path.join(dirpath, name))
    return found


def is_policy_file(path: str) -> bool:
    name = os.path.basename(path)
    return (name.endswith((".yaml", ".yml")) and not name.startswith((".", "#", "~"))
            and not any(p.startswith(".") for p in FsPath(path).parts[:-1] if p not in (".", "..")))


def _translate(err: Any) -> str:
    """pydantic's messages, reworded for people editing YAML."""
    kind, loc, value = err["type"], err["loc"], err.get("input")
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
        return f"expected {type_names[kind]}, got {_describe(value)}"
    return str(err["msg"])


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


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
                    broken: set[tuple[str, str]]) -> Item[Any] | None:
    src = Source(path, doc.line, doc.col, doc)
    data = doc.data
    if not isinstance(data, dict):
        out.append(src.problem((), "expected a mapping with apiVersion, kind, metadata and spec, "
                                   f"got {_describe(data)}"))
        return None
    problems_before = len(out)
    if data.get("apiVersion") != API_VERSION:
        got = data.get("apiVersion")
        msg = "missing required field" if got is None else f"must be {API_VERSION}, got {got!r}"
        out.append(src.problem(("apiVersion",), msg, key=got is None))
    kind = data.get("kind")
    if kind not in KINDS:
        msg = ("missing required field" if kind is None
               else f"unknown kind {kind!r}: expected one of {', '.join(KINDS)}")
        out.append(src.problem(("kind",), msg))
        return None
    if len(out) > problems_before:
        return None
    model = KINDS[kind]
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
            msg = _translate(err)
            if err["type"] == "extra_forbidden":
                known = _known_fields(model, loc)
                close = difflib.get_close_matches(str(loc[-1]), known, n=1)
                msg += f" (did you mean {close[0]!r}?)" if close else (
                    f" (expected one of: {', '.join(known)})" if known else "")
            out.append(src.problem(loc, msg, key=on_key))
        return None
    return Item(obj, src)


def load_texts(texts: dict[str, str], root: str = ".") -> Policies:
    """Load policies from ``{path: yaml text}``; raises PolicyError with every problem."""
    problems: list[Problem] = []
    items: list[Item[Any]] = []
    broken: set[tuple[str, str]] = set()
    for path in sorted(texts):
        try:
            docs = load_documents(texts[path])
        except YamlProblem as e:
            problems.append(Problem(path, e.line, e.col, _dotted(e.path), e.message))
            continue
        for doc in docs:
            item = _check_document(path, doc, problems, broken)
            if item is not None:
                items.append(item)
    policies = Policies(root=root, broken=broken)
    for item in items:
        table = policies.table(item.obj.kind)
        if item.name in table:
            first = table[item.name].source
            problems.append(item.source.problem(
                ("metadata", "name"), f"duplicate {item.obj.kind} {item.name!r} "
                f"(first defined at {first})"))
            continue
        table[item.name] = item
    for table_name in ("gateways", "backends", "routes", "policies"):
        table = getattr(policies, table_name)
        setattr(policies, table_name, dict(sorted(table.items())))
    from authplane.policy.validate import validate  # cross-references need the whole set

    problems += validate(policies)
    if problems:
        raise PolicyError(problems)
    return policies


def load_dir(root: str) -> Policies:
    """Load and validate every policy file under ``root``."""
    if not os.path.exists(root):
        raise PolicyError([Problem(root, 1, 1, "", "no such directory")])
    paths = [root] if os.path.isfile(root) else policy_files(root)
    if not paths:
        raise PolicyError([Problem(root, 1, 1, "", "no policy files (*.yaml, *.yml) found")])
    texts: dict[str, str] = {}
    problems: list[Problem] = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                texts[path] = f.read()
        except UnicodeDecodeError as e:
            problems.append(Problem(path, 1, 1, "", f"not a UTF-8 text file ({e.reason} at byte "
                                                    f"{e.start})"))
        except OSError as e:
            problems.append(Problem(path, 1, 1, "", f"cannot read: {e.strerror}"))
    try:
        policies = load_texts(texts, root=root)
    except PolicyError as e:
        raise PolicyError(problems + e.problems) from None
    if problems:
        raise PolicyError(problems)
    return policies
