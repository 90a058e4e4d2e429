"""Builds authplane's Envoy dynamic modules with the toolchain on the machine (standard library
only: used by setup.py at install time, by the tests, and by hand: ``python native/build.py DIR``).

- ``libauthplane_rules.so``: ``extAuth.engine: native`` (Rust, std only: ``rustc``, no cargo, no crates);
- ``libexample_filter.so``: the example for ``filters`` (C: ``cc``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RULES_SOURCE = HERE / "authplane_rules" / "lib.rs"
EXAMPLE_SOURCE = HERE / "example_filter" / "example_filter.c"
MIN_RUSTC = (1, 70)
"""The oldest rustc the module compiles with (std::sync::OnceLock)."""


class Unavailable(Exception):
    """No compiler for a module (authplane works without it: the native path is unavailable)."""


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr.strip()}")


def build_rules(out_dir: str | os.PathLike[str], cfg: tuple[str, ...] = ()) -> Path:
    """``libauthplane_rules.so`` in ``out_dir`` (rustc); ``cfg``: extra ``--cfg`` names (tests)."""
    rustc = shutil.which("rustc")
    if rustc is None:
        raise Unavailable("rustc not found: extAuth.engine: native is unavailable")
    version = subprocess.run([rustc, "--version"], capture_output=True, text=True).stdout.split()
    numbers = tuple(int(x) for x in version[1].split("-")[0].split(".")[:2]) if len(version) > 1 else (0, 0)
    if numbers < MIN_RUSTC:
        raise Unavailable(f"rustc {'.'.join(map(str, numbers))} is older than {'.'.join(map(str, MIN_RUSTC))}")
    out = Path(out_dir, "libauthplane_rules.so")
    out.parent.mkdir(parents=True, exist_ok=True)
    _run([rustc, "--edition", "2021", "--crate-type", "cdylib", "--crate-name", "authplane_rules",
          "-C", "opt-level=3", "-C", "panic=unwind", "-C", "debuginfo=0", *(f"--cfg={c}" for c in cfg),
          str(RULES_SOURCE), "-o", str(out)])
    return out


def build_example(out_dir: str | os.PathLike[str]) -> Path:
    """``libexample_filter.so`` in ``out_dir`` (cc)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise Unavailable("no C compiler (cc) found")
    out = Path(out_dir, "libexample_filter.so")
    out.parent.mkdir(parents=True, exist_ok=True)
    _run([cc, "-shared", "-fPIC", "-O2", "-Wall", "-Wno-unused-parameter", "-Wl,-z,now",
          str(EXAMPLE_SOURCE), "-o", str(out)])
    return out


if __name__ == "__main__":
    dest = sys.argv[1] if len(sys.argv) > 1 else "."
    for build in (build_rules, build_example):
        try:
            print(build(dest))
        except Unavailable as e:
            print(f"skipped: {e}", file=sys.stderr)
