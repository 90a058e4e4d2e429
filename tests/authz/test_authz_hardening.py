"""The decision service under hostile input: forged identity headers (cached or not), oversized
and unparsable requests, a hanging JWKS host."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.authz.test_authz_envoy import PROTOCOLS, stack  # noqa: F401  (the Envoy stack fixture)
from tests.authz.test_authz_forward import POLICY
from tests.support.http import request
from tests.support.policies import DEV_JWT, app_gateway, app_policy, write_policies
from tests.support.ports import wait_for
from tests.support.processes import ServiceThread

FORGED = {"x-auth-request-user": "mallory", "x-auth-request-email": "evil@x",
          "x-auth-request-groups": "root", "x-role": "admin", "x-api-client": "forged"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_forged_identity_headers_are_stripped_on_cache_hits_too(stack, idp, jwks_file, protocol):  # noqa: F811
    port, _ = stack(app_policy(jwt=DEV_JWT, ext=f"""
        service: builtin
        protocol: {protocol}
        cache: {{allowTtl: 60s}}
        rules: [{{name: users, action: allow, when: {{authenticated: true}}}}]
        """))
    token = {"authorization": f"Bearer {idp.mint(sub='alice')}"}  # no email, no groups
    r = request(port, "/x", headers=token)  # a clean request fills the cache
    assert r.status == 200
    for _ in range(2):  # both answered from the cache
        r = request(port, "/x", headers={**token, **FORGED})
        assert r.status == 200
        seen = r.json()["headers"]
        assert seen["x-auth-request-user"] == "alice"
        assert "x-auth-request-email" not in seen
        assert "x-auth-request-groups" not in seen


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_headers_any_rule_sets_are_stripped_whichever_rule_allows(stack, idp, jwks_file, protocol):  # noqa: F811
    port, _ = stack(app_policy(jwt=DEV_JWT, ext=f"""
        service: builtin
        protocol: {protocol}
        cache: {{allowTtl: 60s}}
        apiKeys: {{file: keys.txt, clientHeader: x-api-client}}
        rules:
          - {{name: admins, action: allow, when: {{claims: {{groups: [admins]}}}}, upstreamHeaders: {{x-role: admin}}}}
          - {{name: keyed, action: allow, when: {{apiKeys: [acme]}}}}
        """), files={"keys.txt": "acme: k-acme-123\n"})
    for _ in range(2):  # a miss, then a hit
        r = request(port, "/x", headers={"x-api-key": "k-acme-123", **FORGED})
        assert r.status == 200
        seen = r.json()["headers"]
        assert "x-role" not in seen
        assert (seen["x-api-client"], seen["x-auth-request-user"]) == ("acme", "acme")
        assert "x-auth-request-email" not in seen and "x-auth-request-groups" not in seen
        assert "x-api-key" not in seen
    admin = {"authorization": f"Bearer {idp.mint(groups=['admins'])}"}
    for _ in range(2):
        r = request(port, "/x", headers={**admin, **FORGED})
        seen = r.json()["headers"]
        assert (r.status, seen["x-role"], seen["x-auth-request-groups"]) == (200, "admin", "admins")
        assert "x-api-client" not in seen


def test_big_cookies_through_envoy_reach_the_decision_service(stack, idp, jwks_file):  # noqa: F811
    port, _ = stack(app_policy(jwt=DEV_JWT, ext="""
        service: builtin
        rules: [{name: alice, action: allow, when: {claims: {sub: [alice]}}}]
        """))
    for size in (9 * 1024, 50 * 1024):
        r = request(port, "/x", headers={"cookie": f"pad={'p' * size}; session={idp.mint(sub='alice')}"})
        assert (r.status, r.json()["headers"]["x-auth-request-user"]) == (200, "alice")
        r = request(port, "/x", headers={"cookie": f"pad={'p' * size}; session={idp.mint(sub='bob')}"})
        assert r.status == 403


@pytest.fixture
def forward(tmp_path, idp, jwks_file):
    svc = ServiceThread(write_policies(str(tmp_path / "policies"), {"p.yaml": POLICY}))
    yield svc
    svc.close()


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` as is and read the answer until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


MARK = "zq-reflected-zq"
GARBAGE = {
    "tls-bytes": f"\x16\x03\x01{MARK}\r\n\r\n",
    "not-http": f"{MARK}\r\n\r\n",
    "header-without-colon": f"GET /authz/sso HTTP/1.1\r\nhost: x\r\n{MARK}\r\n\r\n",
    "bad-content-length": f"GET /authz/sso HTTP/1.1\r\nhost: x\r\ncontent-length: {MARK}\r\n\r\n",
    "nul-in-path": f"GET /{MARK}\x00 HTTP/1.1\r\nhost: x\r\n\r\n",
    "non-utf8-credential-and-uri": f"GET /authz/sso HTTP/1.1\r\nhost: x\r\ncookie: session={MARK}\xff\r\n"
                                   f"x-forwarded-uri: /a\xff\r\nconnection: close\r\n\r\n",
    "policy-name": f"GET /authz/{MARK}%ff HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    "original-url": f"GET /authz/sso HTTP/1.1\r\nhost: x\r\nx-original-url: http://[::1{MARK}/admin\r\n"
                    f"connection: close\r\n\r\n",
}


def assert_logged_cleanly(caplog: pytest.LogCaptureFixture) -> None:
    """At most a line per bad request: no traceback, nothing of the request."""
    logged = [rec for rec in caplog.records if rec.name.startswith(("aiohttp", "authplane"))]
    assert not [rec for rec in logged if rec.exc_info or MARK in rec.getMessage()]


@pytest.mark.parametrize("case", list(GARBAGE))
def test_unparsable_requests_get_a_clean_4xx_without_echo_or_traceback(forward, caplog, case):
    caplog.set_level(logging.DEBUG)
    answer = raw_exchange(forward.svc.http_port, GARBAGE[case].encode("latin-1"))
    assert answer.startswith(b"HTTP/1.") and answer[9:10] == b"4", answer[:80]
    assert MARK.encode() not in answer
    assert request(forward.svc.http_port, "/healthz").status == 200
    assert_logged_cleanly(caplog)


def test_oversized_header_is_431_and_not_echoed(forward, caplog):
    caplog.set_level(logging.DEBUG)
    r = request(forward.svc.http_port, "/authz/sso", headers={"x-big": MARK * 20_000})  # 300 KB
    assert r.status == 431 and MARK not in r.body
    assert_logged_cleanly(caplog)


def test_undecodable_url_in_a_sign_in_redirect(forward, caplog):
    browser = (b"GET /authz/sso HTTP/1.1\r\nhost: x\r\naccept: text/html\r\nx-forwarded-uri: /a\xff\r\n"
               b"connection: close\r\n\r\n")
    assert raw_exchange(forward.svc.http_port, browser).startswith(b"HTTP/1.1 302 ")
    assert_logged_cleanly(caplog)


TOKEN_SOURCES = """
    required: false
    providers:
      - name: dev
        issuer: https://idp.authplane.test
        audiences: [api]
        jwks: {file: jwks.json}
        from: [{header: x-token, prefix: "Token "}, {query: access_token}]
"""


def test_a_cached_forward_auth_decision_never_answers_another_token(tmp_path, idp, jwks_file):
    d = write_policies(str(tmp_path / "policies"), {"p.yaml": app_gateway(9) + "---\n" + app_policy(
        jwt=TOKEN_SOURCES, name="sso", ext="service: builtin\ncache: {allowTtl: 60s, denyTtl: 60s}\n"
                                            "rules: [{name: users, action: allow, when: {authenticated: true}}]")})
    svc = ServiceThread(d)
    try:
        def check(uri: str, **headers: str):
            return request(svc.svc.http_port, "/authz/sso", headers={
                "x-forwarded-method": "GET", "x-forwarded-host": "app.example.com", "x-forwarded-uri": uri,
                **headers})

        for _ in range(2):  # the second round is answered from the cache
            for sub in ("alice", "bob"):
                r = check("/x", **{"x-token": f"Token {idp.mint(sub=sub)}"})
                assert (r.status, r.headers.get("x-auth-request-user")) == (200, sub)
                r = check(f"/x?access_token={idp.mint(sub=sub)}")
                assert (r.status, r.headers.get("x-auth-request-user")) == (200, sub)
            assert check("/x", **{"x-token": f"Bearer {idp.mint()}"}).status == 403  # no token found
    finally:
        svc.close()


class JwksServer:
    """A JWKS host on loopback that counts fetches and, once ``hang`` is set, never answers
    (until closed)."""

    def __init__(self, jwks: dict) -> None:
        self.fetches = 0
        self._lock = threading.Lock()
        self.hang = threading.Event()
        self._release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with outer._lock:
                    outer.fetches += 1
                if outer.hang.is_set():
                    outer._release.wait(60)
                    return
                body = json.dumps(jwks).encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"

    def close(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def jwks_host(idp):
    host = JwksServer(idp.jwks())
    yield host
    host.close()


def remote_jwks_service(tmp_path, uri: str, cache: str, timeout: str) -> ServiceThread:
    jwt = DEV_JWT.replace("jwks: {file: jwks.json}",
                          f"jwks: {{uri: '{uri}', cacheDuration: {cache}, timeout: {timeout}}}")
    ext = "service: builtin\nrules: [{name: users, action: allow, when: {authenticated: true}}]"
    return ServiceThread(write_policies(str(tmp_path / "policies"), {
        "p.yaml": app_gateway(9) + "---\n" + app_policy(jwt=jwt, name="sso", ext=ext)}))


def forward_check(svc: ServiceThread, token: str, timeout: float = 10):
    conn = http.client.HTTPConnection("127.0.0.1", svc.svc.http_port, timeout=timeout)
    try:
        return request(svc.svc.http_port, "/authz/sso", conn=conn, headers={
            "x-forwarded-method": "GET", "x-forwarded-host": "app.example.com", "x-forwarded-uri": "/x",
            "authorization": f"Bearer {token}"})
    finally:
        conn.close()


def concurrently(n: int, call) -> list:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(call, range(n)))


def test_hanging_jwks_host_cached_keys_keep_serving_one_refresh_at_a_time(tmp_path, idp, jwks_host):
    # The JWKS timeout (30s) is longer than any check may take (the client gives up at 10s):
    # a check that waited for the hanging refresh would fail.
    svc = remote_jwks_service(tmp_path, jwks_host.uri, cache="1s", timeout="30s")
    try:
        assert forward_check(svc, idp.mint(sub="first")).status == 200
        assert jwks_host.fetches == 1
        jwks_host.hang.set()
        subs = iter(range(10_000))

        def refresh_started() -> bool:  # each check a new token, so no decision cache hit
            assert forward_check(svc, idp.mint(sub=f"u{next(subs)}")).status == 200
            return jwks_host.fetches == 2

        wait_for(refresh_started, "a background JWKS refresh after cacheDuration", every=0.2)
        statuses = concurrently(8, lambda i: forward_check(svc, idp.mint(sub=f"c{i}")).status)
        assert statuses == [200] * 8
        assert jwks_host.fetches == 2  # the hanging refresh is the only one in flight
    finally:
        svc.close()


def test_hanging_jwks_host_first_fetch_is_shared_and_bounded(tmp_path, idp, jwks_host):
    jwks_host.hang.set()
    svc = remote_jwks_service(tmp_path, jwks_host.uri, cache="5m", timeout="8s")
    try:
        statuses = concurrently(6, lambda i: forward_check(svc, idp.mint(sub=f"c{i}"), timeout=60).status)
        assert statuses == [401] * 6  # fail closed, each within the JWKS timeout
        assert jwks_host.fetches == 1
    finally:
        svc.close()
