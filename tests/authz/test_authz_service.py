"""The decision service's parts: gRPC robustness, cache keys, API keys, validation, workers."""

from __future__ import annotations

import http.client
import time

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as pb
from google.protobuf import struct_pb2

from authplane.authz.cache import TtlCache, cache_key
from authplane.authz.evaluate import Request, api_client, decide
from authplane.authz.grpc_api import SERVICE
from authplane.authz.rules import compile_table
from authplane.authz.workers import start_workers
from authplane.errors import PolicyError
from authplane.policy.credentials import KeyFileError, parse_api_keys
from authplane.policy.loader import load_dir
from tests.support.policies import app_gateway, app_policy, write_policies
from tests.support.processes import ServiceThread


def policy(ext: str) -> str:
    return app_gateway(9) + "---\n" + app_policy(ext, name="p")


SAMPLE = policy("""
        service: builtin
        apiKeys: {file: keys.txt}
        rules:
          - {name: key, action: allow, when: {apiKeys: ["*"]}}
          - {name: team, action: allow, when: {headers: {x-team: [blue]}}}
          - {name: rest, action: deny, deny: {status: 401, body: who are you}}
""")


@pytest.fixture
def sample(tmp_path):
    d = write_policies(str(tmp_path / "p"), {"p.yaml": SAMPLE, "keys.txt": "acme: key-1\nglobex: key-2\n"})
    return d


def _check(port: int, raw: bytes) -> pb.CheckResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary(f"/{SERVICE}/Check")
        return pb.CheckResponse.FromString(call(raw, timeout=5))


def _http_check(headers: dict[str, str], ext: dict[str, str]) -> bytes:
    req = pb.CheckRequest()
    req.attributes.request.http.method = "GET"
    req.attributes.request.http.path = "/x"
    req.attributes.request.http.headers.update(headers)
    req.attributes.context_extensions.update(ext)
    return req.SerializeToString()


def test_grpc_never_crashes_and_fails_closed(sample):
    svc = ServiceThread(sample)
    try:
        port = svc.svc.grpc_port
        r = _check(port, b"\xff\xff\xff garbage")
        assert r.denied_response.status.code == 400 and "malformed" in r.status.message
        r = _check(port, _http_check({"x-team": "blue"}, {}))
        assert r.denied_response.status.code == 403 and "no policy named" in r.status.message
        r = _check(port, _http_check({"x-team": "blue"}, {"authplane.policy": "other"}))
        assert "unknown policy 'other'" in r.status.message
        r = _check(port, _http_check({"x-team": "blue"}, {"authplane.policy": "p"}))
        assert r.status.code == 0 and r.HasField("ok_response")
        r = _check(port, _http_check({"x-api-key": "key-2"}, {"authplane.policy": "p"}))
        assert r.status.code == 0
        assert "x-api-key" in r.ok_response.headers_to_remove
        assert {h.header.key: h.header.value for h in r.ok_response.headers}["x-auth-request-user"] == "globex"
        r = _check(port, _http_check({}, {"authplane.policy": "p"}))
        assert (r.status.code, r.denied_response.status.code, r.denied_response.body) == (16, 401, "who are you")
        # HTTP side: garbage paths and missing policies are denials too
        conn = http.client.HTTPConnection("127.0.0.1", svc.svc.http_port, timeout=5)
        conn.request("GET", "/envoy/")
        assert conn.getresponse().status == 403
        conn.close()
    finally:
        svc.close()


def _req(**kw) -> Request:
    base = {"method": "GET", "path": "/x", "headers": {}}
    return Request(**{**base, **kw})


def test_cache_key_separates_identities_and_ignores_unread_headers(sample):
    pol = compile_table(load_dir(sample), "v1").policies["p"]
    k = lambda r: cache_key("v1", pol, r, "grpc")  # noqa: E731
    alice, bob = struct_pb2.Struct(), struct_pb2.Struct()
    alice.update({"sub": "alice"})
    bob.update({"sub": "bob"})
    keys = {
        k(_req(claims_raw=alice.SerializeToString())), k(_req(claims_raw=bob.SerializeToString())),
        k(_req(headers={"authorization": "Bearer a"})), k(_req(headers={"authorization": "Bearer b"})),
        k(_req(headers={"cookie": "s=1"})), k(_req(headers={"x-api-key": "key-1"})),
        k(_req(headers={"x-team": "blue"})), k(_req(method="POST")), k(_req(path="/y")), k(_req()),
    }
    assert len(keys) == 10
    assert k(_req(headers={"x-unrelated": "1"})) == k(_req())
    assert k(_req(path="/x?a=1")) == k(_req())  # no sign-in redirect: the query is not read
    assert cache_key("v2", pol, _req(), "grpc") != k(_req())


def test_ttl_cache_expires_and_is_bounded():
    c = TtlCache(max_entries=2)
    c.put(b"a", 1, 0.05)
    c.put(b"b", 2, 10)
    c.put(b"c", 3, 10)  # evicts the oldest
    assert (c.get(b"a"), c.get(b"b"), c.get(b"c")) == (None, 2, 3)
    c.put(b"d", 4, 0.01)
    time.sleep(0.02)
    assert c.get(b"d") is None
    c.put(b"e", 5, 0)  # ttl 0: not cached
    assert c.get(b"e") is None


def test_api_keys_file_formats_and_hashed_keys(tmp_path):
    assert parse_api_keys("# comment\n\nacme: k1\nglobex: 'k2'\n") == {"acme": "k1", "globex": "k2"}
    for bad, why in [("acme k1", "expected"), ("a: k\na: j", "twice"), ("a: k\nb: k", "reuses"), ("", "no keys")]:
        with pytest.raises(KeyFileError, match=why):
            parse_api_keys(bad)
    import hashlib

    hashed = hashlib.sha256(b"s3cret").hexdigest()
    d = write_policies(str(tmp_path / "p"), {"p.yaml": SAMPLE, "keys.txt": f"acme: sha256:{hashed}\n"})
    pol = compile_table(load_dir(d), "v").policies["p"]
    assert pol.keys is not None
    assert api_client(pol.keys, {"x-api-key": "s3cret"}) == "acme"
    assert api_client(pol.keys, {"x-api-key": "s3cre"}) is None
    assert "s3cret" not in repr(pol)
    assert decide(pol, _req(headers={"x-api-key": "s3cret"})).rule == "key"


@pytest.mark.parametrize(("ext", "files", "message"), [
    ("service: builtin\nrules: [{name: k, action: allow, when: {apiKeys: [acme]}}]", {},
     "apiKeys conditions need extAuth.apiKeys"),
    ("service: builtin\napiKeys: {file: keys.txt}\nrules: [{name: k, action: allow, "
     "when: {apiKeys: [initech]}}]", {"keys.txt": "acme: k\n"}, "no client 'initech' in the API key file"),
    ("service: builtin\napiKeys: {file: missing.txt}\nrules: [{name: k, action: allow}]",
     {}, "cannot read API key file 'missing.txt'"),
    ("service: builtin\napiKeys: {file: keys.txt}\nrules: [{name: k, action: allow}]",
     {"keys.txt": "acme k\n"}, "API key file 'keys.txt': line 1"),
    ("service: builtin\npathPrefix: /x\nrules: [{name: k, action: allow}]", {},
     "only used with your own HTTP service"),
    ("service: builtin\nrules: [{name: k, action: allow, when: {headers: {x-authplane-client-ip: [1.2.3.4]}}}]",
     {}, "set by Envoy for the decision service"),
    ("service: builtin\nrules: [{name: k, action: allow, when: {claims: {sub: [a]}}}]", {},
     "claims conditions need a jwt section"),
])
def test_validation_errors(tmp_path, ext, files, message):
    d = write_policies(str(tmp_path / "p"), {"p.yaml": policy(ext), **files})
    with pytest.raises(PolicyError) as e:
        load_dir(d)
    assert message in str(e.value)


def test_warning_when_native_rules_would_do(tmp_path):
    native = "service: builtin\nrules: [{name: a, action: allow, when: {methods: [GET]}}]"
    d = write_policies(str(tmp_path / "a"), {"p.yaml": policy(native)})
    warnings = load_dir(d).warnings
    assert len(warnings) == 1 and "native `authorization` rules" in str(warnings[0])
    assert str(warnings[0]).startswith(f"{d}/p.yaml:")
    d = write_policies(str(tmp_path / "b"), {"p.yaml": SAMPLE, "keys.txt": "acme: k\n"})
    assert load_dir(d).warnings == []


def test_two_worker_processes_share_ports_and_metrics(sample):
    table = compile_table(load_dir(sample), "v1")
    pool = start_workers(2, "127.0.0.1:0", "127.0.0.1:0", table)
    try:
        port = int(pool.http_addr.rsplit(":", 1)[1])
        statuses = set()
        for i in range(40):  # new connections: the kernel spreads them over both workers
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", f"/envoy/p/x{i}", headers={"x-team": "blue"})
            statuses.add(conn.getresponse().status)
            conn.close()
        assert statuses == {200}
        r = _check(int(pool.grpc_addr.rsplit(":", 1)[1]), _http_check({"x-team": "blue"}, {"authplane.policy": "p"}))
        assert r.status.code == 0
        from prometheus_client import generate_latest

        text = generate_latest(pool.registry).decode()
        assert 'authplane_authz_decisions_total{policy="p",result="allow",rule="team"} 41.0' in text
        pids = {line for line in text.splitlines() if "pid" in line}
        assert pids == set()  # aggregated over workers, not per process
    finally:
        pool.stop()
    assert all(p.returncode == 0 for p in pool.procs)


def test_workers_decide_with_a_table_as_soon_as_they_listen_and_once_update_returns(sample, tmp_path):
    """No check is answered "unknown policy" at start-up, and ``update_table`` returns only once
    every worker decides with the new table (serve pushes the matching Envoy config right after)."""
    allow = compile_table(load_dir(sample), "v1")
    other = write_policies(str(tmp_path / "other"), {"p.yaml": policy(
        "service: builtin\nrules: [{name: nobody, action: deny, deny: {status: 403, body: nobody}}]")})
    deny = compile_table(load_dir(other), "v2")
    for _ in range(3):
        pool = start_workers(1, "127.0.0.1:0", "127.0.0.1:0", allow)
        try:
            port = int(pool.http_addr.rsplit(":", 1)[1])
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/envoy/p/x", headers={"x-team": "blue"})
            first = conn.getresponse()
            first.read()
            assert first.status == 200  # the rules were in place before "ready"
            for i in range(20):
                table = deny if i % 2 == 0 else allow
                pool.update_table(table)
                conn.request("GET", "/envoy/p/x", headers={"x-team": "blue"})
                r = conn.getresponse()
                r.read()
                assert r.status == (403 if table is deny else 200), i
            conn.close()
        finally:
            pool.stop()
