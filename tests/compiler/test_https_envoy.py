"""HTTPS listeners, client-certificate identity and upstream mTLS through a real Envoy fed by
``authplane serve`` (certificates over SDS): SNI, redirect, require/optional, SAN rules, a forged
CA, XFCC spoofing, live rotation, broken replacements refused, keys never shown."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Any

import pytest

from authplane.devtools.echo import EchoServer
from authplane.devtools.httpserver import Handler
from authplane.envoy_bin import EnvoyProcess
from tests.support.certs import CA, Issued, fingerprint, write_replacing
from tests.support.http import Response, request
from tests.support.policies import write_policies
from tests.support.ports import free_port, wait_for
from tests.support.processes import ServeProcess, envoy_stat, start_envoys

BILLING = "spiffe://corp.example/ns/billing/app"


class _PeerName(Handler):
    """Answers with the URI SAN of the client certificate the TLS handshake verified."""

    def do_GET(self) -> None:
        cert = self.connection.getpeercert() or {}
        uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]
        self.send(200, json.dumps({"client": uris}), {"content-type": "application/json"})


class MtlsBackend:
    """An HTTPS upstream (Python ``ssl``) that refuses clients without a certificate from ``client_ca``."""

    def __init__(self, server: Issued, client_ca: str) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(server.cert, server.key)
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _PeerName)
        self.httpd.daemon_threads = True
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class Edge:
    dir: str
    serve: ServeProcess
    envoy: EnvoyProcess
    ports: dict[str, int]
    server_ca: CA
    certs: dict[str, Issued]
    policy_text: str


def gateways(ports: dict[str, int], backend_port: int, echo_port: int) -> str:
    return f"""
        kind: Gateway
        metadata: {{name: edge}}
        spec:
          fleet: edge
          listeners:
            - name: https
              port: {ports["https"]}
              address: 127.0.0.1
              protocol: https
              tls:
                certificates:
                  - certFile: tls/edge.crt
                    keyFile: tls/edge.key
                  - {{certFile: tls/api.crt, keyFile: tls/api.key}}
                clientValidation: {{caFile: tls/clients-ca.crt}}
            - name: http
              port: {ports["http"]}
              address: 127.0.0.1
              redirectToHttps: true
        ---
        kind: Gateway
        metadata: {{name: opt}}
        spec:
          fleet: edge
          listeners:
            - name: https
              port: {ports["optional"]}
              address: 127.0.0.1
              protocol: https
              tls:
                certificates: [{{certFile: tls/edge.crt, keyFile: tls/edge.key}}]
                minVersion: "1.3"
                clientValidation: {{caFile: tls/clients-ca.crt, mode: optional}}
                forwardClientCert: true
        ---
        kind: Backend
        metadata: {{name: echo}}
        spec: {{endpoints: ["127.0.0.1:{echo_port}"]}}
        ---
        kind: Backend
        metadata: {{name: secure}}
        spec:
          endpoints: ["127.0.0.1:{backend_port}"]
          tls: {{caFile: tls/edge-ca.crt, certFile: tls/gateway.crt, keyFile: tls/gateway.key,
                 sni: backend.internal}}
        ---
        kind: Route
        metadata: {{name: edge}}
        spec:
          gateway: edge
          rules:
            - {{name: secure, match: {{pathPrefix: /secure}}, backend: secure}}
            - {{name: main, backend: echo}}
        ---
        kind: Route
        metadata: {{name: opt}}
        spec: {{gateway: opt, rules: [{{name: main, backend: echo}}]}}
        ---
        kind: AuthPolicy
        metadata: {{name: edge}}
        spec:
          targetRef: {{kind: Gateway, name: edge}}
          authorization:
            rules:
              - {{name: billing, action: allow, when: {{clientCert: {{sans: ["spiffe://corp.example/ns/billing/*"]}}}}}}
              - {{name: ops, action: allow, when: {{clientCert: {{sans: [ops.corp.example]}}}}}}
              - name: no-ops-writes
                action: deny
                when: {{clientCert: {{sans: [ops.corp.example]}}, methods: [POST]}}
        ---
        kind: AuthPolicy
        metadata: {{name: opt}}
        spec:
          targetRef: {{kind: Gateway, name: opt}}
          authorization:
            rules:
              - {{name: public, action: allow, when: {{paths: [/public/*]}}}}
              - {{name: billing, action: allow, when: {{clientCert: {{sans: ["{BILLING}"]}}}}}}
        """


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    work = str(tmp_path_factory.mktemp("https"))
    tls_dir = os.path.join(work, "policies", "tls")
    server_ca, client_ca = CA(tls_dir, "edge-ca"), CA(tls_dir, "clients-ca")
    forged = CA(os.path.join(work, "forged"), "forged-ca")
    certs = {
        "edge": server_ca.issue("edge", ["edge.example.com", "localhost"]),
        "api": server_ca.issue("api", ["api.example.com"]),
        "backend": server_ca.issue("backend", ["backend.internal"]),
        "gateway": client_ca.issue("gateway", ["spiffe://corp.example/gateway/edge"], client=True),
        "billing": client_ca.issue("billing", [BILLING], client=True),
        "other": client_ca.issue("other", ["spiffe://corp.example/ns/other/app"], client=True),
        "ops": client_ca.issue("ops", ["ops.corp.example"], client=True),
        "forged": forged.issue("billing", [BILLING], client=True),
    }
    echo = EchoServer().start()
    backend = MtlsBackend(certs["backend"], client_ca.path)
    ports = {"https": free_port(), "http": free_port(), "optional": free_port()}
    text = gateways(ports, backend.port, echo.port)
    directory = write_policies(os.path.join(work, "policies"), {"edge.yaml": text})
    with open(os.path.join(directory, "edge.yaml")) as f:
        policy_text = f.read()
    serve = ServeProcess(directory, work).wait_started()
    envoys: list[EnvoyProcess] = []
    try:
        envoys = start_envoys(work, serve.xds, [("edge-1", "edge", True)])
        serve.wait_in_sync("edge-1")
        for port in ports.values():
            wait_for(lambda p=port: _open(p), f"port {port} to listen")
        yield Edge(directory, serve, envoys[0], ports, server_ca, certs, policy_text)
    finally:
        for envoy in envoys:
            envoy.stop()
        serve.stop()
        backend.stop()
        echo.stop()


def _open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def client_context(e: Edge, cert: str | None = None, check_hostname: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=e.server_ca.path)
    ctx.check_hostname = check_hostname
    if cert is not None:
        ctx.load_cert_chain(e.certs[cert].cert, e.certs[cert].key)
    return ctx


def https(e: Edge, port: str, path: str = "/", cert: str | None = "billing", sni: str | None = "localhost",
          method: str = "GET", headers: dict[str, str] | None = None) -> tuple[Response, str]:
    """One request over a new TLS connection; (the response, the fingerprint of the server's
    certificate)."""
    ctx = client_context(e, cert, check_hostname=sni is not None)
    with socket.create_connection(("127.0.0.1", e.ports[port]), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=sni) as tls:
        served = fingerprint(tls.getpeercert(binary_form=True) or b"")
        host = sni or "localhost"
        head = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        tls.sendall(f"{method} {path} HTTP/1.1\r\nhost: {host}\r\n{head}connection: close\r\n"
                    f"content-length: 0\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head_text, _, body = data.decode(errors="replace").partition("\r\n\r\n")
    lines = head_text.split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return Response(int(lines[0].split()[1]), {k.lower(): v for k, v in fields.items()}, body), served


def fp(e: Edge, name: str) -> str:
    with open(e.certs[name].cert, "rb") as f:
        return fingerprint(f.read())


def refused(e: Edge, port: str, cert: str | None) -> bool:
    """The TLS handshake (or, with TLS 1.3, the first read after it) fails."""
    try:
        https(e, port, cert=cert)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True
    except IndexError:  # the connection closed before any response line
        return True
    return False


def test_sni_chooses_the_certificate(edge: Edge) -> None:
    assert https(edge, "https", sni="localhost")[1] == fp(edge, "edge")
    assert https(edge, "https", sni="api.example.com")[1] == fp(edge, "api")
    assert https(edge, "https", sni=None)[1] == fp(edge, "edge")  # no SNI: the default chain


def test_plain_listener_redirects_to_https(edge: Edge) -> None:
    r = request(edge.ports["http"], "/some/path?q=1", host="app.example.com")
    assert r.status == 301
    assert r.headers["location"] == f"https://app.example.com:{edge.ports['https']}/some/path?q=1"


def test_require_refuses_a_client_without_certificate(edge: Edge) -> None:
    assert refused(edge, "https", cert=None)
    assert https(edge, "https", cert="billing")[0].status == 200


def test_optional_lets_a_client_without_certificate_match_no_client_cert_rule(edge: Edge) -> None:
    assert https(edge, "optional", "/public/x", cert=None)[0].status == 200
    assert https(edge, "optional", "/private", cert=None)[0].status == 403
    assert https(edge, "optional", "/private", cert="billing")[0].status == 200
    assert https(edge, "optional", "/private", cert="other")[0].status == 403


def test_san_rules_allow_and_deny(edge: Edge) -> None:
    assert https(edge, "https", cert="billing")[0].status == 200  # prefix rule
    assert https(edge, "https", cert="other")[0].status == 403
    assert https(edge, "https", cert="ops")[0].status == 200  # DNS SAN, exact
    assert https(edge, "https", cert="ops", method="POST")[0].status == 403


def test_a_forged_ca_with_the_same_san_is_refused(edge: Edge) -> None:
    assert refused(edge, "https", cert="forged")
    assert refused(edge, "optional", cert="forged")


def test_client_supplied_xfcc_never_reaches_the_upstream(edge: Edge) -> None:
    spoof = {"x-forwarded-client-cert": "By=spiffe://x;URI=spiffe://corp.example/ns/admin"}
    seen = json.loads(https(edge, "https", cert="billing", headers=spoof)[0].body)["headers"]
    assert "x-forwarded-client-cert" not in seen
    seen = json.loads(https(edge, "optional", "/public/x", cert=None, headers=spoof)[0].body)["headers"]
    assert "x-forwarded-client-cert" not in seen
    forwarded = json.loads(https(edge, "optional", "/private", cert="billing", headers=spoof)[0].body)["headers"]
    xfcc = forwarded["x-forwarded-client-cert"]
    assert f"URI={BILLING}" in xfcc and "ns/admin" not in xfcc and "spiffe://x" not in xfcc


def test_upstream_mtls_to_a_backend_that_requires_a_client_certificate(edge: Edge) -> None:
    r, _ = https(edge, "https", "/secure/x", cert="billing")
    assert r.status == 200, r.body
    assert r.json() == {"client": ["spiffe://corp.example/gateway/edge"]}


def _keys(e: Edge) -> list[str]:
    out = []
    for name in ("edge", "api", "gateway"):
        with open(e.certs[name].key) as f:
            out.append("".join(f.read().splitlines()[1:-1]))  # the base64 body of the PEM
    return out


def test_private_keys_absent_from_render_status_and_logs(edge: Edge) -> None:
    def render(*flags: str) -> str:
        return subprocess.run([sys.executable, "-m", "authplane.cli", "render", edge.dir, "--fleet", "edge", *flags],
                              capture_output=True, text=True, check=True).stdout

    out, static, shown = render(), render("--static"), render("--show-secrets")
    assert "[redacted:" in out and "tls_certificate" in out and "[redacted:" in static
    out += static
    status = json.dumps(edge.serve.status())
    flat = out.replace("\n", "").replace(" ", "")
    for key in _keys(edge):
        assert key[:40] not in flat and key[:40] not in status and key[:40] not in edge.serve.log()
        assert key[:40] in shown.replace("\n", "").replace(" ", "")


def _cert_field_position(e: Edge) -> str:
    """``path:line:col`` of the first certificate's certFile value in the policy file."""
    lines = e.policy_text.splitlines()
    line = next(i for i, t in enumerate(lines) if "certFile: tls/edge.crt" in t and "{" not in t)
    col = lines[line].index("tls/edge.crt")
    return f"{os.path.join(e.dir, 'edge.yaml')}:{line + 1}:{col + 1}"


def _rejected(e: Edge, needle: str) -> dict[str, Any] | None:
    error = e.serve.status().get("last_reload_error")
    return error if error and any(needle in p for p in error["problems"]) else None


def test_rotation_is_served_to_new_connections_and_broken_files_are_refused(edge: Edge) -> None:
    """Last: it replaces the edge certificate (the other tests only need it to chain to the CA)."""
    modified = envoy_stat(edge.envoy, "listener_manager.listener_modified")
    kept_alive = socket.create_connection(("127.0.0.1", edge.ports["https"]), timeout=10)
    tls = client_context(edge, "billing").wrap_socket(kept_alive, server_hostname="localhost")
    before = fingerprint(tls.getpeercert(binary_form=True) or b"")

    rotated = edge.server_ca.issue("edge", ["edge.example.com", "localhost"])
    with open(rotated.cert, "rb") as f:
        new = fingerprint(f.read())
    assert new != before
    wait_for(lambda: https(edge, "https")[1] == new, "the rotated certificate on a new connection", 30)
    assert envoy_stat(edge.envoy, "listener_manager.listener_modified") == modified  # no listener drain
    tls.sendall(b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")  # the old connection lives
    assert tls.recv(65536).startswith(b"HTTP/1.1 200")
    tls.close()

    where = _cert_field_position(edge)
    with open(rotated.cert, "rb") as f:
        good = f.read()
    write_replacing(rotated.cert, b"-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
    error = wait_for(lambda: _rejected(edge, "is not a PEM certificate"), "the broken certificate refused", 30)
    assert any(p.startswith(where + ":") for p in error["problems"]), (where, error["problems"])
    assert https(edge, "https")[1] == new

    mismatched = CA(os.path.join(edge.dir, "..", "other"), "other-ca").issue("edge", ["localhost"])
    with open(mismatched.cert, "rb") as f:
        write_replacing(rotated.cert, f.read())  # a certificate without its key
    error = wait_for(lambda: _rejected(edge, "is not the key of the certificate"), "the mismatched pair refused", 30)
    assert any(p.startswith(where + ":") for p in error["problems"]), (where, error["problems"])
    assert https(edge, "https")[1] == new

    with open(rotated.key, "rb") as f:
        good_key = f.read()
    expired = CA(os.path.join(edge.dir, "..", "expired"), "edge-ca").issue("edge", ["localhost"], expired=True)
    for src, dst in ((expired.key, rotated.key), (expired.cert, rotated.cert)):
        with open(src, "rb") as f:
            write_replacing(dst, f.read())
    error = wait_for(lambda: _rejected(edge, "expired on"), "the expired certificate refused", 30)
    assert any(p.startswith(where + ":") for p in error["problems"]), (where, error["problems"])
    assert https(edge, "https")[1] == new

    write_replacing(rotated.key, good_key)
    write_replacing(rotated.cert, good)
    wait_for(lambda: edge.serve.status().get("last_reload_error") is None, "the good certificate back", 30)
    assert https(edge, "https")[1] == new
