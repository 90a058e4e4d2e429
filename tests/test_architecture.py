"""The package graph of ``authplane/`` is a DAG, in the direction the folders name:

    contract, addresses, errors (leaves) ← policy ← compiler ← controlplane, authz ← cli, demo

Every import counts, function-level ones included; only ``if TYPE_CHECKING:`` blocks are left out
(they never run).
"""

from __future__ import annotations

import ast
import os
from collections import defaultdict

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "authplane")

LEAVES = {"contract", "addresses", "errors"}
ALLOWED: dict[str, set[str]] = {
    "policy": LEAVES,
    "compiler": LEAVES | {"policy"},
    "controlplane": LEAVES | {"policy", "compiler"},
    "authz": LEAVES | {"policy", "compiler"},
}
"""What each pipeline package may import (besides itself)."""


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    return skip


def _module_name(root: str, path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(root))[: -len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def imports(root: str) -> dict[str, set[str]]:
    """Module → the modules of the same top package it imports (``pkg.a.b`` names)."""
    top = os.path.basename(root)
    out: dict[str, set[str]] = defaultdict(set)
    for dirpath, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            mod = _module_name(root, path)
            is_pkg = name == "__init__.py"
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            skip = _type_checking_nodes(tree)
            for node in ast.walk(tree):
                if id(node) in skip:
                    continue
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                        base = base[: len(base) - node.level + 1]
                        target = ".".join(base + ([node.module] if node.module else []))
                    else:
                        target = node.module or ""
                    targets = [target] + [f"{target}.{a.name}" for a in node.names]
                else:
                    continue
                out[mod].update(t for t in targets if t == top or t.startswith(top + "."))
    return out


def package_of(module: str) -> str:
    """``authplane.policy.loader`` → ``policy``; ``authplane.cli`` → ``cli``; the root → ``authplane``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def package_graph(root: str) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for mod, targets in imports(root).items():
        for target in targets:
            a, b = package_of(mod), package_of(target)
            if a != b and b != os.path.basename(root):  # the root package only re-exports leaves
                graph[a].add(b)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of two or more packages (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(set(graph) | {w for ws in graph.values() for w in ws}):
        if v not in index:
            visit(v)
    return found


def test_no_import_loop_between_packages():
    graph = package_graph(ROOT)
    assert cycles(graph) == [], {k: sorted(v) for k, v in graph.items()}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package):
    graph = package_graph(ROOT)
    assert graph.get(package, set()) <= ALLOWED[package], (
        f"{package} imports {sorted(graph[package] - ALLOWED[package])}")


def test_leaf_modules_import_nothing_of_authplane():
    found = imports(ROOT)
    for leaf in LEAVES:
        assert found.get(f"authplane.{leaf}", set()) == set(), leaf


def test_checker_finds_loops_including_function_level_imports(tmp_path):
    root = tmp_path / "pkg"
    for sub in ("a", "b", "c"):
        (root / sub).mkdir(parents=True)
        (root / sub / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "a" / "x.py").write_text("from pkg.b import y\n")
    (root / "b" / "y.py").write_text("def f():\n    from ..a import x\n")  # function level, relative
    (root / "c" / "z.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n")
    (root / "a" / "w.py").write_text("import pkg.c.z\n")
    graph = package_graph(str(root))
    assert cycles(graph) == [["a", "b"]]  # the TYPE_CHECKING import of c → a is no loop
    assert graph["c"] == set()
