"""Random and mutated wire bytes: CheckRequests (gRPC) and raw HTTP requests (Envoy's HTTP mode,
forward auth) to the decision service, ADS requests to the control plane of ``serve``.

Every case comes from one integer seed (``check_case(seed)``, ``ads_case(seed)``), so a failure
names its input; bench/fuzz.py runs the same generators for many more seeds.
"""

from __future__ import annotations

import logging
import random
import re
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError

from authplane.authz.grpc_api import SERVICE, GrpcFrontend
from authplane.compiler.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE
from authplane.controlplane.app import ControlPlane, ServeConfig
from tests.authz.test_authz_service import SAMPLE
from tests.support.ads import AdsClient, delta_request, sotw_request
from tests.support.policies import documents, gateway, write_policies
from tests.support.processes import InProcess, ServiceThread

POLICY_KEY = "authplane.policy"
API_KEYS = ("key-1", "key-2")  # the keys of SAMPLE's keys.txt
CASES = 300

ODD = ["", " ", "\x00", "\x7f\x1b[2J", "\u202e", "💥", "é", "a" * 5000, "/api;x", "/../../etc/passwd",
       "/%2e%2e/", "*", "X-Team", "x-team", "blue", "Blue", " blue", "key-1", "Bearer key-1", "p", "P",
       "p\x00", "other", "GET", "CONNECT", "http", "javascript:", "::1", "999.1.1.1", "\r\nx: y"]


def _odd(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(0, 40)))
    return rng.choice(ODD)


def _mutate_bytes(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(6)
        at = rng.randrange(len(buf) + 1)
        if op == 0 and buf:  # flip bits
            buf[min(at, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:  # truncate
            del buf[at:]
        elif op == 2:  # insert random bytes
            buf[at:at] = rng.randbytes(rng.randrange(1, 16))
        elif op == 3:  # duplicate a slice
            end = rng.randrange(at, len(buf) + 1)
            buf[at:at] = buf[at:end]
        elif op == 4:  # append another message: protobuf merges the two
            buf += rng.choice(others)
        else:  # a varint that never ends, or a huge length prefix
            buf[at:at] = rng.choice([b"\xff" * 11, b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x80\x80\x80\x80\x08"])
    return bytes(buf)


def server_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Errors (tracebacks) the servers logged: authplane's own, aiohttp's and gRPC's."""
    return [r for r in caplog.records
            if r.levelno >= logging.ERROR and r.name.startswith(("authplane", "aiohttp", "grpc"))]


# --- CheckRequest ---------------------------------------------------------------------------------

def _check_request(rng: random.Random) -> pb.CheckRequest:
    req = pb.CheckRequest()
    attrs = req.attributes
    http = attrs.request.http
    http.method, http.path, http.host = rng.choice(["GET", "POST"]), rng.choice(["/x", "/"]), "app"
    if rng.random() < 0.8:
        attrs.context_extensions[POLICY_KEY] = "p" if rng.random() < 0.8 else _odd(rng)
    good = rng.randrange(4)
    if good == 1:
        http.headers["x-team"] = "blue"
    elif good == 2:
        http.headers["x-api-key"] = rng.choice(API_KEYS)
    for _ in range(rng.choice([0, 0, 1, 3, 50])):  # odd fields
        where = rng.randrange(6)
        if where == 0:
            http.headers[_odd(rng)] = _odd(rng)
        elif where == 1:
            http.path, http.method = _odd(rng), _odd(rng)
        elif where == 2:
            attrs.context_extensions[_odd(rng)] = _odd(rng)
        elif where == 3:
            attrs.source.address.socket_address.address = _odd(rng)
        elif where == 4:
            payload = attrs.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"]
            claims = payload.fields["payload"].struct_value
            node = claims
            for _ in range(rng.randrange(0, 30)):  # nested claims
                node = node.fields[_odd(rng) or "k"].struct_value
            node.fields["groups"].list_value.values.add().string_value = _odd(rng)
        else:
            http.header_map.headers.add(key=_odd(rng), value=_odd(rng))
    return req


def check_case(seed: int) -> bytes:
    """Serialized CheckRequest bytes: valid, mutated after serializing, or random."""
    rng = random.Random(seed)
    kind = rng.random()
    if kind < 0.1:
        return rng.randbytes(rng.randrange(0, 200))
    data = _check_request(rng).SerializeToString()
    if kind < 0.55:
        return data
    return _mutate_bytes(rng, data, [_check_request(rng).SerializeToString() for _ in range(2)])


def may_allow(raw: bytes) -> bool:
    """Whether SAMPLE's policy could allow these bytes: its rules allow x-team: blue or a known API
    key on policy ``p``, and nothing else (generous in what it counts as such a header)."""
    try:
        req = pb.CheckRequest.FromString(raw)
    except DecodeError:
        return False
    http = req.attributes.request.http
    if req.attributes.context_extensions.get(POLICY_KEY) != "p":
        return False
    pairs = [*http.headers.items(), *((h.key, h.value) for h in http.header_map.headers)]
    return any((k.lower() == "x-team" and "blue" in v) or (k.lower() == "x-api-key" and any(a in v for a in API_KEYS))
               for k, v in pairs)


def check_answer(raw: bytes, answer: bytes) -> None:
    """A well-formed CheckResponse that allows only what the policy could allow."""
    resp = pb.CheckResponse.FromString(answer)
    allowed = resp.status.code == 0
    assert resp.HasField("ok_response" if allowed else "denied_response"), resp
    assert "internal error" not in resp.status.message, resp
    if allowed:
        assert may_allow(raw), f"allowed a request the policy denies: {raw!r}"
    else:
        assert resp.denied_response.status.code >= 400, resp
    try:
        pb.CheckRequest.FromString(raw)
    except DecodeError:
        assert resp.denied_response.status.code == 400, resp


@pytest.fixture
def decision_service(tmp_path):
    d = write_policies(str(tmp_path / "p"), {"p.yaml": SAMPLE, "keys.txt": "acme: key-1\nglobex: key-2\n"})
    svc = ServiceThread(d)
    yield svc
    svc.close()


def test_check_request_bytes_over_grpc_and_direct(decision_service, caplog):
    """300 random and mutated CheckRequests: each answer is a CheckResponse, garbage is denied, no
    allow the policy would not give; the service logs no traceback and still answers afterwards."""
    caplog.set_level(logging.ERROR)
    frontend = GrpcFrontend(decision_service.svc.decider)
    allowed = 0
    with grpc.insecure_channel(f"127.0.0.1:{decision_service.svc.grpc_port}") as ch:
        call = ch.unary_unary(f"/{SERVICE}/Check")
        for seed in range(CASES):
            raw = check_case(seed)
            answer = call(raw, timeout=10)
            check_answer(raw, answer)
            check_answer(raw, frontend.answer(raw))
            allowed += pb.CheckResponse.FromString(answer).status.code == 0
        ok = pb.CheckRequest()
        ok.attributes.context_extensions[POLICY_KEY] = "p"
        ok.attributes.request.http.headers["x-team"] = "blue"
        assert pb.CheckResponse.FromString(call(ok.SerializeToString(), timeout=10)).status.code == 0
    assert allowed >= CASES // 10  # the generator reaches the allow rules, not only the denials
    assert not server_errors(caplog), caplog.text


# --- HTTP: Envoy's HTTP mode and forward auth ----------------------------------------------------

HTTP_TARGETS = ["/authz/p", "/authz", "/authz?x=1", "/authz/other", "/authz/p/../p", "/envoy/p/x", "/envoy/p/",
                "/envoy/", "/envoy/p/a/../admin", "/healthz", "/nope", "*", "http://h/authz/p", "/authz/%70"]
ORIGINAL_URLS = ["http://app/x", "https://app:8443/a?b=c", "http://[::1", "http://[::1]:99999/x", "//x", "x",
                 "http://app/%2e%2e/admin", "http://app/a;b", "http://a b/", "http://app\\x", ":", "http://:@/",
                 "http://app/" + "a" * 5000]


def _header(rng: random.Random) -> str:
    name = rng.choice(["X-Original-URL", "X-Original-Method", "X-Forwarded-Method", "X-Forwarded-Proto",
                       "X-Forwarded-Host", "X-Forwarded-Uri", "X-Forwarded-For", "X-Real-IP",
                       "X-Authplane-Policy", "X-Team", "x-team", "X-Api-Key", "Authorization", "Cookie",
                       "Accept"] * 3 + ["Host", "Content-Length", "Transfer-Encoding", _odd(rng)])
    value = (rng.choice(ORIGINAL_URLS) if name == "X-Original-URL" else
             _odd(rng) if rng.random() < 0.03 else
             rng.choice(["blue", "p", "GET", "key-1", "Bearer key-2", "https", "10.0.0.1, 1.2.3.4",
                         "text/html", "chunked", "0", "-1", "é", "/a/../admin", "/a;b", "/%2e%2e/x"]))
    return f"{name}: {value}"


def http_case(seed: int) -> bytes:
    """One raw HTTP/1.1 request to the decision service: odd targets and headers, mutated bytes."""
    rng = random.Random(seed)
    method = _odd(rng) if rng.random() < 0.05 else rng.choice(["GET", "GET", "POST", "HEAD", "OPTIONS"])
    lines = [f"{method} {rng.choice(HTTP_TARGETS)} HTTP/1.1",
             "Host: authz"]
    if rng.random() < 0.3:
        lines.append(rng.choice(["X-Team: blue", "X-Api-Key: key-1"]))
    lines += [_header(rng) for _ in range(rng.choice([0, 1, 3, 8]))]
    data = ("\r\n".join([*lines, "Connection: close"]) + "\r\n\r\n").encode("utf-8", "surrogatepass")
    if rng.random() < 0.2:  # still ending like a request, so that most get an answer without waiting
        data = _mutate_bytes(rng, data, [data]) + b"\r\n\r\n"
    return data


def _complete(answer: bytes) -> bool:
    head, sep, body = answer.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    return bool(sep) and (length is None or len(body) >= int(length.group(1)))


def http_exchange(port: int, data: bytes, patience: float = 3, timeout: float = 10) -> bytes:
    """Send ``data`` on a fresh connection and read one response. A request the server is still
    waiting to see the end of gets ``patience`` seconds, then the end of the stream (aiohttp
    drops an answer in progress when the client half-closes, so only then)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.settimeout(patience)
        answer = b""
        while not _complete(answer):
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(timeout)
                continue
            if not chunk:
                break
            answer += chunk
    return answer


def check_http_answer(data: bytes, answer: bytes) -> int:
    """A status line; never a 5xx; a 200 from a check only where the policy could allow."""
    if not answer:  # the server may close on bytes that are no HTTP at all
        return 0
    line = re.match(rb"HTTP/\d\.\d (\d{3}) ", answer)
    assert line, answer[:200]
    status = int(line.group(1))
    assert status < 500, f"{status} for {data[:300]!r}: {answer[:300]!r}"
    target = unquote_to_bytes(data.split(b" ", 2)[1]) if data.count(b" ") >= 2 else b""
    low = data.lower()
    if status == 200 and target.startswith((b"/authz", b"/envoy")):
        named = b"/p" in target or re.search(rb"(?m)^x-authplane-policy:[ \t]*p", low)
        passes = re.search(rb"(?m)^x-team:[ \t]*blue", low) or any(k.encode() in low for k in API_KEYS)
        assert named and passes, f"allowed a request the policy denies: {data[:300]!r}"
    return status


def test_http_check_bytes(decision_service, caplog):
    """300 raw HTTP requests (Envoy's HTTP mode and forward auth, odd X-Original-URL and
    X-Forwarded-* values, mutated bytes): never a 5xx or a traceback, no allow the policy would
    not give, and a normal forward-auth check still works afterwards."""
    caplog.set_level(logging.ERROR)
    port = decision_service.svc.http_port
    statuses = [check_http_answer(data, http_exchange(port, data)) for data in map(http_case, range(CASES))]
    assert statuses.count(200) >= 10 and len({s for s in statuses if s >= 400}) >= 2
    ok = b"GET /authz/p HTTP/1.1\r\nHost: a\r\nX-Original-URL: http://app/x\r\nX-Team: blue\r\n\r\n"
    assert check_http_answer(ok, http_exchange(port, ok)) == 200
    assert not server_errors(caplog), caplog.text


# --- ADS ------------------------------------------------------------------------------------------

TYPES = [CLUSTER, ENDPOINT, LISTENER, ROUTE]
ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
GATEWAY = documents(gateway("edge", 18999))  # never bound: no Envoy here
BACKEND = 'kind: Backend\nmetadata: {name: echo}\nspec: {endpoints: ["127.0.0.1:9"]}'
ROUTES = "kind: Route\nmetadata: {name: app}\nspec: {gateway: edge, rules: [{name: a, backend: echo}]}"


@dataclass
class AdsCase:
    delta: bool
    requests: list[bytes]


def _node_id(rng: random.Random) -> str:
    if rng.random() < 0.05:
        return "n" * rng.choice([100_000, 1_000_000])
    return rng.choice(["n1", "", "\x00", "n\n1", "💥", "a" * 300, "../../x", "n1", "n2"]) if rng.random() < 0.6 \
        else _odd(rng)


def _ads_request(rng: random.Random, delta: bool, first: bool) -> Any:
    node_id = _node_id(rng) if first or rng.random() < 0.1 else ""
    fleet = rng.choice(["edge", "edge", "", "nope", _odd(rng)])
    type_url = rng.choice([*TYPES, *TYPES, "", "type.googleapis.com/nope", _odd(rng)])
    huge = "x" * (10_000 if rng.random() < 0.05 else 1000)
    names = [rng.choice(["app", "echo", "edge", "*", _odd(rng), huge]) for _ in range(rng.choice([0, 0, 1, 3, 1000]))]
    nonce = rng.choice(["", "", "1", "999999", "-1", _odd(rng)])
    error = rng.choice(["", "", "", _odd(rng)])
    if delta:
        unsub = names[: rng.randrange(len(names) + 1)] if rng.random() < 0.3 else []
        initial = {n: _odd(rng) for n in names[:3]} if rng.random() < 0.2 else None
        return delta_request(type_url, names, unsub, nonce=nonce, error=error, initial=initial,
                             node_id=node_id, fleet=fleet)
    return sotw_request(type_url, names, nonce=nonce, version=rng.choice(["", "v", _odd(rng)]), error=error,
                        node_id=node_id, fleet=fleet)


def ads_case(seed: int) -> AdsCase:
    """One ADS stream's requests: typed requests with odd fields, mutated bytes, random bytes."""
    rng = random.Random(seed)
    delta = rng.random() < 0.5
    requests = [_ads_request(rng, delta, i == 0).SerializeToString() for i in range(rng.randrange(1, 6))]
    out = []
    for data in requests:
        kind = rng.random()
        out.append(rng.randbytes(rng.randrange(0, 100)) if kind < 0.1
                   else _mutate_bytes(rng, data, requests) if kind < 0.4 else data)
    return AdsCase(delta, out)


def run_ads_case(channel: grpc.Channel, case: AdsCase, timeout: float = 10) -> int:
    """Send the case on one stream, close it, read every response; returns how many came.
    A stream may end with an error status, never INTERNAL/UNKNOWN (a server bug)."""
    method = "DeltaAggregatedResources" if case.delta else "StreamAggregatedResources"
    call = channel.stream_stream(ADS + method)(iter(case.requests), timeout=timeout)
    parse = (discovery_pb2.DeltaDiscoveryResponse if case.delta else discovery_pb2.DiscoveryResponse).FromString
    count = 0
    try:
        for answer in call:
            parse(answer)
            count += 1
    except grpc.RpcError as e:
        assert e.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                                grpc.StatusCode.DEADLINE_EXCEEDED), f"{e.code()}: {e.details()}"
    return count


def assert_serves_snapshot(address: str) -> None:
    """A normal client of fleet edge still gets its clusters (SotW) and listeners (Delta)."""
    for delta in (False, True):
        client = AdsClient(address, delta)
        try:
            req = (delta_request(LISTENER, node_id="probe", fleet="edge") if delta
                   else sotw_request(CLUSTER, node_id="probe", fleet="edge"))
            client.send(req)
            assert client.recv().resources
        finally:
            client.close()


@pytest.fixture
def plane(tmp_path):
    d = write_policies(str(tmp_path / "policies"), {"all.yaml": documents(GATEWAY, BACKEND, ROUTES)})
    cp = ControlPlane(ServeConfig(d, xds="127.0.0.1:0", admin="127.0.0.1:0", watch=False))
    cp.load()
    running = InProcess(cp)
    yield running
    running.close()


def test_ads_request_bytes_keep_serving(plane, caplog):
    """300 ADS streams of odd and mutated requests (odd node ids, unknown type URLs, bad nonces,
    huge names, random bytes): no stream fails inside the server, and a normal client still gets
    its snapshot after every 50 of them."""
    caplog.set_level(logging.ERROR)
    responses = 0
    with grpc.insecure_channel(plane.xds) as ch:
        for seed in range(CASES):
            responses += run_ads_case(ch, ads_case(seed))
            if seed % 50 == 49:
                assert_serves_snapshot(plane.xds)
    assert responses >= CASES // 10  # enough requests were understood to be answered
    assert isinstance(plane.status()["nodes"], list)  # the admin side answers too
    assert not server_errors(caplog), caplog.text
