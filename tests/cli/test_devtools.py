"""The development identity provider serves a JWKS and mints tokens Envoy accepts."""

from __future__ import annotations

import json
import os
import urllib.request

from authplane.devtools.idp_server import IdpServer, dev_provider
from tests.support import ROOT


def test_idp_serves_the_committed_dev_jwks_and_mints_tokens():
    server = IdpServer(dev_provider()).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        jwks = json.loads(urllib.request.urlopen(f"{base}/.well-known/jwks.json").read())
        with open(os.path.join(ROOT, "policies", "jwt", "dev-jwks.json")) as f:
            assert jwks == json.load(f)
        token = urllib.request.urlopen(f"{base}/token?sub=bob&groups=admins,dev").read().decode().strip()
        import base64

        payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
        assert payload["sub"] == "bob" and payload["groups"] == ["admins", "dev"]
        assert payload["iss"] == "http://127.0.0.1:9400" and payload["aud"] == "api"
    finally:
        server.stop()


def test_every_data_file_of_the_package_is_installed():
    """A non-editable install (the Docker image) must carry the package's non-Python files."""
    import fnmatch
    import tomllib

    root = ROOT
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
    for dirpath, dirnames, files in os.walk(os.path.join(root, "authplane")):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        package = os.path.relpath(dirpath, root).replace(os.sep, ".")
        parts = package.split(".")
        for name in files:
            if not name.endswith((".py", ".pyc")):
                # a pattern of this package or of an enclosing one, with the path below it
                # (authplane's "_native/*.so": that directory is not a package of its own)
                candidates = [("/".join([*parts[i:], name]), package_data.get(".".join(parts[:i]), []))
                              for i in range(1, len(parts) + 1)]
                assert any(fnmatch.fnmatch(rel, p) for rel, patterns in candidates for p in patterns), \
                    f"{package}/{name} is not package data"


def test_a_client_resetting_its_connection_prints_no_traceback(capfd):
    """The demo's servers see Envoy reset upstream connections while it stops (a traceback there
    once broke the demo's clean stop)."""
    import socket
    import struct
    import time

    from authplane.devtools.echo import EchoServer

    server = EchoServer().start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\ncontent-length: 100\r\n\r\npartial")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
        time.sleep(0.3)
    finally:
        server.stop()
    assert "Traceback" not in capfd.readouterr().err
