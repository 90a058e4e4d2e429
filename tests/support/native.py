"""The repository's dynamic modules, built for a test with the toolchain on the machine
(``native/build.py``): ``libauthplane_rules.so`` (rustc) and ``libexample_filter.so`` (cc)."""

from __future__ import annotations

import importlib.util
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest

from authplane.compiler.render import dump, static_bootstrap, to_dict
from authplane.compiler.snapshot import compile_policies
from authplane.envoy_bin import envoy_path
from authplane.policy.loader import load_dir
from authplane.policy.modules import SEARCH_PATH_ENV

ROOT = Path(__file__).resolve().parents[2]


def build_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("authplane_native_build", ROOT / "native" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_all(dest: Path) -> Path:
    """Both modules in ``dest``; skips the test when a compiler is missing."""
    build = build_module()
    try:
        build.build_rules(dest)
        build.build_example(dest)
    except build.Unavailable as e:
        pytest.skip(str(e))
    return dest


@contextmanager
def search_path(directory: Path) -> Iterator[None]:
    """Envoy (and authplane's validation) find ``lib<name>.so`` in ``directory`` meanwhile."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(SEARCH_PATH_ENV, str(directory))
        yield


def start_refused(bootstrap_yaml: str, tmp: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Start a real Envoy (not ``--mode validate``) on a bootstrap it should refuse; returns once it
    has exited (a refused configuration ends it with code 1; a crash would be a signal)."""
    path = tmp / "refused-bootstrap.yaml"
    path.write_text(bootstrap_yaml)
    return subprocess.run([envoy_path(), "-c", str(path), "--disable-hot-restart", "-l", "error"],
                          capture_output=True, text=True, timeout=timeout)


def compiled_bootstrap(policy_dir: str, fleet: str) -> str:
    """The fleet's static bootstrap on loopback, every port chosen by the OS."""
    boot = static_bootstrap(compile_policies(load_dir(policy_dir))[fleet])
    boot.admin.address.socket_address.address = "127.0.0.1"
    boot.admin.address.socket_address.port_value = 0
    for lst in boot.static_resources.listeners:
        lst.address.socket_address.port_value = 0
        lst.address.socket_address.address = "127.0.0.1"
    return dump(to_dict(boot))
