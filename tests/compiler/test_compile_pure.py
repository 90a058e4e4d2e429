"""Compile does no I/O: with files and sockets blocked it gives what it gives normally."""

from __future__ import annotations

import builtins
import glob
import io
import os
import pathlib
import socket
from typing import Any, NoReturn

import pytest

from authplane.compiler.render import dump, snapshot_dict
from authplane.compiler.snapshot import compile_policies
from authplane.policy.loader import load_dir
from tests.support import TESTDATA

CASES = sorted(glob.glob(os.path.join(TESTDATA, "*.in.yaml")))


def _blocked(*args: Any, **kwargs: Any) -> NoReturn:
    raise AssertionError(f"compile did I/O: {args!r}")


def _render(snapshots: dict[str, Any]) -> str:
    return dump({"fleets": {n: snapshot_dict(s) for n, s in snapshots.items()}})


def test_cases_cover_every_check_type():
    texts = "".join(pathlib.Path(c).read_text() for c in CASES)
    for section in ("jwt:", "oidc:", "authorization:", "basicAuth:", "apiKey:", "extAuth:"):
        assert section in texts


@pytest.mark.parametrize("case", CASES, ids=lambda p: os.path.basename(p)[: -len(".in.yaml")])
def test_compile_with_file_and_socket_access_blocked(case: str, monkeypatch: pytest.MonkeyPatch):
    policies = load_dir(case)
    expected = compile_policies(policies)
    with monkeypatch.context() as m:
        for target, attr in ((builtins, "open"), (io, "open"), (io, "open_code"), (os, "open"),
                             (os, "listdir"), (os, "scandir"), (os, "stat"), (socket, "socket"),
                             (socket, "create_connection"), (socket, "getaddrinfo")):
            m.setattr(target, attr, _blocked)
        for attr in ("open", "read_text", "read_bytes", "stat", "exists", "iterdir"):
            m.setattr(pathlib.Path, attr, _blocked)
        got = compile_policies(policies)
    assert {n: s.version for n, s in got.items()} == {n: s.version for n, s in expected.items()}
    assert _render(got) == _render(expected)
