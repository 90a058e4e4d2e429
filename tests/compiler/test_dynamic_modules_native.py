"""``extAuth.engine: native``: the builtin rules decided inside a real Envoy by authplane's module
(native/authplane_rules, built here with rustc) give the answers of the Python decision service
(``authz.evaluate.decide`` over the same policies) for every case of one table; malformed rule
tables are refused by the module without crashing Envoy; a fixed-seed fuzz of its configuration
parser and evaluation; validation of what the module cannot decide."""

from __future__ import annotations

import base64
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from authplane.authz.evaluate import Decision, Request, decide
from authplane.authz.rules import compile_table
from authplane.compiler.filters.dynamic_module import rule_table
from authplane.devtools.echo import EchoServer
from authplane.devtools.idp import DevIdentityProvider
from authplane.policy.loader import load_dir
from tests.support.http import request
from tests.support.native import build_all, compiled_bootstrap, search_path, start_refused
from tests.support.policies import write_policies
from tests.support.processes import start_static_envoy

IDP = DevIdentityProvider(issuer="https://idp.authplane.test")


def _allow(name: str, when: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "action": "allow", "when": when, **extra}


GROUPS: dict[str, list[dict[str, Any]]] = {
    "prefix": [_allow("r", {"headers": {"x-tenant": [{"prefix": "team-"}, "root"]}})],
    "present": [_allow("r", {"headers": {"x-trace": [{"present": True}]}})],
    "claims": [_allow("r", {"claims": {"email": ["a@example.com"], "tenant.id": [{"prefix": "t-"}, "root"]}})],
    "claimset": [_allow("r", {"claims": {"org": [{"present": True}]}})],
    "numbers": [_allow("r", {"claims": {"level": ["42"], "admin": ["true"]}})],
    "scopes": [_allow("r", {"scopes": ["write", "api:admin"]})],
    "breakglass": [_allow("r", {"methods": ["GET", "DELETE"],
                                "not": {"methods": ["DELETE"], "not": {"headers": {"x-break-glass": ["yes"]}}}})],
    "paths": [
        {"name": "private", "action": "deny", "when": {"paths": ["/paths/private/*"]},
         "deny": {"status": 401, "body": "sign in first\n", "headers": {"x-why": "private"}}},
        {"name": "teapot", "action": "deny", "when": {"paths": ["/paths/tea/"]},
         "deny": {"status": 418, "headers": {"www-authenticate": "Custom"}}},
        _allow("rest", {"paths": ["/paths/*"]})],
    "headers": [_allow("r", {"authenticated": True}, upstreamHeaders={"x-tier": "gold", "x-auth-request-user": "fixed"},
                       removeHeaders=["x-drop"], responseHeaders={"x-served-by": "native"}),
                _allow("anon", {"authenticated": False}, upstreamHeaders={"x-tier": "free"})],
    "host": [_allow("r", {"headers": {"host": ["localhost"]}})],
    "cidrs": [{"name": "lan", "action": "deny", "when": {"sourceCIDRs": ["10.0.0.0/8", "::1/128"]}},
              _allow("loopback", {"sourceCIDRs": ["127.0.0.0/8"]})],
}

# (group, method, path, headers, claims (None: no token))
CASES: list[tuple[str, str, str, dict[str, str], dict[str, Any] | None]] = [
    ("prefix", "GET", "/prefix", {"x-tenant": "team-a"}, None),
    ("prefix", "GET", "/prefix", {"x-tenant": "root"}, None),
    ("prefix", "GET", "/prefix", {"x-tenant": "xteam-a"}, None),
    ("prefix", "GET", "/prefix", {}, None),
    ("present", "GET", "/present", {"x-trace": ""}, None),
    ("present", "GET", "/present", {"x-other": "abc"}, None),
    ("claims", "GET", "/claims", {}, {"email": "a@example.com", "tenant": {"id": "t-1"}}),
    ("claims", "GET", "/claims", {}, {"email": ["x@y.org", "a@example.com"], "tenant": {"id": "root"}}),
    ("claims", "GET", "/claims", {}, {"email": "a@example.com", "tenant": {"id": "x-1"}}),
    ("claims", "GET", "/claims", {}, {"email": "a@example.com", "tenant": "t-1"}),
    ("claims", "GET", "/claims", {}, None),
    ("claims", "GET", "/claims", {"x-authplane-jwt-payload": '{"email":"a@example.com","tenant":{"id":"root"}}'}, None),
    ("claimset", "GET", "/claimset", {}, {"org": None}),
    ("claimset", "GET", "/claimset", {}, {"org": {"id": 1}}),
    ("claimset", "GET", "/claimset", {}, {"orgs": "acme"}),
    ("numbers", "GET", "/numbers", {}, {"level": 42, "admin": True}),
    ("numbers", "GET", "/numbers", {}, {"level": "42", "admin": "true"}),
    ("numbers", "GET", "/numbers", {}, {"level": 42.5, "admin": True}),
    ("numbers", "GET", "/numbers", {}, {"level": 42, "admin": False}),
    ("scopes", "GET", "/scopes", {}, {"scope": "read write api:admin"}),
    ("scopes", "GET", "/scopes", {}, {"scp": ["write", "api:admin"]}),
    ("scopes", "GET", "/scopes", {}, {"scope": "write", "scp": ["api:admin"]}),
    ("scopes", "GET", "/scopes", {}, {"scope": "writer api:admin"}),
    ("scopes", "GET", "/scopes", {}, {"scp": ["write api:admin"]}),
    ("breakglass", "GET", "/breakglass", {}, None),
    ("breakglass", "DELETE", "/breakglass", {}, None),
    ("breakglass", "DELETE", "/breakglass", {"x-break-glass": "yes"}, None),
    ("breakglass", "POST", "/breakglass", {"x-break-glass": "yes"}, None),
    ("paths", "GET", "/paths/private", {}, None),
    ("paths", "GET", "/paths/private/x?y=1", {}, None),
    ("paths", "GET", "/paths/tea", {}, None),
    ("paths", "GET", "/paths/teacup", {}, None),
    ("paths", "GET", "/paths/open?q=/paths/private/", {}, None),
    ("headers", "GET", "/headers", {"x-drop": "1", "x-auth-request-user": "mallory", "x-tier": "forged"},
     {"groups": ["dev", 3, "ops"], "email": "a@example.com"}),
    ("headers", "GET", "/headers", {"x-auth-request-email": "mallory@evil", "x-auth-request-groups": "admins"}, None),
    ("host", "GET", "/host", {}, None),
    ("cidrs", "GET", "/cidrs", {}, None),
    ("cidrs", "GET", "/cidrs", {"x-authplane-client-ip": "10.1.2.3", "x-forwarded-for": "10.1.2.3"}, None),
]


def _ids() -> list[str]:
    return [f"{g}-{m}-{p}-{json.dumps(h)}-{json.dumps(c)}" for g, m, p, h, c in CASES]


def _policies(root: Path, echo_port: int, engine: str = "native") -> str:
    routes = [{"name": g, "match": {"pathPrefix": f"/{g}"}, "backend": "echo"} for g in GROUPS]
    docs = [{"kind": "AuthPolicy", "metadata": {"name": g}, "spec": {
        "targetRef": {"kind": "Route", "name": "app", "rule": g},
        "extAuth": {"service": "builtin", "engine": engine, "rules": rules}}} for g, rules in GROUPS.items()]
    return write_policies(str(root), {
        "jwks.json": json.dumps(IDP.jwks()),
        "gateway.yaml": f"""
            kind: Gateway
            metadata: {{name: edge}}
            spec: {{fleet: edge, listeners: [{{name: http, port: 8080}}]}}
            ---
            kind: Backend
            metadata: {{name: echo}}
            spec: {{endpoints: ["127.0.0.1:{echo_port}"]}}
            ---
            kind: AuthPolicy
            metadata: {{name: edge-jwt}}
            spec:
              targetRef: {{kind: Gateway, name: edge}}
              jwt:
                required: false
                providers: [{{name: dev, issuer: {IDP.issuer}, jwks: {{file: jwks.json}}}}]
            """,
        "routes.yaml": yaml.safe_dump({"kind": "Route", "metadata": {"name": "app"},
                                       "spec": {"gateway": "edge", "rules": routes}}, sort_keys=False),
        "policies.yaml": "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs),
    })


@pytest.fixture(scope="module")
def modules(tmp_path_factory) -> Path:
    return build_all(tmp_path_factory.mktemp("modules"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, modules):
    tmp = tmp_path_factory.mktemp("native")
    echo = EchoServer().start()
    d = _policies(tmp / "policies", echo.port)
    with search_path(modules):
        table = compile_table(load_dir(d), "test")
        proc = start_static_envoy(d, "edge", str(tmp))
    yield proc.listener_port("edge/http"), table, proc
    proc.stop()
    echo.stop()


def _payload(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


RESERVED = ("x-authplane-client-ip", "x-authplane-jwt-payload")


def _expected(table: Any, group: str, method: str, path: str, headers: dict[str, str],
              claims: dict[str, Any] | None, token: str | None) -> Decision:
    """What the Python decision service answers: Envoy gives it the client address and the
    verified payload itself (a client's copies never count)."""
    sent = {"host": "localhost", **{k: v for k, v in headers.items() if k not in RESERVED}}
    return decide(table.policies[group], Request(method=method, path=path, headers=sent, source="127.0.0.1",
                                                 host="localhost", claims=_payload(token) if token else None))


@pytest.mark.parametrize(("group", "method", "path", "headers", "claims"), CASES, ids=_ids())
def test_native_module_and_decision_service_agree(setup, group, method, path, headers, claims):
    port, table, _ = setup
    token = IDP.mint(**claims) if claims is not None else None
    sent = {**headers, **({"authorization": f"Bearer {token}"} if token else {})}
    want = _expected(table, group, method, path, headers, claims, token)
    r = request(port, path, method=method, headers=sent)
    if not want.allow:
        assert (r.status, r.body) == (want.status, want.body), want.reason
        for k, v in want.headers:
            assert r.headers.get(k) == v, k
        return
    assert r.status == 200, (r.body, want.reason)
    upstream = json.loads(r.body)["headers"]
    for k, v in want.upstream:
        assert upstream.get(k) == v, k
    for k in (*want.remove, *RESERVED):
        assert k not in upstream or any(k == u for u, _ in want.upstream), k
    for k, v in want.headers:
        assert r.headers.get(k) == v, k


def _bootstrap_with(bootstrap: str, table: str) -> str:
    """The bootstrap with every native rule table replaced by ``table``."""
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("@type", "").endswith("DynamicModuleFilterPerRoute"):
                node["filter_config"]["value"] = table
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    boot = yaml.safe_load(bootstrap)
    walk(boot)
    return yaml.safe_dump(boot)


@pytest.mark.parametrize("table", ["not json {", '{"version":"2","rules":[]}',
                                   '{"version":"1","rules":[{"name":7}],"noMatch":{"status":403}}',
                                   '{"version":"1","rules":[],"noMatch":{"status":99}}', "\x00\xff" * 64,
                                   "[" * 10_000])
def test_envoy_refuses_a_malformed_rule_table_without_crashing(tmp_path, modules, table):
    d = _policies(tmp_path / "policies", 1)
    with search_path(modules):
        r = start_refused(_bootstrap_with(compiled_bootstrap(d, "edge"), table), tmp_path)
    assert r.returncode == 1, r.stderr  # refused: an exit code, not a signal
    assert "authplane_rules: refused route configuration" in r.stderr


FUZZ = r"""
import ctypes, json, random, sys
lib = ctypes.CDLL(sys.argv[1])
seeds = json.loads(sys.stdin.read())
rng = random.Random(20261201)
out = ctypes.create_string_buffer(1 << 20)
codes = {}
def mutate(b):
    b = bytearray(b)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(4)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b: b[min(i, len(b) - 1)] = rng.randrange(256)
        elif op == 1: b[i:i] = bytes(rng.choice(b'{}[]",:0123456789tfn\\u') for _ in range(rng.randint(1, 4)))
        elif op == 2: del b[i:i + rng.randint(1, 16)]
        else: b[i:i] = b[rng.randrange(len(b) + 1):][:rng.randint(1, 64)]
    return bytes(b)
requests = [json.dumps(r).encode() for r in seeds["requests"]]
for n in range(int(sys.argv[2])):
    cfg = rng.choice(seeds["tables"]).encode()
    req = rng.choice(requests)
    if n % 2: cfg = mutate(cfg)
    if n % 3: req = mutate(req)
    rc = lib.authplane_rules_eval(cfg, len(cfg), req, len(req), out, len(out))
    code = rc if rc < 0 else 0
    codes[code] = codes.get(code, 0) + 1
print(json.dumps(codes))
"""


def test_fixed_seed_fuzz_of_the_rule_table_parser_and_evaluation(modules):
    d = load_dir(_policies(Path(modules, "fuzz-policies"), 1, engine="service"))
    tables = [rule_table(n, p.resource.spec.ext_auth) for n, p in d.auth_policies.items() if p.resource.spec.ext_auth]
    payload = json.dumps({"sub": "alice", "groups": ["a"], "scope": "write api:admin", "tenant": {"id": "t-1"}})
    headers = {"x-tenant": "team-a", "x-trace": "1"}
    requests = [{"method": m, "path": p, "source": s, "headers": headers, "payload": payload}
                for m, p, s in [("GET", "/paths/private/x", "127.0.0.1"), ("DELETE", "/breakglass", "10.0.0.1")]]
    r = subprocess.run([sys.executable, "-c", FUZZ, str(modules / "libauthplane_rules.so"), "20000"],
                       input=json.dumps({"tables": tables, "requests": requests}), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr  # a crash would be a signal
    codes = {int(k): v for k, v in json.loads(r.stdout).items()}
    assert set(codes) <= {0, -1, -2}, codes  # decided, refused config, malformed request; never a panic (-4)
    assert codes.get(0, 0) > 1000 and codes.get(-1, 0) > 1000


def test_module_and_decision_service_agree_on_random_requests(setup, modules):
    """The module's evaluation without Envoy (``authplane_rules_eval``) on 3,000 random requests."""
    import ctypes

    _, table, _ = setup
    lib = ctypes.CDLL(str(modules / "libauthplane_rules.so"))
    d = load_dir(_policies(Path(modules, "random-policies"), 1, engine="service"))
    rng = random.Random(7)
    out = ctypes.create_string_buffer(1 << 16)
    values = ["team-a", "root", "", "yes", "no", "a@example.com"]
    for n in range(3000):
        group = rng.choice(list(GROUPS))
        claims = rng.choice([None, {"email": rng.choice(values), "tenant": {"id": rng.choice(["t-1", "root", 3])},
                                    "scope": rng.choice(["write api:admin", "write"]),
                                    "level": rng.choice([42, "42", 4.2, 1e17, -0.0001]),
                                    "admin": rng.choice([True, False, "true"]), "org": rng.choice([None, "x"]),
                                    "groups": rng.choice([["a", 1], "g"]), "sub": rng.choice(["al", 5])}])
        headers = {h: rng.choice(values) for h in rng.sample(["x-tenant", "x-trace", "x-break-glass", "x-drop"], 2)}
        req = {"method": rng.choice(["GET", "DELETE", "POST"]), "headers": headers,
               "path": rng.choice(["/paths/private", "/paths/private/x", "/paths/tea/", "/paths/x", "/prefix"]),
               "source": rng.choice(["127.0.0.1", "10.2.3.4", "::1", "bogus"]),
               "payload": json.dumps(claims) if claims else ""}
        pol = d.auth_policies[group]
        cfg = rule_table(group, pol.resource.spec.ext_auth).encode()
        raw = json.dumps(req).encode()
        size = lib.authplane_rules_eval(cfg, len(cfg), raw, len(raw), out, len(out))
        got = json.loads(out.raw[:size])
        want = decide(table.policies[group], Request(method=req["method"], path=req["path"], headers=headers,
                                                     source=req["source"], claims=claims))
        assert got["allow"] == want.allow, (n, req, want.reason)
        if want.allow:
            assert (sorted(map(tuple, got["upstream"])), got["remove"]) == (sorted(want.upstream), list(want.remove))
        else:
            assert (got["status"], got["body"], sorted(map(tuple, got["headers"]))) == (
                want.status, want.body, sorted(want.headers)), (n, req)


def _validate(d: str, env: dict[str, str]) -> list[str]:
    import os

    r = subprocess.run([sys.executable, "-m", "authplane.cli", "validate", d], capture_output=True, text=True,
                       timeout=120, env={**os.environ, **env})
    assert r.returncode == 1, r.stdout
    return r.stderr.strip().splitlines()


def test_validate_names_what_the_module_cannot_decide(tmp_path, modules):
    d = write_policies(str(tmp_path), {"p.yaml": """
        kind: AuthPolicy
        metadata: {name: p}
        spec:
          targetRef: {kind: Gateway, name: edge}
          extAuth:
            service: builtin
            engine: native
            rules:
              - name: r
                action: allow
                when: {headers: {x-tenant: [{regex: "ops-[0-9]+"}]}}
              - name: s
                action: deny
                deny: {signIn: "https://login.example.com/"}
        """})
    lines = _validate(d, {"ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(modules)})
    path = Path(d, "p.yaml")
    assert (f"{path}:12:15: spec.extAuth.rules[0].when: engine: native cannot decide regex values (the module "
            "has no RE2); use engine: service") in lines
    assert (f"{path}:15:24: spec.extAuth.rules[1].deny.signIn: engine: native cannot decide sign-in redirects; "
            "use engine: service") in lines


def test_without_the_module_native_is_refused_and_the_service_still_works(tmp_path):
    d = write_policies(str(tmp_path), {"p.yaml": """
        kind: AuthPolicy
        metadata: {name: p}
        spec:
          targetRef: {kind: Gateway, name: edge}
          extAuth: {service: builtin, engine: native, rules: [{name: r, action: allow}]}
        """})
    empty = tmp_path / "none"
    empty.mkdir()
    lines = _validate(d, {"AUTHPLANE_NATIVE_DIR": str(empty), "ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(empty)})
    assert any(line.startswith(f"{Path(d, 'p.yaml')}:6:39: spec.extAuth.engine: the native rules module is "
                               "unavailable (module 'authplane_rules' not found") for line in lines), lines


def _flip(d: str, method: str) -> None:
    write_policies(d, {"flip.yaml": f"""
        kind: AuthPolicy
        metadata: {{name: flip}}
        spec:
          targetRef: {{kind: Route, name: app, rule: flip}}
          extAuth:
            service: builtin
            engine: native
            rules: [{{name: only, action: allow, when: {{methods: [{method}]}}, upstreamHeaders: {{x-rule: {method}}}}}]
        """})


def test_a_rule_edit_reaches_envoy_as_a_live_reload(tmp_path, modules):
    """``serve`` over ADS: the rule table is route configuration, so an edit is an ordinary reload
    and reaches a kept-alive connection."""
    import http.client

    from tests.support.policies import backend, documents, gateway
    from tests.support.ports import free_port, wait_for
    from tests.support.processes import ServeProcess, start_envoys

    echo = EchoServer().start()
    port = free_port()
    d = write_policies(str(tmp_path / "policies"), {
        "base.yaml": documents(gateway("edge", port), backend("echo", echo.port), """
            kind: Route
            metadata: {name: app}
            spec: {gateway: edge, rules: [{name: flip, match: {pathPrefix: /flip}, backend: echo}]}
            """),
    })
    _flip(d, "POST")
    with search_path(modules):
        serve = ServeProcess(d, str(tmp_path)).wait_started()
        envoys: list[Any] = []
        try:
            envoys = start_envoys(str(tmp_path), serve.xds, [("edge-1", "edge", True)])
            serve.wait_in_sync("edge-1")
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            assert request(port, "/flip", conn=conn).status == 403
            _flip(d, "GET")
            wait_for(lambda: request(port, "/flip", conn=conn).status == 200, "the edited rule on the same connection")
            assert json.loads(request(port, "/flip", conn=conn).body)["headers"]["x-rule"] == "GET"
            conn.close()
        finally:
            for e in envoys:
                e.stop()
            serve.stop()
            echo.stop()


def test_report_says_where_each_policy_is_decided(tmp_path, modules):
    d = _policies(tmp_path / "policies", 1)
    with search_path(modules):
        r = subprocess.run([sys.executable, "-m", "authplane.cli", "validate", d, "--report"],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "extAuth builtin (1 rules; decided in Envoy by the native module)" in r.stdout


def test_a_module_for_another_abi_is_refused_at_load_with_a_message(tmp_path, modules):
    """Built to need a callback this Envoy lacks (as for a later ABI): Envoy refuses the module
    cleanly (exit code 1), with the module's own explanation; no crash."""
    from tests.support.native import build_module

    probe = tmp_path / "probe"
    build_module().build_rules(probe, cfg=("authplane_abi_probe",))
    d = _policies(tmp_path / "policies", 1)
    with search_path(modules):
        bootstrap = compiled_bootstrap(d, "edge")
    with search_path(probe):
        r = start_refused(bootstrap, tmp_path)
    assert r.returncode == 1, r.stderr
    assert ("authplane_rules: refused: this Envoy has no envoy_dynamic_module_callback_from_a_later_abi; "
            "the module is built for the dynamic modules ABI v0.2.0 (Envoy 1.40)") in r.stderr
    assert "envoy_dynamic_module_on_program_init returned null" in r.stderr


def test_memory_does_not_grow_with_requests(setup):
    """Envoy's allocated heap after 3,000 more decided requests (with claims; denials, and allows
    that set headers) stays within a bound: the module keeps nothing per request beyond the stream."""
    import http.client

    port, _, proc = setup
    token = IDP.mint(email="a@example.com", tenant={"id": "t-1"}, groups=["a", "b"])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def burst(n: int) -> None:
        for i in range(n):  # mostly denials (answered by the module itself), one allow in 20
            path = "/headers" if i % 20 == 0 else ("/paths/private/x", "/numbers", "/prefix")[i % 3]
            assert request(port, path, headers={"authorization": f"Bearer {token}", "x-tenant": f"team{i}"},
                           conn=conn).status in (200, 401, 403)

    def allocated() -> int:
        _, body = proc.admin_get("/memory")
        return int(json.loads(body)["allocated"])

    burst(1000)  # warm: connection, caches, stats
    before = allocated()
    burst(3000)
    assert allocated() - before < 1 << 20
    conn.close()


def test_the_defaults_compile_to_the_same_bytes(tmp_path):
    """``engine: service`` and ``filters: []`` written out change nothing: same fleet version
    (existing configurations and golden outputs are untouched by this feature)."""
    from authplane.compiler.snapshot import compile_policies

    plain = load_dir(_policies(tmp_path / "plain", 1, engine="service"))
    d = _policies(tmp_path / "spelled", 1, engine="service")
    text = Path(d, "policies.yaml").read_text()
    Path(d, "policies.yaml").write_text(text.replace("  extAuth:\n", "  filters: []\n  extAuth:\n"))
    spelled = load_dir(d)
    assert Path(d, "policies.yaml").read_text().count("filters: []") == len(GROUPS)
    plain_text = Path(tmp_path / "plain" / "policies.yaml").read_text()
    Path(tmp_path / "plain" / "policies.yaml").write_text(plain_text.replace("    engine: service\n", ""))
    assert compile_policies(load_dir(str(tmp_path / "plain")))["edge"].version == \
        compile_policies(spelled)["edge"].version == compile_policies(plain)["edge"].version


def _auto_policies(root: Path, echo_port: int) -> str:
    """``engine: auto`` on three rules of one route: plain rules (native), an API key and a header
    regex (both decided by the decision service)."""
    from tests.support.policies import backend, documents, gateway

    return write_policies(str(root), {
        "keys.txt": "acme: k-acme\n",
        "base.yaml": documents(gateway("edge", 8080), backend("echo", echo_port), """
            kind: Route
            metadata: {name: app}
            spec:
              gateway: edge
              rules:
                - {name: plain, match: {pathPrefix: /plain}, backend: echo}
                - {name: keyed, match: {pathPrefix: /keyed}, backend: echo}
                - {name: regex, match: {pathPrefix: /regex}, backend: echo}
            """),
        "auto.yaml": """
            kind: AuthPolicy
            metadata: {name: plain}
            spec:
              targetRef: {kind: Route, name: app, rule: plain}
              extAuth:
                service: builtin
                engine: auto
                rules: [{name: get, action: allow, when: {methods: [GET]}, upstreamHeaders: {x-decided: module}}]
            ---
            kind: AuthPolicy
            metadata: {name: keyed}
            spec:
              targetRef: {kind: Route, name: app, rule: keyed}
              extAuth:
                service: builtin
                engine: auto
                apiKeys: {file: keys.txt}
                rules: [{name: partners, action: allow, when: {apiKeys: [acme]}}]
            ---
            kind: AuthPolicy
            metadata: {name: regex}
            spec:
              targetRef: {kind: Route, name: app, rule: regex}
              extAuth:
                service: builtin
                engine: auto
                rules:
                  - {name: ops, action: allow, when: {headers: {x-team: [{regex: "ops-[0-9]+"}]}},
                     upstreamHeaders: {x-ops: "1"}}
            """,
    })


def test_auto_decides_expressible_rules_in_the_module_and_the_rest_in_the_service(tmp_path, modules):
    """One real Envoy whose decision service address is a closed port: the plain rules are decided
    by the module (200 with its upstream header, and a 403 on POST from the module itself), the
    API key and regex policies go to the decision service (unreachable: ``statusOnError`` 503)."""
    from authplane.compiler.ir import CompileOptions
    from tests.support.ports import free_port

    echo = EchoServer().start()
    closed = f"127.0.0.1:{free_port()}"
    d = _auto_policies(tmp_path / "policies", echo.port)
    with search_path(modules):
        proc = start_static_envoy(d, "edge", str(tmp_path), CompileOptions(authz_grpc=closed, authz_http=closed))
    try:
        port = proc.listener_port("edge/http")
        r = request(port, "/plain")
        assert r.status == 200, r.body
        assert json.loads(r.body)["headers"]["x-decided"] == "module"
        r = request(port, "/plain", method="POST")
        assert (r.status, r.body) == (403, "authplane: no rule of policy 'plain' matched\n")
        assert request(port, "/keyed", headers={"x-api-key": "k-acme"}).status == 503
        assert request(port, "/regex", headers={"x-team": "ops-1"}).status == 503
    finally:
        proc.stop()
        echo.stop()


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "authplane.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


def test_validate_and_report_say_which_engine_auto_chose_and_why(tmp_path, modules):
    d = _auto_policies(tmp_path / "policies", 1)
    r = _cli(["validate", d, "--report", "--strict"], {"ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(modules)})
    assert r.returncode == 0, r.stderr  # notes, not warnings: --strict passes
    path = Path(d, "auto.yaml")
    lines = r.stderr.splitlines()
    assert f"info: {path}:8:13: spec.extAuth.engine: engine: auto: decided in Envoy by the native module" in lines
    assert (f"info: {path}:19:13: spec.extAuth.engine: engine: auto: decided by the decision service: the module "
            "cannot decide API keys (hashed keys are checked by the decision service) (spec.extAuth.apiKeys); "
            "apiKeys conditions (keys are checked by the decision service) (spec.extAuth.rules[0].when.apiKeys)"
            ) in lines, lines
    assert (f"info: {path}:31:13: spec.extAuth.engine: engine: auto: decided by the decision service: the module "
            "cannot decide regex values (the module has no RE2) (spec.extAuth.rules[0].when)") in lines, lines
    assert "extAuth builtin (1 rules; decided in Envoy by the native module)" in r.stdout
    assert ("extAuth builtin (1 rules; engine auto: decided by the decision service: the module cannot decide "
            "regex values (the module has no RE2) (spec.extAuth.rules[0].when))") in r.stdout


def test_auto_without_the_module_uses_the_decision_service_and_says_so(tmp_path):
    """No module anywhere: ``auto`` is no error (``native`` would be); the plain rules compile to
    ext_authz, as ``engine: service`` does."""
    from authplane.compiler.filters.ext_authz import rules_digest
    from authplane.compiler.render import dump, snapshot_dict
    from authplane.compiler.snapshot import compile_policies

    empty = tmp_path / "none"
    empty.mkdir()
    env = {"AUTHPLANE_NATIVE_DIR": str(empty), "ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(empty)}
    d = _auto_policies(tmp_path / "policies", 1)
    r = _cli(["validate", d, "--report"], env)
    assert r.returncode == 0, r.stderr
    assert (f"info: {Path(d, 'auto.yaml')}:8:13: spec.extAuth.engine: engine: auto: decided by the decision "
            "service: the native rules module is unavailable (module 'authplane_rules' not found") in r.stderr
    assert "decided in Envoy" not in r.stdout
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        auto_set = load_dir(d)
        Path(d, "auto.yaml").write_text(Path(d, "auto.yaml").read_text().replace("engine: auto", "engine: service"))
        service_set = load_dir(d)
    auto, service = (dump({k: v for k, v in snapshot_dict(compile_policies(p)["edge"]).items() if k != "version"})
                     for p in (auto_set, service_set))
    for name in ("plain", "keyed", "regex"):  # the rules digest Envoy sends along covers the engine field
        auto = auto.replace(*(rules_digest(p.auth_policies[name].resource.spec, p.resolved[name].ext_keys)
                              for p in (auto_set, service_set)))
    assert auto == service
    assert "dynamic_modules" not in auto


def test_auto_on_your_own_service_is_refused(tmp_path):
    from authplane.errors import PolicyError

    d = write_policies(str(tmp_path), {"p.yaml": """
        kind: Backend
        metadata: {name: mine}
        spec: {endpoints: ["127.0.0.1:9"], protocol: http2}
        ---
        kind: AuthPolicy
        metadata: {name: p}
        spec:
          targetRef: {kind: Gateway, name: edge}
          extAuth: {service: mine, engine: auto}
        """})
    with pytest.raises(PolicyError) as e:
        load_dir(d)
    assert f"{Path(d, 'p.yaml')}:12:36: spec.extAuth.engine: engine: auto runs builtin rules (service: builtin)" \
        in str(e.value).splitlines(), str(e.value)
