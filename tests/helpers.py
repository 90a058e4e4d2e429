"""Shared test helpers: write policy trees, compile them, run them in a real Envoy, send requests."""

from __future__ import annotations

import http.client
import json
import os
import textwrap
from dataclasses import dataclass
from typing import Any

from authplane.compiler.ir import CompileOptions
from authplane.compiler.render import dump, static_bootstrap, to_dict
from authplane.compiler.snapshot import compile_policies
from authplane.envoy_bin import EnvoyProcess
from authplane.policy.loader import load_dir

HEAD = "apiVersion: authplane.dev/v1alpha1\n"


def write_policies(directory: str, files: dict[str, str]) -> str:
    """Write ``{relative path: yaml}``; documents get the apiVersion line prepended."""
    for rel, text in files.items():
        path = os.path.join(directory, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        text = textwrap.dedent(text).strip("\n") + "\n"
        if rel.endswith((".yaml", ".yml")):
            text = "\n---\n".join(HEAD + doc.strip("\n") + "\n" for doc in text.split("\n---\n"))
        with open(path, "w") as f:
            f.write(text)
    return directory


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


def request(port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None,
            body: str | None = None, host: str = "localhost",
            conn: http.client.HTTPConnection | None = None) -> Response:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"host": host, **(headers or {})})
        r = conn.getresponse()
        data = r.read().decode(errors="replace")
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
    finally:
        if own:
            conn.close()


def start_static_envoy(policy_dir: str, fleet: str, tmp: str,
                       opts: CompileOptions | None = None) -> EnvoyProcess:
    """Compile, turn the fleet's snapshot into a static bootstrap on OS-chosen ports, start Envoy.
    ``opts`` points the builtin decision service clusters at a test server's ports."""
    snap = compile_policies(load_dir(policy_dir), opts)[fleet]
    boot = static_bootstrap(snap)
    boot.admin.address.socket_address.address = "127.0.0.1"
    boot.admin.address.socket_address.port_value = 0
    for lst in boot.static_resources.listeners:
        lst.address.socket_address.port_value = 0
        lst.address.socket_address.address = "127.0.0.1"
    path = os.path.join(tmp, f"{fleet}-bootstrap.yaml")
    with open(path, "w") as f:
        f.write(dump(to_dict(boot)))
    envoy = EnvoyProcess(path)
    envoy.start()
    try:
        envoy.wait_ready()
    except Exception:
        envoy.stop()
        raise
    return envoy
