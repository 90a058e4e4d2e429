"""Every kind of bad input gets ``path:line:col: field.path: message``, all of them in one run."""

from __future__ import annotations

import json
import os

import pytest

from authplane.errors import PolicyError
from authplane.policy.loader import load_dir

GATEWAY = """\
apiVersion: authplane.dev/v1alpha1
kind: Gateway
metadata: {name: edge}
spec:
  fleet: edge
  listeners: [{name: http, port: 8080}]
---
apiVersion: authplane.dev/v1alpha1
kind: Backend
metadata: {name: echo}
spec: {endpoints: ["127.0.0.1:9000"]}
"""


def problems(tmp_path, files: dict[str, str], with_gateway: bool = True) -> list[str]:
    if with_gateway:
        files = {"base.yaml": GATEWAY, **files}
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    with pytest.raises(PolicyError) as e:
        load_dir(str(tmp_path))
    return [str(p).replace(f"{tmp_path}{os.sep}", "") for p in e.value.problems]


def route(spec: str) -> str:
    return f"apiVersion: authplane.dev/v1alpha1\nkind: Route\nmetadata: {{name: r}}\nspec:\n{spec}"


def policy(spec: str, name: str = "p") -> str:
    return f"apiVersion: authplane.dev/v1alpha1\nkind: AuthPolicy\nmetadata: {{name: {name}}}\nspec:\n{spec}"


RULE = "  gateway: edge\n  rules: [{name: a, backend: echo}]\n"
TARGET = "  targetRef: {kind: Route, name: r}\n"

CASES = {
    "unknown field (typo)": (
        {"r.yaml": route("  gateway: edge\n  rules:\n    - name: a\n      backend: echo\n"
                         "      match: {pathPrefx: /api}\n")},
        ["r.yaml:9:15: spec.rules[0].match.pathPrefx: unknown field (did you mean 'pathPrefix'?)"]),
    "wrong type": (
        {"r.yaml": route("  hostnames: api.example.com\n" + RULE)},
        ["r.yaml:5:14: spec.hostnames: expected a list, got str 'api.example.com'"]),
    "missing required field": (
        {"r.yaml": route("  rules: [{name: a, backend: echo}]\n")},
        ["r.yaml:5:3: spec.gateway: missing required field"]),
    "duplicate name": (
        {"r.yaml": route(RULE) + "\n---\n" + route(RULE)},
        ["r.yaml:11:18: metadata.name: duplicate Route 'r' (first defined at r.yaml:1:1)"]),
    "dangling gateway and backend": (
        {"r.yaml": route("  gateway: edgy\n  rules: [{name: a, backend: ech0}]\n")},
        ["r.yaml:5:12: spec.gateway: Gateway 'edgy' does not exist (did you mean 'edge'?)",
         "r.yaml:6:30: spec.rules[0].backend: Backend 'ech0' does not exist (did you mean 'echo'?)"]),
    "dangling policy target": (
        {"p.yaml": policy("  targetRef: {kind: Route, name: nope}\n  public: true\n")},
        ["p.yaml:5:34: spec.targetRef.name: Route 'nope' does not exist"]),
    "dangling extAuth backend": (
        {"r.yaml": route(RULE), "p.yaml": policy(TARGET + "  extAuth: {service: authz}\n")},
        ["p.yaml:6:22: spec.extAuth.service: Backend 'authz' does not exist (or use builtin)"]),
    "two policies on one target": (
        {"r.yaml": route(RULE), "p.yaml": policy(TARGET + "  public: true\n"),
         "q.yaml": policy(TARGET + "  public: true\n", name="q")},
        ["q.yaml:5:14: spec.targetRef: Route 'r' already has AuthPolicy 'p' (p.yaml:1:1); "
         "at most one AuthPolicy per target"]),
    "invalid duration": (
        {"r.yaml": route("  gateway: edge\n  rules: [{name: a, backend: echo, timeout: 10 seconds}]\n")},
        ["r.yaml:6:45: spec.rules[0].timeout: invalid duration '10 seconds': use a number and a "
         "unit (ms, s, m, h), e.g. 30s"]),
    "invalid CIDR": (
        {"r.yaml": route(RULE), "p.yaml": policy(
            TARGET + "  authorization:\n    rules: [{name: x, action: allow, when: {sourceCIDRs: [10.0.0.300/8]}}]\n")},
        ["p.yaml:7:59: spec.authorization.rules[0].when.sourceCIDRs[0]: invalid CIDR '10.0.0.300/8': "
         "expected e.g. 10.0.0.0/8 or 2001:db8::/32"]),
    "invalid regex": (
        {"r.yaml": route("  gateway: edge\n  rules: [{name: a, backend: echo, match: {pathRegex: '^/(a'}}]\n")},
        ["r.yaml:6:55: spec.rules[0].match.pathRegex: invalid regex '^/(a': missing ), unterminated "
         "subpattern at position 2"]),
    "regex RE2 cannot run": (
        {"r.yaml": route("  gateway: edge\n  rules: [{name: a, backend: echo, match: {pathRegex: '^/(?!x)'}}]\n")},
        ["r.yaml:6:55: spec.rules[0].match.pathRegex: invalid regex '^/(?!x)': lookaround and "
         "backreferences are not supported by RE2"]),
    "invalid port": (
        {"g.yaml": "apiVersion: authplane.dev/v1alpha1\nkind: Gateway\nmetadata: {name: g2}\n"
                   "spec: {fleet: edge, listeners: [{name: http, port: 70000}]}\n"},
        ["g.yaml:4:52: spec.listeners[0].port: must be at most 65535, got 70000"]),
    "invalid header name": (
        {"r.yaml": route("  gateway: edge\n  rules: [{name: a, backend: echo, match: {headers: {'x tenant': a}}}]\n")},
        ["r.yaml:6:54: spec.rules[0].match.headers.x tenant: invalid header name 'x tenant': "
         "use letters, digits and - (RFC 9110 token)"]),
    "JWKS file missing": (
        {"r.yaml": route(RULE), "p.yaml": policy(
            TARGET + "  jwt:\n    providers: [{name: a, jwks: {file: keys/none.json}}]\n")},
        ["p.yaml:7:40: spec.jwt.providers[0].jwks.file: cannot read JWKS file 'keys/none.json': "
         "No such file or directory"]),
    "JWKS file without usable key": (
        {"r.yaml": route(RULE), "empty.json": json.dumps({"keys": [{"kty": "RSA", "n": "abc"}]}),
         "p.yaml": policy(TARGET + "  jwt:\n    providers: [{name: a, jwks: {file: empty.json}}]\n")},
        ["p.yaml:7:40: spec.jwt.providers[0].jwks.file: JWKS file 'empty.json': no usable key (each "
         "key needs kty RSA/EC/oct/OKP and its members, e.g. n and e for RSA)"]),
    "YAML syntax error": (
        {"bad.yaml": "kind: Route\nspec: [unclosed\n"},
        ["bad.yaml:3:1: invalid YAML: did not find expected ',' or ']'"]),
    "garbage that is not a document": (
        {"bad.yaml": "just some text\n"},
        ["bad.yaml:1:1: expected a mapping with apiVersion, kind, metadata and spec, got str "
         "'just some text'"]),
    "binary file": (
        {"bad.yaml": b"\xff\xfe\x00garbage"},
        ["bad.yaml:1:1: not a UTF-8 text file (invalid start byte at byte 0)"]),
    "unknown kind and wrong apiVersion": (
        {"k.yaml": "apiVersion: authplane.dev/v1\nkind: Gatway\nmetadata: {name: x}\nspec: {}\n"},
        ["k.yaml:1:13: apiVersion: must be authplane.dev/v1alpha1, got 'authplane.dev/v1'",
         "k.yaml:2:7: kind: unknown kind 'Gatway': expected one of Gateway, Backend, Route, AuthPolicy"]),
    "duplicate YAML key": (
        {"r.yaml": route("  gateway: edge\n  gateway: edge\n  rules: []\n")},
        ["r.yaml:6:3: spec.gateway: duplicate key 'gateway'"]),
    "htpasswd file: bad lines": (
        {"r.yaml": route(RULE), "p.yaml": policy(TARGET + "  basicAuth: {file: users.htpasswd}\n"),
         "users.htpasswd": "# users\nalice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\nbob:$apr1$x$y\n"
                           "  carol:{SHA}short\nnocolon\nalice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n"},
        ["users.htpasswd:3:5: user 'bob': unsupported password hash; Envoy's basic_auth accepts only "
         "{SHA} entries (htpasswd -s)",
         "users.htpasswd:4:9: user 'carol': {SHA} needs the base64 of a 20-byte SHA-1 digest (28 characters)",
         "users.htpasswd:5:1: expected 'user:{SHA}<hash>' (htpasswd -s)",
         "users.htpasswd:6:1: user 'alice' listed twice"]),
    "htpasswd file missing": (
        {"r.yaml": route(RULE), "p.yaml": policy(TARGET + "  basicAuth: {file: nope.htpasswd}\n")},
        ["p.yaml:6:21: spec.basicAuth.file: cannot read 'nope.htpasswd': No such file or directory"]),
    "API key file: bad lines and unknown client": (
        {"r.yaml": route(RULE),
         "p.yaml": policy(TARGET + "  apiKey: {file: api.keys, clients: [ci, cli]}\n"),
         "api.keys": "ci: k1\nci: k2\nbad line\nother: k1\nhashed: sha256:abcd\n"},
        ["api.keys:3:1: expected 'client-name: key'",
         "api.keys:4:1: client 'other' reuses the key of client 'ci'",
         "api.keys:5:1: client 'hashed': hashed keys are only supported by extAuth.apiKeys; Envoy's "
         "api_key_auth compares keys as written",
         "p.yaml:6:42: spec.apiKey.clients[1]: no client 'cli' in the key file 'api.keys'"]),
    "API key with two sources": (
        {"r.yaml": route(RULE),
         "p.yaml": policy(TARGET + "  apiKey: {file: api.keys, header: x-key, query: key}\n")},
        ["p.yaml:6:11: spec.apiKey: set only one of header, query, cookie"]),
    "oidc: partial endpoints": (
        {"r.yaml": route(RULE), "p.yaml": policy(
            TARGET + "  oidc:\n    issuer: https://idp.example.com\n    tokenEndpoint: https://idp.example.com/t\n"
                     "    clientId: app\n    clientSecret: {env: AUTHPLANE_TEST_UNSET_SECRET}\n")},
        ["p.yaml:7:5: spec.oidc: set all of authorizationEndpoint, tokenEndpoint, jwksUri, or none (discovery)"]),
    "oidc: unset secret variable, secret file missing, with jwt": (
        {"r.yaml": route(RULE), "p.yaml": policy(
            TARGET + "  oidc:\n    issuer: https://idp.example.com\n"
                     "    authorizationEndpoint: https://idp.example.com/a\n    tokenEndpoint: https://idp.example.com/t\n"
                     "    jwksUri: https://idp.example.com/k\n    clientId: app\n"
                     "    clientSecret: {env: AUTHPLANE_TEST_UNSET_SECRET}\n    hmacSecret: {file: nope.txt}\n"
                     "  jwt: {providers: [{name: a, jwks: {uri: https://idp.example.com/k}}]}\n")},
        ["p.yaml:7:5: spec.oidc: oidc checks the ID token itself; put bearer-token (jwt) checks in another policy",
         "p.yaml:12:19: spec.oidc.clientSecret: environment variable AUTHPLANE_TEST_UNSET_SECRET is not set or empty",
         "p.yaml:13:17: spec.oidc.hmacSecret: cannot read 'nope.txt': No such file or directory"]),
    "oidc: provider unreachable for discovery": (
        {"r.yaml": route(RULE), "p.yaml": policy(
            TARGET + "  oidc: {issuer: 'http://127.0.0.1:1', clientId: app, clientSecret: {file: s.txt}}\n"),
         "s.txt": "secret\n"},
        ["p.yaml:6:18: spec.oidc.issuer: cannot fetch the discovery document "
         "http://127.0.0.1:1/.well-known/openid-configuration: [Errno 111] Connection refused"]),
    "public with checks": (
        {"r.yaml": route(RULE), "p.yaml": policy(
            TARGET + "  public: true\n  authorization: {default: deny}\n")},
        ["p.yaml:6:11: spec.public: public: true turns every check off; remove authorization"]),
    "policy targets an unnamed rule by its derived name": (
        {"r.yaml": route("  gateway: edge\n  rules: [{backend: echo}, {name: b, backend: echo}]\n"),
         "p.yaml": policy("  targetRef: {kind: Route, name: r, rule: rule-0}\n  authorization: {default: deny}\n")},
        ["p.yaml:5:43: spec.targetRef.rule: Route 'r' rule 'rule-0' has no name of its own (r.yaml:6:11); "
         "give it `name:` to target it"]),
    "policy targets a rule of a route without rule names": (
        {"r.yaml": route("  gateway: edge\n  rules: [{backend: echo}]\n"),
         "p.yaml": policy("  targetRef: {kind: Route, name: r, rule: a}\n  authorization: {default: deny}\n")},
        ["p.yaml:5:43: spec.targetRef.rule: Route 'r' has no rule 'a' (none of its rules has a name)"]),
    "explicit rule name clashes with a derived one": (
        {"r.yaml": route("  gateway: edge\n  rules: [{name: rule-1, backend: echo}, {backend: echo}]\n")},
        ["r.yaml:6:42: spec.rules[1]: duplicate rule name 'rule-1' (the name of this unnamed rule); "
         "name the rule"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_error_message(tmp_path, case):
    files, expected = CASES[case]
    assert problems(tmp_path, files) == expected


def test_all_problems_reported_in_one_run(tmp_path):
    found = problems(tmp_path, {
        "a.yaml": route("  gateway: edge\n  rules: [{name: a, backend: echo, timeout: 5, tls: x}]\n"),
        "b.yaml": "kind: [\n",
        "c.yaml": policy("  targetRef: {kind: Gateway, name: edge}\n  jwt: {providers: []}\n"),
    })
    assert len(found) == 4, found
    assert [f.split(":")[0] for f in found] == ["a.yaml", "a.yaml", "b.yaml", "c.yaml"]


def test_empty_directory(tmp_path):
    assert problems(tmp_path, {}, with_gateway=False) == [
        f"{tmp_path}:1:1: no policy files (*.yaml, *.yml) found"]


def test_hidden_and_editor_files_are_ignored(tmp_path):
    garbage = "{{{ not yaml"
    (tmp_path / "base.yaml").write_text(GATEWAY)
    for name in (".hidden.yaml", "base.yaml~", ".#base.yaml", "base.yaml.swp", "#base.yaml#"):
        (tmp_path / name).write_text(garbage)
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.yaml").write_text(garbage)
    assert load_dir(str(tmp_path)).gateways.keys() == {"edge"}
