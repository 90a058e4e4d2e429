"""Random, truncated and structurally mutated policies never produce a traceback: only PolicyError or
CompileError with well-formed problems (or a valid result)."""

from __future__ import annotations

import contextlib
import copy
import glob
import os
import random
import re
import shutil
import signal
import tempfile
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authplane.compiler.snapshot import compile_policies
from authplane.errors import CompileError, PolicyError
from authplane.policy.loader import load_dir, load_texts
from tests.support import ROOT, TESTDATA

HERE = TESTDATA
SAMPLES = [Path(p).read_text() for p in sorted(glob.glob(f"{HERE}/*.in.yaml"))]


def _load(text: str) -> None:
    path = os.path.join(HERE, "fuzz.yaml")
    try:
        compile_policies(load_texts({path: text}, root=HERE))
    except PolicyError as e:
        _check_problems(e, {path: text})
    except CompileError as e:  # e.g. a truncated sample leaves two policies one logout path
        assert _one_line(str(e)), f"CompileError not one printable line: {e!r}"


# Fixed seeds (derandomize) and no example database: the suite runs the same cases every time.
@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SAMPLES), st.data())
def test_truncated_and_mutated_samples(sample, data):
    cut = data.draw(st.integers(0, len(sample)))
    text = sample[:cut]
    if data.draw(st.booleans()):
        at = data.draw(st.integers(0, len(text)))
        text = text[:at] + data.draw(st.text(max_size=8)) + text[at:]
    _load(text)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.text(max_size=200))
def test_random_text(text):
    _load(text)


_scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=10),
                    st.sampled_from(["edge", "echo", "builtin", "30s", "/api", "10.0.0.0/8"]))
_keys = st.sampled_from(["apiVersion", "kind", "metadata", "name", "spec", "fleet", "listeners",
                         "port", "rules", "backend", "gateway", "targetRef", "jwt", "providers",
                         "jwks", "file", "uri", "authorization", "extAuth", "service", "when",
                         "claims", "action", "match", "pathPrefix"])
_tree = st.recursive(_scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(_keys, inner, max_size=4)),
                     max_leaves=12)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.sampled_from(["Gateway", "Backend", "Route", "AuthPolicy"]), _tree)
def test_random_documents(kind, spec):
    text = yaml.safe_dump({"apiVersion": "authplane.dev/v1alpha1", "kind": kind,
                           "metadata": {"name": "x"}, "spec": spec})
    _load(text)


# --- Structure-level mutations of the valid examples, written as policy directories ----------------
#
# ``policy_case(seed)`` turns one integer into a directory (``{relative path: text}`` over one of the
# example sets) by mutating the parsed documents; ``run_policy_case`` loads and compiles it and
# asserts the outcome is a success or well-formed problems. bench/fuzz.py runs the same two.

ASSET_DIRS = ("jwks", "credentials")  # files the testdata examples refer to


@dataclass
class ExampleSet:
    root: str  # where the referenced files (JWKS, keys, secrets) live
    docs: list[tuple[str, Any]]  # (relative path of the file it came from, parsed document)
    assets: list[str] = field(default_factory=list)  # relative paths of the referenced files


def _example_sets() -> list[ExampleSet]:
    sets = [ExampleSet(HERE, [(os.path.basename(p), d) for d in yaml.safe_load_all(Path(p).read_text())],
                       [os.path.relpath(a, HERE) for d in ASSET_DIRS for a in glob.glob(f"{HERE}/{d}/*")])
            for p in sorted(glob.glob(f"{HERE}/*.in.yaml"))]
    pol = os.path.join(ROOT, "policies")
    files = sorted(glob.glob(f"{pol}/**/*", recursive=True))
    sets.append(ExampleSet(pol, [(os.path.relpath(p, pol), d) for p in files if p.endswith(".yaml")
                                 for d in yaml.safe_load_all(Path(p).read_text())],
                           [os.path.relpath(p, pol) for p in files if os.path.isfile(p) and not p.endswith(".yaml")]))
    return sets


EXAMPLES = _example_sets()


def _paths(node: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside ``node`` (the root excluded)."""
    out: list[tuple[Any, ...]] = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        out.append((*at, k))
        out += _paths(v, (*at, k))
    return out


def _get(node: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        node = node[part]
    return node


def _set(node: Any, path: tuple[Any, ...], value: Any) -> None:
    _get(node, path[:-1])[path[-1]] = value


KEYS = sorted({str(p[-1]) for s in EXAMPLES for _, d in s.docs for p in _paths(d) if isinstance(p[-1], str)})
NAMES = sorted({v for s in EXAMPLES for _, d in s.docs if isinstance(d, dict)
                for v in [(d.get("metadata") or {}).get("name")] if isinstance(v, str)})
ODD_STRINGS = ["/api;x", "[", "(?P", "(?P<x", "a{1,99999}", "/a/../b", "//", "/%00", "/\u00e9\u4e2d",
               "*", "**", "", " ", "-", "0", "null", "~", "10.0.0.0/33", "::1/200", "127.0.0.1:99999",
               "http://", "https://[::1", "Bearer ", "ümlaut", "\u202e", "\ufeff", "💥", "x" * 300,
               "/" + "a/" * 2000, "a" * 10_000, "missing-name", "edge", "echo", "builtin", "deny", "allow"]
CONTROL = ["\x00", "\x01", "\x07", "\x1b[31m", "\t", "\r", "\n", "\x7f", "\x85", "\u2028"]

FILE_REFS = sorted({os.path.basename(a) for s in EXAMPLES for a in s.assets} | {a for s in EXAMPLES for a in s.assets}
                   | {"/etc/hostname", "/etc", ".", "", "nope.json", "../../../../etc/passwd", "sub0"})
SPECIAL_FILES = ["/dev/zero", "/dev/urandom"]  # and FIFOs, made by run_policy_case
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))


def _secrets() -> set[str]:
    """Values no error message may show: API keys, password hashes, client secrets."""
    out: set[str] = set()
    for ex in EXAMPLES:
        for rel in ex.assets:
            text = Path(ex.root, rel).read_text()
            if rel.endswith((".keys", ".htpasswd")):
                out |= {line.split(":", 1)[1].strip() for line in text.splitlines()
                        if ":" in line and not line.startswith("#")}
            elif "secret" in rel:
                out.add(text.strip())
    return {s for s in out if len(s) >= 6}


SECRETS = _secrets()


def _odd_value(rng: random.Random) -> Any:
    kind = rng.randrange(11)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 65535, 65536, -(2**31), 2**31, 2**63, 10**30, 7.5, float("inf")])
    if kind == 3:  # written out by _dump (str() of such an int is refused)
        return f"__DIGITS_{rng.randrange(100, 6000)}__"
    if kind == 4:
        return [] if rng.random() < 0.5 else [rng.choice(ODD_STRINGS), 1, None]
    if kind == 5:
        return {} if rng.random() < 0.5 else {rng.choice(KEYS): rng.choice(ODD_STRINGS)}
    if kind == 6:
        s = rng.choice(ODD_STRINGS)
        at = rng.randrange(len(s) + 1)
        return s[:at] + rng.choice(CONTROL) + s[at:]
    if kind == 7:
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(1, 12)))
    return rng.choice(ODD_STRINGS)


def _mutate(rng: random.Random, docs: list[list[Any]]) -> None:
    """One structural mutation of one document (``docs`` is a list of [file, document])."""
    entry = rng.choice(docs)
    doc = entry[1]
    paths = _paths(doc)
    op = rng.randrange(10)
    if op == 0 or not paths:  # replace the whole document
        entry[1] = _odd_value(rng)
        return
    path = rng.choice(paths)
    refs = [p for p in paths if p[-1] == "file"]
    if op == 5 and refs and rng.random() < 0.6:
        path = rng.choice(refs)
    parent = _get(doc, path[:-1])
    if op == 1:  # drop a key or item
        del parent[path[-1]]
    elif op == 2 and isinstance(parent, dict):  # rename a key (to another known one, or a typo)
        new = rng.choice(KEYS) if rng.random() < 0.6 else str(path[-1])[::-1] + rng.choice(["", "s", "\u00e9"])
        parent[new] = parent.pop(path[-1])
    elif op == 3:  # swap the values of two fields, possibly in different documents
        other = rng.choice(docs)
        other_paths = _paths(other[1])
        if other_paths:
            p2 = rng.choice(other_paths)
            nested = p2[:len(path)] == path or path[:len(p2)] == p2
            if other is not entry or not nested:
                a, b = _get(doc, path), _get(other[1], p2)
                _set(doc, path, b)
                _set(other[1], p2, a)
    elif op == 4 and isinstance(parent, list):  # duplicate a list item
        parent.insert(path[-1], copy.deepcopy(parent[path[-1]]))
    elif op == 5 and path[-1] == "file":  # another (kind of) file: keys as JWKS, a directory, ...
        _set(doc, path, rng.choice(SPECIAL_FILES if rng.random() < 0.2 else FILE_REFS))
    elif op == 5 and isinstance(_get(doc, path), str):  # refer to a missing or another name
        _set(doc, path, rng.choice([*NAMES, "missing-" + rng.choice(NAMES or ["x"])]))
    elif op == 6:  # a string to a list, a list to a mapping, and so on
        old = _get(doc, path)
        _set(doc, path, [old] if not isinstance(old, list) else {"x": old} if rng.random() < 0.5 else str(old))
    else:  # an odd value: huge, negative, unicode, control characters, path/regex-like
        _set(doc, path, _odd_value(rng))


def _rename_consistently(rng: random.Random, docs: list[list[Any]]) -> None:
    """A benign edit: give one object a new name everywhere it is referred to (stays valid)."""
    old = rng.choice(NAMES)
    new = f"{old}-{rng.randrange(100)}"
    for entry in docs:
        for path in _paths(entry[1]):
            if _get(entry[1], path) == old and path[-1] in ("name", "gateway", "backend", "service"):
                _set(entry[1], path, new)


def _dump(rng: random.Random, data: Any) -> str:
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=rng.random() < 0.5,
                          default_flow_style=rng.choice([False, None]), width=rng.choice([80, 10_000]))
    return re.sub(r"__DIGITS_(\d+)__", lambda m: "9" * int(m.group(1)), text)


@dataclass
class PolicyCase:
    root: str  # the example set's root (referenced files are copied from there)
    files: dict[str, str]  # relative path → text
    assets: dict[str, str]  # referenced files to copy: relative destination → relative source
    on_disk: bool  # load with load_dir from a real directory (else load_texts)
    fifos: list[str] = field(default_factory=list)  # referenced files to replace by FIFOs


def policy_case(seed: int) -> PolicyCase:
    """A mutated example directory (about a quarter of the cases stay valid). A fraction is
    written to a real directory and read with load_dir: subdirectories, FIFOs, empty files."""
    rng = random.Random(seed)
    ex = rng.choice(EXAMPLES)
    docs = [[f, copy.deepcopy(d)] for f, d in ex.docs]
    if rng.random() < 0.3:
        _rename_consistently(rng, docs)
    for _ in range(rng.choice([0, 0, 0, 1, 1, 2, 3, 6])):
        _mutate(rng, docs)
    if rng.random() < 0.2:
        rng.shuffle(docs)
    on_disk = rng.random() < 0.15
    spread = rng.random() < 0.5
    files: dict[str, list[str]] = {}
    assets = {a: a for a in ex.assets}
    for origin, doc in docs:
        where = os.path.dirname(origin)
        if spread and on_disk and rng.random() < 0.4:  # a subdirectory, with the referenced files
            sub = os.path.join(where, f"sub{rng.randrange(3)}")
            assets.update({os.path.join(sub, os.path.relpath(a, where or ".")): a for a in ex.assets
                           if not where or os.path.commonpath([os.path.dirname(a), where]) == where})
            where = sub
        name = os.path.join(where, f"part{rng.randrange(4)}.yaml") if spread else origin
        body = _dump(rng, doc)
        if rng.random() < 0.015:  # a duplicate key: one "key: value" line written twice
            lines = body.splitlines(keepends=True)
            simple = [i for i, line in enumerate(lines) if re.match(r"\s*[A-Za-z]+: [^{\[]", line)]
            if simple:
                at = rng.choice(simple)
                body = "".join(lines[:at + 1] + lines[at:])
        files.setdefault(name, []).append(body if rng.random() < 0.9 else "# note\n" + body)
    out = {name: "---\n".join(bodies) for name, bodies in files.items()}
    for _ in range(rng.choice([0, 0, 1, 2])):  # empty files and documents
        name = rng.choice([*out, "empty.yaml", "z/empty.yml"])
        out[name] = out.get(name, "") + rng.choice(["", "---\n", "\n", "# only a comment\n", "---\n---\n"])
    if rng.random() < 0.03:
        out[f"bomb{rng.randrange(2)}.yaml"] = ALIAS_BOMB
    fifos = [a for a in assets if rng.random() < 0.2] if on_disk and rng.random() < 0.2 else []
    return PolicyCase(ex.root, out, assets, on_disk, fifos)


def _one_line(text: str) -> bool:
    return bool(text) and not any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in text)


def _check_problems(e: PolicyError, files: dict[str, str]) -> None:
    assert e.problems, "PolicyError without problems"
    for p in e.problems:
        assert p.path and p.line >= 1 and p.col >= 1, f"bad position: {p!r}"
        assert _one_line(p.message) and _one_line(str(p)), f"not one printable line: {p!r}"
        assert not [s for s in SECRETS if s in str(p)], f"a secret in an error: {p!r}"
        if p.path in files:  # YAML's line breaks: NEL and U+2028 count as well; "end of file"
            # in a text without a final line break is reported on the line after it
            text = files[p.path]
            lines = len(re.split("\r\n|[\n\r\x85\u2028\u2029]", text)) + (not text.endswith("\n"))
            assert p.line <= lines, f"line past the end of {p.path}: {p!r}"


def run_policy_case(case: PolicyCase) -> bool:
    """Load and compile ``case``; True if valid. Raises AssertionError for a malformed error and
    lets any unexpected exception through."""
    tmp = tempfile.mkdtemp(prefix="fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None) \
        if case.on_disk else None
    try:
        base = tmp or case.root
        if tmp:
            for rel, src in case.assets.items():
                os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
                if rel in case.fifos:
                    os.mkfifo(os.path.join(tmp, rel))
                else:
                    shutil.copyfile(os.path.join(case.root, src), os.path.join(tmp, rel))
            for rel, text in case.files.items():
                os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
                Path(tmp, rel).write_text(text)
        texts = {os.path.join(base, rel): text for rel, text in case.files.items()}
        try:
            policies = load_dir(base) if tmp else load_texts(texts, root=base)
            compile_policies(policies)
        except PolicyError as e:
            _check_problems(e, texts)
            return False
        except CompileError as e:
            assert _one_line(str(e)), f"CompileError not one printable line: {e!r}"
            assert not [s for s in SECRETS if s in str(e)], f"a secret in an error: {e!r}"
            return False
        return True
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


POLICY_CASES = 2000
_outcomes: list[bool] = []


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Hang detection: SIGALRM raises Hang in the main thread once ``seconds`` have passed."""
    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"no result within {seconds}s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@settings(max_examples=POLICY_CASES, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.integers(0, 2**32 - 1))
def _fuzz_policy_directories(seed: int) -> None:
    with time_limit(60):  # generous: a case takes milliseconds
        _outcomes.append(run_policy_case(policy_case(seed)))


def test_mutated_policy_directories():
    """2,000 mutated example directories: success or well-formed problems, never a traceback;
    enough of them valid that the fuzzer reaches the compiler."""
    _outcomes.clear()
    _fuzz_policy_directories()
    assert len(_outcomes) >= POLICY_CASES // 2
    valid = sum(_outcomes) / len(_outcomes)
    assert 0.15 <= valid <= 0.8, f"valid ratio {valid:.2f} of {len(_outcomes)}"
