"""``when.cel`` through a real Envoy (the compiled RBAC ``condition``), and CEL errors reported by
``authplane validate`` at the expression's file:line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from authplane.devtools.echo import EchoServer
from authplane.errors import PolicyError
from authplane.policy.loader import load_dir
from tests.support import ROOT
from tests.support.http import request
from tests.support.policies import write_policies
from tests.support.processes import start_static_envoy

_GATEWAY = """
    kind: Gateway
    metadata: {{name: edge}}
    spec: {{fleet: edge, listeners: [{{name: http, port: 8080}}]}}
    ---
    kind: Backend
    metadata: {{name: echo}}
    spec: {{endpoints: ["127.0.0.1:{port}"]}}
    """


@pytest.fixture(scope="module")
def cel_stack(tmp_path_factory, idp):
    tmp = tmp_path_factory.mktemp("cel")
    echo = EchoServer().start()
    (tmp / "policies").mkdir()
    (tmp / "policies" / "jwks.json").write_text(json.dumps(idp.jwks()))
    d = write_policies(str(tmp / "policies"), {
        "gateway.yaml": _GATEWAY.format(port=echo.port),
        "routes.yaml": """
            kind: Route
            metadata: {name: app}
            spec:
              gateway: edge
              rules:
                - {name: header, match: {pathPrefix: /header}, backend: echo}
                - {name: claim, match: {pathPrefix: /claim}, backend: echo}
                - {name: request, match: {pathPrefix: /req}, backend: echo}
            ---
            kind: AuthPolicy
            metadata: {name: header}
            spec:
              targetRef: {kind: Route, name: app, rule: header}
              authorization:
                rules:
                  - name: team
                    action: allow
                    when: {cel: "'x-team' in request.headers && request.headers['x-team'].startsWith('blue')"}
            ---
            kind: AuthPolicy
            metadata: {name: claim}
            spec:
              targetRef: {kind: Route, name: app, rule: claim}
              jwt:
                providers: [{name: dev, issuer: "https://idp.authplane.test", jwks: {file: jwks.json}}]
              authorization:
                rules:
                  - {name: admins, action: allow, when: {cel: "'admins' in claims.groups"}}
                  - {name: not-mallory, action: deny, when: {cel: "claims.sub == 'mallory'"}}
            ---
            kind: AuthPolicy
            metadata: {name: request}
            spec:
              targetRef: {kind: Route, name: app, rule: request}
              authorization:
                default: allow
                rules:
                  - name: no-writes-below-locked
                    action: deny
                    when: {cel: "request.method != 'GET' && request.path.startsWith('/req/locked')"}
            """,
    })
    envoy = start_static_envoy(d, "edge", str(tmp))
    yield envoy.listener_port("edge/http")
    envoy.stop()
    echo.stop()


def test_cel_on_a_header(cel_stack):
    assert request(cel_stack, "/header", headers={"x-team": "blue-1"}).status == 200
    assert request(cel_stack, "/header", headers={"x-team": "red"}).status == 403
    assert request(cel_stack, "/header").status == 403  # guarded: no header, no match


def test_cel_on_claims(cel_stack, idp):
    def get(**claims: object) -> int:
        return request(cel_stack, "/claim", headers={"authorization": f"Bearer {idp.mint(**claims)}"}).status

    assert get(groups=["dev", "admins"]) == 200
    assert get(groups=["dev"]) == 403
    assert get() == 403  # no groups claim: the expression fails, the allow rule does not match
    assert get(sub="mallory", groups=["admins"]) == 403  # a cel deny rule under default: deny


def test_cel_on_method_and_path(cel_stack):
    assert request(cel_stack, "/req/locked/x").status == 200
    assert request(cel_stack, "/req/locked/x", method="POST").status == 403
    assert request(cel_stack, "/req/open", method="POST").status == 200


def _write(tmp_path, checks: str) -> None:
    """A route with one AuthPolicy whose check sections are ``checks`` (YAML at the spec's indent)."""
    write_policies(str(tmp_path), {
        "gateway.yaml": _GATEWAY.format(port=9000),
        "authz.yaml": """
            kind: Route
            metadata: {name: app}
            spec: {gateway: edge, rules: [{backend: echo}]}
            ---
            kind: AuthPolicy
            metadata: {name: app}
            spec:
              targetRef: {kind: Route, name: app}
            """.rstrip(" ") + textwrap.indent(textwrap.dedent(checks).strip("\n"), " " * 14),
    })


def _validate(tmp_path, cel: str) -> subprocess.CompletedProcess[str]:
    _write(tmp_path, f"""
        authorization:
          rules:
            - name: r
              action: allow
              when:
                cel: "{cel}"
        """)
    return subprocess.run([sys.executable, "-m", "authplane.cli", "validate", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def _cel_line(tmp_path) -> int:
    lines = (tmp_path / "authz.yaml").read_text().splitlines()
    return next(i for i, line in enumerate(lines, start=1) if "cel:" in line)


@pytest.mark.parametrize(("cel", "message"), [
    ("request.path == ", "syntax error at column 17: mismatched input"),
    ("request.path == 1", "type error at column 14: found no matching overload for '_==_' applied to '(string, int)'"),
    ("request.nope", "type error at column 8: undefined field 'nope'"),
    ("request.path", "type error: the expression must be a bool, it is a string"),
])
def test_cel_errors_at_their_file_line(tmp_path, cel, message):
    r = _validate(tmp_path, cel)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    errors = [line for line in (r.stdout + r.stderr).splitlines() if "when.cel" in line]
    assert len(errors) == 1, r.stdout + r.stderr
    where = f"{tmp_path / 'authz.yaml'}:{_cel_line(tmp_path)}:"
    assert errors[0].startswith(where), errors[0]
    assert message in errors[0]


@pytest.mark.parametrize(("when", "field", "message"), [
    ("extAuth: {service: builtin, rules: [{name: r, action: allow, when: {cel: 'true'}}]}",
     "spec.extAuth.rules[0].when.cel", "cel is only supported in authorization rules"),
    ("authorization: {rules: [{name: r, action: allow, when: {methods: [GET], not: {cel: 'true'}}}]}",
     "spec.authorization.rules[0].when.not.cel", "cel is not supported under not"),
])
def test_cel_where_it_is_not_supported(tmp_path, when, field, message):
    _write(tmp_path, when)
    with pytest.raises(PolicyError) as e:
        load_dir(str(tmp_path))
    assert [p.field for p in e.value.problems if message in p.message] == [field], str(e.value)
