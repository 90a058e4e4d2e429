"""The secured control channel: ADS over TLS, fleets from client certificates, live rotation of
the server's certificate, and the bootstrap's matching transport socket (real Envoys, real gRPC)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from envoy.service.discovery.v3 import ads_pb2_grpc

from authplane.controlplane.bootstrap import XdsClientTls, bootstrap_yaml
from authplane.controlplane.tls import certificate_fleets
from authplane.envoy_bin import EnvoyProcess, validate_config
from tests.support.ads import sotw_request
from tests.support.http import request
from tests.support.policies import backend, documents, gateway, write_policies
from tests.support.ports import free_port, wait_for
from tests.support.processes import ServeProcess

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"


@dataclass
class Issued:
    cert: str
    key: str


class CA:
    """A certificate authority minting PEM files into a directory."""

    def __init__(self, directory: str, name: str) -> None:
        self.directory, self.name = directory, name
        os.makedirs(directory, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.subject = subject
        self.cert = (self._builder(subject, self.key.public_key())
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.path = os.path.join(directory, f"{name}.pem")
        with open(self.path, "wb") as f:
            f.write(self.cert.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        now, minutes = datetime.datetime.now(datetime.UTC), datetime.timedelta(minutes=5)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(getattr(self, "subject", subject))
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - minutes).not_valid_after(now + 300 * minutes))

    def issue(self, name: str, sans: list[x509.GeneralName]) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key.public_key())
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .sign(self.key, hashes.SHA256()))
        issued = Issued(os.path.join(self.directory, f"{name}.crt"), os.path.join(self.directory, f"{name}.key"))
        write_replacing(issued.cert, cert.public_bytes(serialization.Encoding.PEM))
        write_replacing(issued.key, key.private_bytes(serialization.Encoding.PEM,
                                                      serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
        return issued

    def server(self, name: str) -> Issued:
        return self.issue(name, [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])

    def fleet(self, name: str, *fleets: str) -> Issued:
        return self.issue(name, [x509.UniformResourceIdentifier(f"spiffe://corp.example/fleet/{f}") for f in fleets])


def write_replacing(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def key_body(issued: Issued) -> list[str]:
    """The base64 lines of a private key: none may appear in logs or status."""
    return [line for line in read(issued.key).decode().splitlines() if line and not line.startswith("-----")]


def ads_call(address: str, ca: str, client: Issued | None = None, fleet: str = "edge",
             server_name: str = "localhost") -> tuple[grpc.StatusCode | None, list[str]]:
    """One SotW request for clusters over TLS: (error code or None, names received)."""
    creds = grpc.ssl_channel_credentials(read(ca), read(client.key) if client else None,
                                         read(client.cert) if client else None)
    with grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", server_name)]) as channel:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(
            iter([sotw_request(CLUSTER, node_id=f"raw-{fleet}", fleet=fleet)]), timeout=10)
        try:
            response = next(call)
        except grpc.RpcError as e:
            return e.code(), []
        finally:
            call.cancel()
    from envoy.config.cluster.v3 import cluster_pb2

    names = []
    for any_ in response.resources:
        c = cluster_pb2.Cluster()
        any_.Unpack(c)
        names.append(c.name)
    return None, names


POLICIES = """
    kind: Route
    metadata: {name: app}
    spec:
      gateway: edge
      rules: [{name: open, match: {pathPrefix: /open}, backend: echo},
              {name: closed, match: {pathPrefix: /closed}, backend: echo}]
    ---
    kind: AuthPolicy
    metadata: {name: open}
    spec: {targetRef: {kind: Route, name: app, rule: open}, public: true}
    ---
    kind: AuthPolicy
    metadata: {name: closed}
    spec:
      targetRef: {kind: Route, name: app, rule: closed}
      authorization: {rules: [{name: posts, action: allow, when: {methods: [POST]}}]}
    """


@pytest.fixture
def pki(tmp_path) -> Iterator[tuple[CA, Issued]]:
    ca = CA(str(tmp_path), "xds-ca")
    yield ca, ca.server("authplane")


def policies(tmp_path, echo_port: int, listen_port: int) -> str:
    return write_policies(str(tmp_path / "policies"), {
        "gateway.yaml": documents(gateway("edge", listen_port), backend("echo", echo_port), POLICIES)})


def mtls_serve(tmp_path, directory: str, server: Issued, ca: CA, *extra: str) -> ServeProcess:
    return ServeProcess(directory, str(tmp_path), 0, "--xds-tls-cert", server.cert, "--xds-tls-key", server.key,
                        "--xds-client-ca", ca.path, *extra).wait_started()


def start_envoy(tmp_path, serve: ServeProcess, node_id: str, fleet: str, ca: CA, client: Issued,
                native_log: bool = False) -> EnvoyProcess:
    path = str(tmp_path / f"{node_id}.yaml")
    with open(path, "w") as f:
        f.write(bootstrap_yaml(node_id, fleet, serve.xds, admin_port=0,
                               tls=XdsClientTls(ca.path, "localhost", client.cert, client.key), native_log=native_log))
    return EnvoyProcess(path, log_path=str(tmp_path / f"{node_id}.log")).start()


def listeners(envoy: EnvoyProcess) -> list[str]:
    _, body = envoy.admin_get("/listeners?format=json")
    return [lst["name"] for lst in json.loads(body).get("listener_statuses", [])]


def test_fleet_certificates_decide_what_each_envoy_receives(tmp_path, pki, processes, echo):
    envoys, serves = processes
    ca, server = pki
    port = free_port()
    serves.append(serve := mtls_serve(tmp_path, policies(tmp_path, echo.port, port), server, ca))
    edge_cert, other_cert = ca.fleet("edge-1", "edge"), ca.fleet("fleet-b-1", "fleet-b")

    # a TLS client without a certificate does not get past the handshake
    assert ads_call(serve.xds, ca.path)[0] == grpc.StatusCode.UNAVAILABLE
    # nor one whose certificate another CA signed
    stranger = CA(str(tmp_path / "p"), "other-ca").fleet("stranger", "edge")
    assert ads_call(serve.xds, ca.path, stranger)[0] == grpc.StatusCode.UNAVAILABLE
    # with its own certificate a raw client gets the fleet's clusters; asking as another fleet, nothing
    assert ads_call(serve.xds, ca.path, edge_cert) == (None, ["echo"])
    assert ads_call(serve.xds, ca.path, other_cert, fleet="edge") == (grpc.StatusCode.PERMISSION_DENIED, [])

    # a real Envoy with fleet-b's certificate asking as fleet edge gets nothing, again and again
    envoys.append(impostor := start_envoy(tmp_path, serve, "impostor", "edge", ca, other_cert))
    refused = wait_for(lambda: next((r for r in serve.status()["refused"] if r["id"] == "impostor"
                                     and r["count"] >= 2), None), "the impostor refused twice")
    assert refused["reason"] == "fleet" and refused["fleet"] == "edge" and "fleet-b" in refused["message"]
    assert listeners(impostor) == []  # refused before any response: it never had a listener
    assert "impostor" not in {n["id"] for n in serve.status()["nodes"]}
    samples = serve.metrics()
    assert samples[("authplane_xds_refused_streams_total", (("reason", "fleet"),))] >= 3  # raw one + Envoy's two
    shown = subprocess.run([sys.executable, "-m", "authplane.cli", "status", "--admin", serve.address],
                           capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and "REFUSED" in shown.stdout
    assert any(line.split()[:3] == ["impostor", "edge", "fleet"] for line in shown.stdout.splitlines())
    assert "not one its client certificate names" in serve.log()

    # a real Envoy with its own certificate gets the config and enforces the policy
    envoys.append(edge := start_envoy(tmp_path, serve, "edge-1", "edge", ca, edge_cert))
    edge.wait_ready()
    serve.wait_in_sync("edge-1")
    wait_for(lambda: request(port, "/open").status == 200, "the edge listener to serve")
    assert request(port, "/closed").status == 403
    assert request(port, "/closed", method="POST", body="").status == 200
    assert listeners(impostor) == []

    text = serve.log() + json.dumps(serve.status())
    for issued in (server, edge_cert, other_cert):
        assert not any(line in text for line in key_body(issued))


def test_native_decision_log_rides_the_mutual_tls_channel_and_names_only_its_fleet(tmp_path, pki, processes, echo,
                                                                                    native_module):
    """``--decision-log-transport native``: the module's batches go over the xDS cluster, so with
    the fleet certificate; a caller reporting for a fleet its certificate does not name is refused."""
    from authplane.contract import NATIVE_DECISION_LOG_PATH
    from tests.support.native import search_path

    envoys, serves = processes
    ca, server = pki
    port = free_port()
    log_path = str(tmp_path / "decisions.jsonl")
    serves.append(serve := mtls_serve(tmp_path, policies(tmp_path, echo.port, port), server, ca,
                                      "--decision-log", log_path, "--decision-log-transport", "native"))
    edge_cert, other_cert = ca.fleet("edge-1", "edge"), ca.fleet("fleet-b-1", "fleet-b")
    with search_path(native_module):
        envoys.append(edge := start_envoy(tmp_path, serve, "edge-1", "edge", ca, edge_cert, native_log=True))
    edge.wait_ready()
    serve.wait_in_sync("edge-1")
    wait_for(lambda: request(port, "/open").status == 200, "the edge listener to serve")
    assert request(port, "/closed").status == 403

    def logged() -> list[dict]:
        return [json.loads(line) for line in open(log_path)] if os.path.exists(log_path) else []

    line = wait_for(lambda: next(iter(logged()), None), "the denial in the decision log")
    assert (line["fleet"], line["node"], line["policy"], line["check"], line["verdict"], line["status"]) == (
        "edge", "edge-1", "closed", "authorization", "deny", 403)

    def report(client: Issued, fleet: str) -> grpc.StatusCode | None:
        creds = grpc.ssl_channel_credentials(read(ca.path), read(client.key), read(client.cert))
        options = [("grpc.ssl_target_name_override", "localhost")]
        with grpc.secure_channel(serve.xds, creds, options=options) as channel:
            body = f"v1\x1fforged\x1f{fleet}\x1f0\x1e0\x1fid\x1fapp/closed\x1f403\x1frbac\x1f\x1f".encode()
            try:
                channel.unary_unary(NATIVE_DECISION_LOG_PATH)(body, timeout=10)
            except grpc.RpcError as e:
                return e.code()
        return None

    assert report(other_cert, "edge") == grpc.StatusCode.PERMISSION_DENIED
    assert report(edge_cert, "edge") is None
    wait_for(lambda: any(r["node"] == "forged" for r in logged()), "the permitted batch written")
    assert not any(r["node"] == "forged" and r["fleet"] != "edge" for r in logged())


def test_server_certificate_rotates_without_restart(tmp_path, pki, processes):
    _, serves = processes
    ca, server = pki
    d = write_policies(str(tmp_path / "policies"), {"gateway.yaml": documents(
        gateway("edge", free_port()), backend("echo", free_port()), POLICIES)})
    serves.append(serve := ServeProcess(d, str(tmp_path), 0, "--xds-tls-cert", server.cert,
                                        "--xds-tls-key", server.key).wait_started())
    assert "does not authenticate clients" in serve.log()  # TLS without a client CA: anyone may read
    assert ads_call(serve.xds, ca.path) == (None, ["echo"])

    # a broken key is reported and the previous certificate kept
    original_key = read(server.key)
    write_replacing(server.key, b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    assert ads_call(serve.xds, ca.path) == (None, ["echo"])
    wait_for(lambda: "cannot be used (keeping the previous ones)" in serve.log(), "the broken key reported")
    write_replacing(server.key, original_key)

    # a certificate from a new CA: new connections see it, old trust no longer works
    new_ca = CA(str(tmp_path / "p"), "new-ca")
    new_server = new_ca.server("authplane-2")
    write_replacing(server.key, read(new_server.key))
    write_replacing(server.cert, read(new_server.cert))
    wait_for(lambda: ads_call(serve.xds, new_ca.path) == (None, ["echo"]), "the new certificate served")
    assert ads_call(serve.xds, ca.path)[0] == grpc.StatusCode.UNAVAILABLE
    assert serve.proc.poll() is None
    text = serve.log() + json.dumps(serve.status())
    assert not any(line in text for issued in (server, new_server) for line in key_body(issued))


def test_plaintext_serve_warns_and_tls_flags_go_together(tmp_path, processes):
    _, serves = processes
    d = write_policies(str(tmp_path / "policies"), {"gateway.yaml": documents(
        gateway("edge", free_port()), backend("echo", free_port()), POLICIES)})
    serves.append(serve := ServeProcess(d, str(tmp_path), 0).wait_started())
    assert "does not authenticate clients: anything that reaches this port can read every fleet's" in serve.log()
    for flags in (["--xds-tls-cert", "c.pem"], ["--xds-client-ca", "ca.pem"]):
        r = subprocess.run([sys.executable, "-m", "authplane.cli", "serve", d, *flags], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "go together" in r.stderr
    r = subprocess.run([sys.executable, "-m", "authplane.cli", "serve", d, "--xds", "127.0.0.1:0", "--admin",
                        "127.0.0.1:0", "--no-authz", "--xds-tls-cert", d, "--xds-tls-key", d],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "cannot read the xDS certificate" in r.stderr and "Traceback" not in r.stderr


def test_bootstrap_with_tls_passes_envoy_validation(tmp_path, pki):
    ca, _ = pki
    client = ca.fleet("edge-1", "edge")
    out = subprocess.run([sys.executable, "-m", "authplane.cli", "bootstrap", "--node-id", "edge-1", "--fleet",
                          "edge", "--xds", "authplane.internal:18000", "--xds-ca", ca.path, "--xds-client-cert",
                          client.cert, "--xds-client-key", client.key], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    ok, message = validate_config(out.stdout)
    assert ok, message
    assert "sni: authplane.internal" in out.stdout and client.key in out.stdout
    assert not any(line in out.stdout for line in key_body(client))  # a path, never the key itself
    plain = XdsClientTls(ca.path, "127.0.0.1")  # an IP: no SNI, the IP SAN checked
    text = bootstrap_yaml("edge-2", "edge", "127.0.0.1:18000", tls=plain)
    assert "sni:" not in text and "IP_ADDRESS" in text
    ok, message = validate_config(text)
    assert ok, message


def test_fleets_named_by_a_certificate(tmp_path):
    ca = CA(str(tmp_path), "ca")
    issued = ca.issue("mixed", [x509.UniformResourceIdentifier("spiffe://corp.example/fleet/edge"),
                                x509.UniformResourceIdentifier("spiffe://corp.example/region/eu/fleet/internal"),
                                x509.UniformResourceIdentifier("spiffe://corp.example/fleet/"),
                                x509.UniformResourceIdentifier("spiffe://corp.example/fleets/admin"),
                                x509.UniformResourceIdentifier("spiffe://corp.example/fleet/edge/extra"),
                                x509.DNSName("fleet")])
    assert certificate_fleets(x509.load_pem_x509_certificate(read(issued.cert))) == {"edge", "internal"}
    bare = ca.issue("bare", [x509.DNSName("edge.example")])
    assert certificate_fleets(x509.load_pem_x509_certificate(read(bare.cert))) == frozenset()
