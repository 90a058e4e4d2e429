"""Incremental reload == full rebuild: after every one of a fixed-seed sequence of random edits
to a generated repository (a few fleets, dozens of routes), the store's incremental build gives
the same versions and resource bytes per fleet (or the same problems) as load_dir + compile."""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

import pytest

from authplane.compiler.ir import CompileOptions
from authplane.compiler.snapshot import Snapshot, compile_policies
from authplane.controlplane.store import Revision, build
from authplane.errors import PolicyError
from authplane.policy.loader import Loader, load_dir
from tests.support.policies import HEAD

FLEETS = ("a", "b", "c")
BACKENDS = ("be0", "be1", "be2", "be3")
TEAMS = 4
FILES_PER_TEAM = 3
ROUTES_PER_FILE = 4
STEPS = 240


def jwks(kid: str) -> str:
    return json.dumps({"keys": [{"kty": "RSA", "n": "sXch", "e": "AQAB", "kid": kid}]})


class Repo:
    """The repository as a model (documents per file) written to disk, only what changed."""

    def __init__(self, root: str, rng: random.Random) -> None:
        self.root, self.rng = root, rng
        self.docs: dict[str, str] = {}
        """Document key (``Kind/name``) → its YAML."""
        self.files: dict[str, list[str]] = {}
        """Relative path → document keys, in order."""
        self.override: dict[str, str] = {}
        """Relative path → text written instead (an invalid or empty file), until fixed."""
        self.written: dict[str, str] = {}
        self.serial = 0
        shared = []
        for i, fleet in enumerate(FLEETS):
            shared.append(self._doc("Gateway", f"gw-{fleet}", f"spec: {{fleet: {fleet}, listeners: "
                                    f"[{{name: http, port: {18000 + i}, address: 127.0.0.1}}]}}\n"))
        for i, name in enumerate(BACKENDS):
            shared.append(self._doc("Backend", name, f"spec: {{endpoints: ['127.0.0.1:{9000 + i}']}}\n"))
        shared.append(self._doc("AuthPolicy", "gw-a-jwt", "spec:\n  targetRef: {kind: Gateway, name: gw-a}\n"
                                "  jwt: {providers: [{name: corp, jwks: {file: keys/jwks.json}}]}\n"))
        self.files["shared.yaml"] = shared
        for t in range(TEAMS):
            for f in range(FILES_PER_TEAM):
                self.files[f"team{t}/routes{f}.yaml"] = [k for _ in range(ROUTES_PER_FILE) for k in self.new_route()]
        self.extra = {"keys/jwks.json": jwks("k0")}

    def _doc(self, kind: str, name: str, body: str) -> str:
        key = f"{kind}/{name}"
        self.docs[key] = f"kind: {kind}\nmetadata: {{name: {name}}}\n{body}"
        return key

    def new_route(self) -> list[str]:
        self.serial += 1
        name = f"r{self.serial}"
        return [self.route(name), self.policy(name)]

    def route(self, name: str) -> str:
        rules = "".join(f"    - {{name: m{i}, match: {{pathPrefix: /{name}/{self.rng.randrange(5)}/{i}}}, "
                        f"backend: {self.rng.choice(BACKENDS)}}}\n" for i in range(self.rng.randint(1, 3)))
        return self._doc("Route", name, f"spec:\n  gateway: gw-{self.rng.choice(FLEETS)}\n  rules:\n{rules}")

    def policy(self, route: str) -> str:
        if self.rng.random() < 0.15:
            return self._doc("AuthPolicy", f"p-{route}", f"spec:\n  targetRef: {{kind: Route, name: {route}}}\n"
                             "  public: true\n")
        jwks_file = self.rng.choice(["../keys/jwks.json", "../keys/team.json"])
        return self._doc("AuthPolicy", f"p-{route}", f"spec:\n  targetRef: {{kind: Route, name: {route}}}\n"
                         f"  jwt: {{providers: [{{name: corp, jwks: {{file: {jwks_file}}}}}]}}\n"
                         "  authorization:\n    rules:\n"
                         f"      - {{name: team, action: allow, when: {{claims: {{groups: "
                         f"[g{self.rng.randrange(4)}]}}}}}}\n")

    def text(self, rel: str) -> str:
        if rel in self.override:
            return self.override[rel]
        return "---\n".join(HEAD + self.docs[k] for k in self.files[rel])

    def sync(self) -> None:
        """Write what differs from disk, delete what is gone; mtimes in the past (no settling)."""
        wanted = {rel: self.text(rel) for rel in self.files} | self.extra
        if "keys/team.json" not in wanted:
            wanted["keys/team.json"] = jwks("team")
        for rel in set(self.written) - set(wanted):
            os.remove(os.path.join(self.root, rel))
            del self.written[rel]
        for rel, text in wanted.items():
            if self.written.get(rel) == text:
                continue
            path = os.path.join(self.root, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".new", "w") as f:
                f.write(text)
            os.replace(path + ".new", path)
            past = time.time() - 60
            os.utime(path, (past, past))
            self.written[rel] = text

    def rename(self, old: str, new: str) -> None:
        """A file renamed on disk as it is (a ``git mv``)."""
        os.makedirs(os.path.dirname(os.path.join(self.root, new)), exist_ok=True)
        os.rename(os.path.join(self.root, old), os.path.join(self.root, new))
        self.files[new] = self.files.pop(old)
        self.written[new] = self.written.pop(old)
        if old in self.override:
            self.override[new] = self.override.pop(old)

    def routes(self) -> list[tuple[str, str]]:
        return [(rel, k) for rel, keys in self.files.items() if rel != "shared.yaml" for k in keys
                if k.startswith("Route/")]

    def edit(self) -> str:
        """One random edit; returns what it was (for a failure message)."""
        rng = self.rng
        kind = rng.choices(["add", "change", "delete", "delete-file", "rename", "move", "invalid", "fix",
                            "empty", "jwks", "backend"], [12, 20, 8, 2, 6, 8, 16, 8, 3, 3, 3])[0]
        team_files = sorted(rel for rel in self.files if rel != "shared.yaml")
        if self.override and (kind == "fix" or rng.random() < 0.5):  # a broken file is soon fixed
            rel = rng.choice(sorted(self.override))
            del self.override[rel]
            return f"fix {rel}"
        if kind == "add" or not self.routes() or not team_files:
            rel = rng.choice([*team_files, f"team{rng.randrange(TEAMS)}/new{self.serial}.yaml"])
            self.files.setdefault(rel, []).extend(self.new_route())
            return f"add to {rel}"
        rel, key = rng.choice(self.routes())
        name = key.split("/", 1)[1]
        if kind == "change":
            if rng.random() < 0.5:
                self.route(name)
            else:
                self.policy(name)
            return f"change {key} in {rel}"
        if kind == "delete":
            self.files[rel] = [k for k in self.files[rel] if k not in (key, f"AuthPolicy/p-{name}")]
            return f"delete {key} from {rel}"
        if kind == "delete-file":
            del self.files[rel]
            self.override.pop(rel, None)
            return f"delete file {rel}"
        if kind == "rename":
            new = f"team{rng.randrange(TEAMS)}/renamed{self.serial}-{rng.randrange(1000)}.yaml"
            if new not in self.files:
                self.rename(rel, new)
            return f"rename {rel} to {new}"
        if kind == "move":
            to = rng.choice(team_files)
            for k in (key, f"AuthPolicy/p-{name}"):
                if k in self.files[rel]:
                    self.files[rel].remove(k)
                    self.files[to].append(k)
            return f"move {key} from {rel} to {to}"
        if kind == "invalid" and not self.override:
            good = self.text(rel)
            broken = rng.choice([
                good + "  : : [\n",  # YAML syntax
                good.replace("pathPrefix:", "pathPrefx:", 1),  # unknown field
                good.replace("backend: be", "backend: nobe", 1),  # dangling reference
                good + "---\n" + HEAD + self.docs["Backend/be0"],  # duplicate name
            ])
            self.override[rel] = broken
            return f"make {rel} invalid"
        if kind == "empty":
            self.override[rel] = ""
            return f"empty {rel}"
        if kind == "jwks":
            self.extra["keys/jwks.json"] = jwks(f"k{rng.randrange(3)}")
            return "change keys/jwks.json"
        name = rng.choice(BACKENDS)
        self._doc("Backend", name, f"spec: {{endpoints: ['127.0.0.1:{9100 + rng.randrange(3)}']}}\n")
        return f"change Backend {name}"


def serialized(snapshots: dict[str, Snapshot]) -> dict[str, Any]:
    return {fleet: (snap.version, snap.resource_versions, snap.origins,
                    {t: {n: m.SerializeToString(deterministic=True) for n, m in msgs.items()}
                     for t, msgs in snap.resources.items()})
            for fleet, snap in snapshots.items()}


def test_incremental_reload_equals_full_rebuild(tmp_path: Any) -> None:
    root = str(tmp_path / "policies")
    repo = Repo(root, random.Random(1717))
    repo.sync()
    opts = CompileOptions()
    loader = Loader()
    current = build(root, opts, None, loader=loader)
    invalid = reused_files = reused_fleets = 0
    for step in range(STEPS):
        what = repo.edit()
        repo.sync()
        texts = current.policies.texts if current.policies else None
        try:
            full: dict[str, Any] | list[str] = serialized(compile_policies(load_dir(root, previous=texts), opts))
        except PolicyError as e:
            full = [str(p) for p in e.problems]
        try:
            rev: Revision = build(root, opts, current, loader=loader)
        except PolicyError as e:
            assert full == [str(p) for p in e.problems], f"step {step}: {what}"
            invalid += 1
            continue
        assert isinstance(full, dict), f"step {step}: {what}: the full rebuild failed: {full}"
        assert serialized(rev.snapshots) == full, f"step {step}: {what}"
        assert rev.policies is not None and current.policies is not None
        reused_files += loader.reparsed < len(rev.policies.texts)
        assert rev.compiled is not None
        reused_fleets += len(rev.compiled.compiled) < len(rev.snapshots)
        for fleet, snap in rev.snapshots.items():  # an unchanged fleet is the previous snapshot itself
            if fleet not in rev.compiled.compiled:
                assert current.snapshots[fleet] is snap
        current = rev
    # the sequence exercised both outcomes, and the incremental path did skip work
    assert invalid >= 20 and STEPS - invalid >= 100, invalid
    assert reused_files >= 100 and reused_fleets >= 20, (reused_files, reused_fleets)


@pytest.mark.parametrize("hostile", ["empty", "binary"])
def test_incremental_keeps_load_dir_behaviour(tmp_path: Any, hostile: str) -> None:
    """An empty file keeps its previous documents; a non-UTF-8 file is refused, on the
    incremental path as with load_dir."""
    root = str(tmp_path / "policies")
    repo = Repo(root, random.Random(7))
    repo.sync()
    loader = Loader()
    first = build(root, CompileOptions(), None, loader=loader)
    path = os.path.join(root, "team0/routes0.yaml")
    with open(path, "wb") as f:
        f.write(b"" if hostile == "empty" else b"\xff\xfe kind: Route\n")
    past = time.time() - 60
    os.utime(path, (past, past))
    if hostile == "empty":
        again = build(root, CompileOptions(), first, loader=loader)
        assert again.versions() == first.versions()
        assert again.policies is not None
        assert any("the file is empty" in w.message for w in again.policies.warnings)
    else:
        with pytest.raises(PolicyError) as e:
            build(root, CompileOptions(), first, loader=loader)
        assert [p.message.split(" (")[0] for p in e.value.problems] == ["not a UTF-8 text file"]


def _routes_file(path: str, first: int, group: str, edited: int | None = None) -> None:
    docs = []
    for i in range(first, first + 5):
        docs.append(f"{HEAD}kind: Route\nmetadata: {{name: r{i}}}\nspec:\n  gateway: gw\n"
                    f"  rules: [{{name: main, match: {{pathPrefix: /svc{i}/}}, backend: be}}]\n")
        allowed = "nobody" if i == edited else group
        docs.append(f"{HEAD}kind: AuthPolicy\nmetadata: {{name: p{i}}}\nspec:\n"
                    f"  targetRef: {{kind: Route, name: r{i}}}\n"
                    "  jwt: {providers: [{name: corp, jwks: {file: jwks.json}}]}\n"
                    "  authorization: {rules: [{name: team, action: allow, "
                    f"when: {{claims: {{groups: [{allowed}]}}}}}}]}}\n")
    with open(path, "w") as f:
        f.write("---\n".join(docs))


def test_an_edit_recompiles_only_the_routes_it_changes(tmp_path: Any) -> None:
    """The route entries of routes whose IR and listener context are unchanged come from the last
    compile (resources.RouteMemo), with the bytes of a full rebuild; the memo keeps only the
    entries of the current revision; a gateway-level change rebuilds every entry."""
    root = tmp_path / "policies"
    root.mkdir()
    (root / "jwks.json").write_text(jwks("k0"))
    gateway = (f"{HEAD}kind: Gateway\nmetadata: {{name: gw}}\nspec: {{fleet: f, listeners: "
               "[{name: http, port: 18000, address: 127.0.0.1}]}\n---\n"
               f"{HEAD}kind: Backend\nmetadata: {{name: be}}\nspec: {{endpoints: ['127.0.0.1:9000']}}\n")
    (root / "gateway.yaml").write_text(gateway)
    for team in range(4):
        _routes_file(str(root / f"team{team}.yaml"), team * 5, f"team{team}")
    opts, loader = CompileOptions(), Loader()
    current = build(str(root), opts, None, loader=loader)

    def rebuild(previous: Revision) -> tuple[Revision, Any]:
        past = time.time() - 60  # settled
        for name in os.listdir(root):
            os.utime(root / name, (past, past))
        rev = build(str(root), opts, previous, loader=loader)
        assert rev.policies is not None
        assert serialized(rev.snapshots) == serialized(compile_policies(load_dir(str(root)), opts))
        assert rev.compiled is not None
        return rev, rev.compiled.memos["f"]

    _routes_file(str(root / "team2.yaml"), 10, "team2", edited=12)
    current, memo = rebuild(current)
    assert (memo.built, memo.reused) == (1, 19)
    assert [len(entries) for _, entries in memo.listeners.values()] == [20]
    _routes_file(str(root / "team3.yaml"), 15, "team3")  # the file is written again, the same documents
    os.remove(root / "team0.yaml")
    current, memo = rebuild(current)
    assert (memo.built, memo.reused) == (0, 15)
    assert [len(entries) for _, entries in memo.listeners.values()] == [15]  # team0's routes dropped
    (root / "gateway.yaml").write_text(gateway + "---\n" + HEAD + "kind: AuthPolicy\nmetadata: {name: gw-jwt}\n"
                                       "spec:\n  targetRef: {kind: Gateway, name: gw}\n"
                                       "  jwt: {providers: [{name: corp, jwks: {file: jwks.json}}]}\n")
    current, memo = rebuild(current)
    assert (memo.built, memo.reused) == (15, 0)
