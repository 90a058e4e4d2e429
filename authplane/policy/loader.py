"""Load every policy file of a directory into the typed model, collecting every problem."""

from __future__ import annotations

import difflib
import errno
import os
import stat
import time
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any, Generic, TypeVar

import pydantic

from authplane.contract import API_VERSION
from authplane.errors import PolicyError, Problem
from authplane.policy.credentials import Entry
from authplane.policy.model import KINDS, AuthPolicy, Backend, Gateway, Route, SecretRef
from authplane.policy.oidc import ResolvedOidc
from authplane.policy.yamlpos import Document, Path, YamlProblem, load_documents

T = TypeVar("T", Gateway, Backend, Route, AuthPolicy)

_TEMP_SUFFIXES = ("~", ".swp", ".swx", ".tmp", ".bak", ".orig")


DEFAULT_MAX_FILE_SIZE = 4 * 1024 * 1024
"""Largest file read (policy, JWKS, key, secret files); ``--max-file-size`` changes it."""
SETTLE_SECONDS = 0.03
"""``serve`` reads a policy file once its size and times have not changed for this long (waiting
at most ten times as long), so a file being written is not applied half-written."""


def relative_to(policy_file: str, rel: str) -> str:
    """The path of a file a policy file names (JWKS, keys, secrets): relative to the policy file."""
    return os.path.normpath(os.path.join(os.path.dirname(policy_file), rel))


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

    def relative(self, rel: str) -> str:
        """A file named in this document, relative to the document's file."""
        return relative_to(self.path, rel)


@dataclass(frozen=True)
class Item(Generic[T]):
    obj: T
    source: Source

    @property
    def name(self) -> str:
        return self.obj.metadata.name


@dataclass(frozen=True)
class Resolved:
    """What one AuthPolicy's referenced files and discovery gave, read once by the resolve stage
    (``resolve.py``); the compiler and the decision service read only this, never the files."""

    jwks: dict[str, str] = field(default_factory=dict)
    """``jwt`` provider name → its JWKS file's text (providers with ``jwks.file``)."""
    users: tuple[Entry, ...] = ()
    """``basicAuth``: the htpasswd file's users."""
    keys: tuple[Entry, ...] = ()
    """``apiKey``: the key file's (client, key) entries."""
    ext_keys: str | None = field(default=None, repr=False)
    """``extAuth.apiKeys``: the key file's text (the decision service hashes the keys)."""
    oidc: ResolvedOidc | None = field(default=None, repr=False)
    """``oidc``: endpoints (discovery) and secrets."""


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
    resolved: dict[str, Resolved] = field(default_factory=dict, repr=False)
    """AuthPolicy name → what its referenced files and OIDC discovery gave (the resolve stage)."""
    warnings: list[Problem] = field(default_factory=list)
    broken: set[tuple[str, str]] = field(default_factory=set)
    """(kind, name) of documents that failed to load: references to them are not reported again."""
    texts: dict[str, str] = field(default_factory=dict, repr=False)
    """Policy file path → the text loaded (a reload keeps it for a file found empty)."""
    max_file_size: int = DEFAULT_MAX_FILE_SIZE

    def read_text(self, path: str) -> str:
        """A file the policies name, read like policy files (see ``read_file``)."""
        return read_file(path, self.max_file_size).decode("utf-8")

    def table(self, kind: str) -> dict[str, Item[Any]]:
        return {"Gateway": self.gateways, "Backend": self.backends, "Route": self.routes,
                "AuthPolicy": self.policies}[kind]


def _dotted(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def policy_files(root: str) -> list[str]:
    """``*.yaml``/``*.yml`` under root, recursively, without hidden and editor temporary files.
    Raises PolicyError naming every directory that cannot be listed: a part of the policies must
    never go missing silently."""
    found: list[str] = []
    unlisted: list[Problem] = []

    def failed(e: OSError) -> None:
        if e.errno not in (errno.ENOENT, errno.ENOTDIR):  # removed while we looked: simply gone
            unlisted.append(Problem(str(e.filename or root), 1, 1, "", f"cannot read directory: {e.strerror}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=failed):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith((".", "#", "~")) or name.endswith(_TEMP_SUFFIXES):
                continue
            if name.endswith((".yaml", ".yml")):
                found.append(os.path.join(dirpath, name))
    if unlisted:
        raise PolicyError(unlisted)
    return found


def read_file(path: str, limit: int = DEFAULT_MAX_FILE_SIZE, settle: float = 0.0) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; else OSError with a ``strerror``.

    Nothing read can block or grow without bound: a FIFO or device is refused before it is opened
    (and after, by fstat: the open is non-blocking), and at most ``limit + 1`` bytes are read
    (``/dev/zero``). Symlinks to regular files are followed. With ``settle``, the read waits until
    the file has not changed for ``settle`` seconds (at most ``10 * settle``)."""
    _regular(os.stat(path), limit)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        _regular(_settled(fd, settle) if settle else os.fstat(fd), limit)
        chunks: list[bytes] = []
        left = limit + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:  # grew since fstat
            raise OSError(errno.EFBIG, _too_big(limit))
        return b"".join(chunks)
    finally:
        os.close(fd)


def _too_big(limit: int) -> str:
    size = f"{limit // 1048576} MiB" if limit % 1048576 == 0 else f"{limit} bytes"
    return f"larger than {size} (see --max-file-size)"


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _regular(st: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "special")
        raise OSError(errno.EINVAL, f"not a regular file ({kind})")
    if st.st_size > limit:
        raise OSError(errno.EFBIG, _too_big(limit))


def _settled(fd: int, settle: float) -> os.stat_result:
    """fstat once the file has been unchanged for ``settle`` seconds, or ``10 * settle`` passed."""
    deadline = time.monotonic() + 10 * settle
    st = os.fstat(fd)
    age = time.time() - st.st_mtime_ns / 1e9
    while age < settle and time.monotonic() < deadline:
        time.sleep(max(0.001, min(settle - max(age, 0.0), deadline - time.monotonic())))
        again = os.fstat(fd)
        if (again.st_size, again.st_mtime_ns, again.st_ctime_ns) == (st.st_size, st.st_mtime_ns, st.st_ctime_ns):
            return again  # unchanged for a whole window (also when the mtime lies in the future)
        st, age = again, time.time() - again.st_mtime_ns / 1e9
    return st


def is_policy_file(path: str) -> bool:
    name = os.path.basename(path)
    return (name.endswith((".yaml", ".yml")) and not name.startswith((".", "#", "~"))
            and not any(p.startswith(".") for p in FsPath(path).parts[:-1] if p not in (".", "..")))


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
        msg = "missing required field" if got is None else f"must be {API_VERSION}, got {_Quoted(got)!r}"
        out.append(src.problem(("apiVersion",), msg, key=got is None))
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        msg = ("missing required field" if kind is None
               else f"unknown kind {_Quoted(kind)!r}: expected one of {', '.join(KINDS)}")
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
            msg = _translate(err, secret=_is_secret(model, loc))
            if err["type"] == "extra_forbidden":
                known = _known_fields(model, loc)
                close = difflib.get_close_matches(str(loc[-1]), known, n=1)
                msg += f" (did you mean {close[0]!r}?)" if close else (
                    f" (expected one of: {', '.join(known)})" if known else "")
            out.append(src.problem(loc, msg, key=on_key))
        return None
    return Item(obj, src)


SECRET_FILES = (("oidc", "clientSecret", "file"), ("oidc", "hmacSecret", "file"), ("basicAuth", "file"),
                ("apiKey", "file"), ("extAuth", "apiKeys", "file"))
"""Where an AuthPolicy's ``spec`` names a file holding secrets (client secrets, hashes, keys)."""


def _secret_files(path: str, data: Any) -> dict[str, str]:
    """{file: field that names it} for the secret files a document names, valid or not."""
    out: dict[str, str] = {}
    for fields in SECRET_FILES:
        value = data.get("spec") if isinstance(data, dict) and data.get("kind") == "AuthPolicy" else None
        for name in fields:
            value = value.get(name) if isinstance(value, dict) else None
        if isinstance(value, str):
            out[relative_to(path, value)] = "spec." + ".".join(fields)
    return out


def _hide_secret_files(problems: list[Problem], texts: dict[str, str],
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


def load_texts(texts: dict[str, str], root: str = ".", max_file_size: int = DEFAULT_MAX_FILE_SIZE) -> Policies:
    """Load policies from ``{path: yaml text}``; raises PolicyError with every problem."""
    problems: list[Problem] = []
    items: list[Item[Any]] = []
    broken: set[tuple[str, str]] = set()
    secrets: dict[str, tuple[str, str]] = {}
    for path in sorted(texts):
        try:
            docs = load_documents(texts[path])
        except YamlProblem as e:
            problems.append(Problem(path, e.line, e.col, _dotted(e.path), e.message))
            continue
        for doc in docs:
            for secret, where in _secret_files(path, doc.data).items():
                secrets.setdefault(secret, (f"{path}:{doc.line}:{doc.col}", where))
            item = _check_document(path, doc, problems, broken)
            if item is not None:
                items.append(item)
    policies = Policies(root=root, broken=broken, texts=dict(texts), max_file_size=max_file_size)
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
    from authplane.policy.resolve import resolve  # the later stages need the whole set
    from authplane.policy.validate import validate

    problems += validate(policies)
    problems += resolve(policies)
    if problems:
        raise PolicyError(_hide_secret_files(problems, texts, secrets))
    return policies


def load_dir(root: str, max_file_size: int = DEFAULT_MAX_FILE_SIZE, settle: float = 0.0,
             previous: dict[str, str] | None = None) -> Policies:
    """Load and validate every policy file under ``root``.

    ``previous`` (policy file → text of the revision being served) lets a reload keep the
    documents of a file found empty, as a file being rewritten is for a moment: an empty file
    must not drop a policy, so it keeps its previous documents, with a warning, until it has
    content again or is deleted. ``settle``: see ``read_file``."""
    if not os.path.exists(root):
        raise PolicyError([Problem(root, 1, 1, "", "no such directory")])
    paths = [root] if os.path.isfile(root) else policy_files(root)
    if not paths:
        raise PolicyError([Problem(root, 1, 1, "", "no policy files (*.yaml, *.yml) found")])
    texts: dict[str, str] = {}
    problems: list[Problem] = []
    kept: list[Problem] = []
    for path in paths:
        try:
            data = read_file(path, max_file_size, settle)
            texts[path] = data.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(Problem(path, 1, 1, "", f"not a UTF-8 text file ({e.reason} at byte "
                                                    f"{e.start})"))
        except FileNotFoundError:
            continue  # deleted since it was listed (or a dangling symlink): simply gone
        except OSError as e:
            problems.append(Problem(path, 1, 1, "", f"cannot read: {e.strerror}"))
        else:
            if not data and (previous or {}).get(path):
                texts[path] = (previous or {})[path]
                kept.append(Problem(path, 1, 1, "", "the file is empty (being written?): its previous "
                                                    "documents stay in force until it has content or is deleted"))
    try:
        policies = load_texts(texts, root=root, max_file_size=max_file_size)
    except PolicyError as e:
        raise PolicyError(problems + e.problems) from None
    if problems:
        raise PolicyError(problems)
    policies.warnings[:0] = kept
    return policies
