"""The decision service over TLS (``serve --authz-tls-cert/--authz-tls-key``, ``--authz-client-ca``):
real Envoys reach it through the compiled builtin clusters' TLS, plain connections get nowhere, the
certificate rotates live and its key is never shown."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2

from authplane.controlplane.bootstrap import XdsClientTls, bootstrap_yaml
from authplane.envoy_bin import EnvoyProcess
from tests.support.certs import CA, Issued, fingerprint, write_replacing
from tests.support.http import request
from tests.support.policies import backend, documents, gateway, write_policies
from tests.support.ports import free_port, wait_for
from tests.support.processes import ServeProcess, start_envoys

POLICIES = """
    kind: Route
    metadata: {name: app}
    spec: {gateway: edge, rules: [{name: all, backend: echo}]}
    ---
    kind: AuthPolicy
    metadata: {name: decide}
    spec:
      targetRef: {kind: Route, name: app}
      extAuth:
        service: builtin
        protocol: %s
        rules:
          - {name: allow, action: allow, when: {headers: {x-pass: ["yes"]}}, upstreamHeaders: {x-decided-by: authplane}}
          - {name: rest, action: deny, deny: {status: 403, body: "no pass"}}
    """


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def key_body(issued: Issued) -> list[str]:
    """The base64 lines of a private key: none may appear in logs, status or render output."""
    return [line for line in read(issued.key).decode().splitlines() if line and not line.startswith("-----")]


def https(address: str, ca: str, path: str, headers: dict[str, str], client: Issued | None = None) -> tuple[int, str]:
    """One HTTP/1.1 request over TLS with the standard library: (status, peer certificate fingerprint)."""
    host, _, port = address.rpartition(":")
    ctx = ssl.create_default_context(cafile=ca)
    if client is not None:
        ctx.load_cert_chain(client.cert, client.key)
    lines = [f"GET {path} HTTP/1.1", "host: authz", "connection: close", *(f"{k}: {v}" for k, v in headers.items())]
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as conn:
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        peer = conn.getpeercert(binary_form=True)
    assert peer is not None
    return int(data.split(b" ", 2)[1]), fingerprint(peer)


def plain_http(address: str) -> bytes:
    """What a plaintext HTTP request to ``address`` gets back (never an HTTP answer from a TLS port)."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nhost: authz\r\nconnection: close\r\n\r\n")
        data = b""
        try:
            while chunk := conn.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    return data


def plain_grpc(address: str) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as channel:
        check = channel.unary_unary("/envoy.service.auth.v3.Authorization/Check",
                                    request_serializer=external_auth_pb2.CheckRequest.SerializeToString,
                                    response_deserializer=external_auth_pb2.CheckResponse.FromString)
        try:
            check(external_auth_pb2.CheckRequest(), timeout=5)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


@pytest.fixture
def pki(tmp_path) -> tuple[CA, Issued]:
    ca = CA(str(tmp_path / "pki"), "authz-ca")
    return ca, ca.issue("authz", ["localhost", "127.0.0.1"])


def serve_tls(tmp_path, protocol: str, echo_port: int, server: Issued, ca: CA, *extra: str) -> tuple[ServeProcess, int]:
    port, grpc_port, http_port = free_port(), free_port(), free_port()
    d = write_policies(str(tmp_path / "policies"), {"gateway.yaml": documents(
        gateway("edge", port), backend("echo", echo_port), POLICIES % protocol)})
    serve = ServeProcess(d, str(tmp_path), 0, "--authz-grpc", f"127.0.0.1:{grpc_port}", "--authz-http",
                         f"127.0.0.1:{http_port}", "--authz-grpc-listen", f"127.0.0.1:{grpc_port}",
                         "--authz-http-listen", f"127.0.0.1:{http_port}", "--authz-tls-cert", server.cert,
                         "--authz-tls-key", server.key, "--authz-tls-ca", ca.path, *extra)
    return serve, port


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_envoy_reaches_the_decision_service_over_tls(tmp_path, pki, processes, echo, protocol):
    envoys, serves = processes
    ca, server = pki
    keys = key_body(server)  # read now: the files are replaced below
    serve, port = serve_tls(tmp_path, protocol, echo.port, server, ca)
    serves.append(serve.wait_started())
    envoys += start_envoys(str(tmp_path), serve.xds, [("edge-1", "edge", True)])
    serve.wait_in_sync("edge-1")

    assert (r := request(port, "/x")).status == 403 and r.body == "no pass"
    allowed = request(port, "/x", headers={"x-pass": "yes"})
    assert allowed.status == 200 and allowed.json()["headers"]["x-decided-by"] == "authplane"

    # plaintext gets nowhere on either port
    assert not plain_http(serve.authz_http).startswith(b"HTTP/")
    assert plain_grpc(serve.authz_grpc) == grpc.StatusCode.UNAVAILABLE

    # forward auth over HTTPS, with the standard library's TLS client
    url = {"x-original-url": "https://app.example/x", "x-original-method": "GET"}
    assert https(serve.authz_http, ca.path, "/authz/decide", url)[0] == 403
    status, first = https(serve.authz_http, ca.path, "/authz/decide", {**url, "x-pass": "yes"})
    assert status == 200 and first == fingerprint(read(server.cert))

    # a broken key is reported and the previous certificate kept
    write_replacing(server.key, b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    assert https(serve.authz_http, ca.path, "/healthz", {})[1] == first
    wait_for(lambda: "decision service TLS files changed but cannot be used" in serve.log(), "the broken key reported")

    # a new certificate (same CA): the next connection gets it, Envoy's checks go on
    renewed = ca.issue("authz", ["localhost", "127.0.0.1"])
    wait_for(lambda: https(serve.authz_http, ca.path, "/healthz", {})[1] == fingerprint(read(renewed.cert)),
             "the renewed certificate served")
    assert "decision service TLS: new certificate" in serve.log()
    assert request(port, "/x", headers={"x-pass": "yes"}).status == 200

    rendered = subprocess.run([sys.executable, "-m", "authplane.cli", "render", str(tmp_path / "policies"),
                               "--fleet", "edge", "--authz-tls-ca", ca.path, "--show-secrets"],
                              capture_output=True, text=True, timeout=30)
    assert rendered.returncode == 0, rendered.stderr
    assert "UpstreamTlsContext" in rendered.stdout and "IP_ADDRESS" in rendered.stdout
    text = serve.log() + json.dumps(serve.status()) + rendered.stdout
    assert not any(line in text for line in keys + key_body(renewed))


def test_decision_service_requires_the_fleet_certificate(tmp_path, pki, processes, echo):
    """``--authz-client-ca``: Envoys present the fleet certificate of their bootstrap; a client
    without one is refused in the handshake. In-process decision service (``--authz-workers 0``)."""
    envoys, serves = processes
    ca, server = pki
    xds = ca.issue("xds", ["localhost", "127.0.0.1"])
    fleet = ca.issue("edge-1", ["spiffe://corp.example/fleet/edge"], client=True)
    serve, port = serve_tls(tmp_path, "http", echo.port, server, ca, "--authz-client-ca", ca.path,
                            "--authz-workers", "0", "--xds-tls-cert", xds.cert, "--xds-tls-key", xds.key,
                            "--xds-client-ca", ca.path)
    serves.append(serve.wait_started())
    assert "(mutual TLS)" in serve.log()
    path = str(tmp_path / "edge-1.yaml")
    with open(path, "w") as f:
        f.write(bootstrap_yaml("edge-1", "edge", serve.xds, admin_port=0,
                               tls=XdsClientTls(ca.path, "localhost", fleet.cert, fleet.key)))
    envoys.append(envoy := EnvoyProcess(path, log_path=str(tmp_path / "edge-1.log")).start())
    envoy.wait_ready()
    serve.wait_in_sync("edge-1")

    assert request(port, "/x").status == 403
    assert request(port, "/x", headers={"x-pass": "yes"}).status == 200

    url = {"x-original-url": "https://app.example/x", "x-pass": "yes"}
    assert https(serve.authz_http, ca.path, "/authz/decide", url, client=fleet)[0] == 200
    with pytest.raises((ssl.SSLError, ConnectionResetError, ValueError, IndexError)):
        https(serve.authz_http, ca.path, "/authz/decide", url)  # no client certificate: no answer
    text = serve.log() + json.dumps(serve.status())
    assert not any(line in text for issued in (server, xds, fleet) for line in key_body(issued))


def test_tls_flags_go_together(tmp_path):
    d = write_policies(str(tmp_path / "policies"), {"gateway.yaml": documents(
        gateway("edge", free_port()), backend("echo", free_port()))})
    for flags in (["--authz-tls-cert", "c.pem"], ["--authz-client-ca", "ca.pem"]):
        r = subprocess.run([sys.executable, "-m", "authplane.cli", "serve", d, *flags], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "go together" in r.stderr
    r = subprocess.run([sys.executable, "-m", "authplane.cli", "render", d, "--fleet", "edge", "--authz-tls-ca", d],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and r.stderr.startswith("authplane: --authz-tls-ca:") and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "authplane.cli", "serve", d, "--xds", "127.0.0.1:0", "--admin",
                        "127.0.0.1:0", "--authz-grpc-listen", "127.0.0.1:0", "--authz-http-listen", "127.0.0.1:0",
                        "--authz-workers", "0", "--authz-tls-cert", d, "--authz-tls-key", d],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "cannot read the decision service certificate" in r.stderr
    assert "Traceback" not in r.stderr
