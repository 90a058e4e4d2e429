"""Path rules cannot be dodged: what a real Envoy lets through for each path trick, on gateways with
deny rules, with allow rules, ignoring case and with the ambiguous-path refusal turned off; then
the same semantics in the builtin decision service (engine and forward auth)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from authplane.authz.evaluate import Request, decide
from authplane.authz.http_api import normalize_path
from authplane.authz.rules import compile_table
from authplane.devtools.echo import EchoServer
from authplane.envoy_bin import EnvoyProcess
from authplane.policy.loader import load_texts
from tests.authz.test_authz_nginx import NGINX, nginx  # noqa: F401 (fixture)
from tests.support.http import request
from tests.support.policies import HEAD, app_gateway, app_policy, write_policies
from tests.support.processes import ServiceThread, start_static_envoy

NO_SECRET = "{name: no-secret, action: deny, when: {paths: [/api/secret]}}"
NO_PRIVATE = "{name: no-private, action: deny, when: {paths: [/api/private/*]}}"
GATEWAYS = {
    # name: (pathMatching, gateway-level authorization)
    "deny": ("{}", f"{{default: allow, rules: [{NO_SECRET}, {NO_PRIVATE}]}}"),
    "allow": ("{}", f"{{default: deny, rules: [{{name: reads, action: allow, when: {{methods: [GET]}}}}, "
                    f"{NO_SECRET}, {NO_PRIVATE}]}}"),
    "nocase": ("{caseSensitive: false}", f"{{default: allow, rules: [{NO_SECRET}, {NO_PRIVATE}]}}"),
    "optout": ("{rejectAmbiguous: false}", f"{{default: allow, rules: [{NO_SECRET}]}}"),
}
"""Gateways of one fleet, each with its own listener and Route ``<name>``: an exact route
``/internal`` (route policy: deny everything), ``/files`` (route policy: default deny, two allowed
paths) and a catch-all to the echo upstream."""


def _fleet(echo_port: int) -> dict[str, str]:
    docs = [f'kind: Backend\nmetadata: {{name: echo}}\nspec: {{endpoints: ["127.0.0.1:{echo_port}"]}}']
    for i, (n, (matching, authz)) in enumerate(GATEWAYS.items()):
        docs += [  # ports are replaced by OS-chosen ones in the test bootstrap
            f"kind: Gateway\nmetadata: {{name: {n}}}\n"
            f"spec: {{fleet: edge, listeners: [{{name: http, port: {8080 + i}}}], pathMatching: {matching}}}",
            f"kind: Route\nmetadata: {{name: {n}}}\nspec:\n  gateway: {n}\n  rules:\n"
            f"    - {{name: internal, match: {{path: /internal}}, backend: echo}}\n"
            f"    - {{name: files, match: {{pathPrefix: /files}}, backend: echo}}\n"
            f"    - {{name: all, backend: echo}}",
            f"kind: AuthPolicy\nmetadata: {{name: {n}}}\n"
            f"spec: {{targetRef: {{kind: Gateway, name: {n}}}, authorization: {authz}}}",
            f"kind: AuthPolicy\nmetadata: {{name: {n}-internal}}\n"
            f"spec: {{targetRef: {{kind: Route, name: {n}, rule: internal}}, authorization: {{default: deny}}}}",
            f"kind: AuthPolicy\nmetadata: {{name: {n}-files}}\n"
            f"spec: {{targetRef: {{kind: Route, name: {n}, rule: files}}, authorization: {{default: deny, rules: "
            f"[{{name: listing, action: allow, when: {{paths: [/files/public/*, /files/index]}}}}]}}}}",
        ]
    return {"fleet.yaml": "\n---\n".join(docs)}


class Stack:
    def __init__(self, envoy: EnvoyProcess) -> None:
        self.envoy = envoy

    def get(self, gateway: str, path: str, method: str = "GET") -> tuple[int, str]:
        """(status, path the upstream saw, or "" when Envoy answered itself)."""
        r = request(self.envoy.listener_port(f"{gateway}/http"), path, method=method)
        return r.status, r.json()["path"] if r.status == 200 else ""


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("paths")
    echo = EchoServer().start()
    try:
        d = write_policies(str(tmp / "policies"), _fleet(echo.port))
        envoy = start_static_envoy(d, "edge", str(tmp))
        try:
            yield Stack(envoy)
        finally:
            envoy.stop()
    finally:
        echo.stop()


# (path as sent, status on the case-sensitive gateways): 403 = a deny rule caught the trick,
# 400 = refused as ambiguous before any check, 307 = Envoy redirects to the unescaped path.
SECRET_TRICKS = [
    ("/api/secret", 403),
    ("/api/secret/", 403),
    ("/api/secret/.", 403),
    ("/api/secret/x/..", 403),
    ("/api/x/../secret", 403),
    ("/api/./secret", 403),
    ("//api//secret", 403),
    ("/api\\secret", 403),
    ("/api/%73ecret", 403),
    ("/api/x/%2E%2E/secret", 403),
    ("/api/x/%2e%2e/secret/", 403),
    ("/api/secret?x=1", 403),
    ("/api/secret;x", 400),
    ("/api/secret;", 400),
    ("/api/secret;/", 400),
    ("/api;x/secret", 400),
    ("/api/secret%3Bx", 400),
    ("/api/secret%3bx", 400),
    ("/api/secret.", 400),
    ("/api/secret..", 400),
    ("/api/secret%2e", 400),
    ("/api/secret./", 400),
    ("/api/secret./x", 400),
    ("/api/.../secret", 400),
    ("http://localhost/api/secret/", 403),  # absolute form
    ("http://localhost/api/secret;x", 400),
    ("/api%2Fsecret", 307),
    ("/api%5Csecret", 307),
]


@pytest.mark.parametrize("gateway", ["deny", "allow", "nocase"])
@pytest.mark.parametrize(("path", "status"), SECRET_TRICKS)
def test_exact_deny_rule_is_not_dodged(stack, gateway, path, status):
    r = request(stack.envoy.listener_port(f"{gateway}/http"), path)
    assert r.status == status
    if status == 307:  # the redirect target is the plain path, refused in turn
        assert r.headers["location"] == "/api/secret"
        assert stack.get(gateway, r.headers["location"])[0] == 403


@pytest.mark.parametrize("gateway", ["deny", "allow", "nocase"])
@pytest.mark.parametrize("path", ["/api/private", "/api/private/", "/api/private/x", "/api/private/x/",
                                  "/api/private/x/../y", "/api/private;x", "/api/private.",
                                  "/api/private/x;y", "/api//private/x"])
def test_prefix_deny_rule_covers_its_root(stack, gateway, path):
    assert stack.get(gateway, path)[0] == (400 if ";" in path or path.endswith(".") else 403)


@pytest.mark.parametrize("gateway", ["deny", "allow", "nocase"])
@pytest.mark.parametrize("path", ["/api/secretx", "/api/secrets/x", "/api/privatex", "/api/x", "/",
                                  "/api/v1.2/x", "/api/.well-known/x", "/api/other?q=a;b.", "/api/a-b_c~d",
                                  "/internalx", "/internal/x"])
def test_neighbours_are_not_caught(stack, gateway, path):
    assert stack.get(gateway, path) == (200, path)


@pytest.mark.parametrize("path", ["/API/SECRET", "/api/Secret/", "/Api/Private", "/API/PRIVATE/x"])
def test_case_is_heeded_by_default_and_ignored_on_request(stack, path):
    assert stack.get("deny", path) == (200, path)
    assert stack.get("nocase", path)[0] == 403


def test_allow_rules_use_the_same_semantics(stack):
    """Default deny, one GET-only allow rule: the deny rules inside it (not_id) are not dodged
    either, and a method the allow rule does not cover stays refused."""
    assert stack.get("allow", "/api/other") == (200, "/api/other")
    assert stack.get("allow", "/api/other", "POST")[0] == 403
    assert stack.get("allow", "/api/secret/")[0] == 403


@pytest.mark.parametrize("gateway", ["deny", "nocase"])
def test_route_allow_rule_exact_and_prefix_root(stack, gateway):
    for allowed in ("/files/index", "/files/index/", "/files/public", "/files/public/", "/files/public/a"):
        assert stack.get(gateway, allowed) == (200, allowed), allowed
    for refused in ("/files", "/files/indexx", "/files/index/x", "/files/publicx", "/files/other"):
        assert stack.get(gateway, refused)[0] == 403, refused
    assert stack.get(gateway, "/files/index;x")[0] == 400
    assert stack.get(gateway, "/files/public.")[0] == 400


@pytest.mark.parametrize("path", ["/internal", "/internal/", "/internal/.", "/x/../internal", "//internal"])
def test_exact_route_does_not_fall_through_to_the_catch_all(stack, path):
    """The route policy (deny everything) of ``path: /internal`` also holds for ``/internal/``."""
    assert stack.get("deny", path)[0] == 403


def test_route_matches_ignore_case_only_on_request(stack):
    assert stack.get("deny", "/INTERNAL/") == (200, "/INTERNAL/")  # another route: documented
    assert stack.get("nocase", "/INTERNAL/")[0] == 403
    assert stack.get("nocase", "/Internal")[0] == 403
    assert stack.get("nocase", "/FILES/other")[0] == 403
    assert stack.get("nocase", "/Files/Public/a") == (200, "/Files/Public/a")


def test_ambiguous_paths_are_refused_before_any_check(stack):
    r = request(stack.envoy.listener_port("deny/http"), "/internal;x")
    assert (r.status, r.body) == (400, "authplane: ambiguous path (a ';' or a segment ending in '.')\n")


def test_opt_out_passes_ambiguous_paths_through(stack):
    """``rejectAmbiguous: false``: the guard is what refused them (the upstream gets them as sent)."""
    assert stack.get("optout", "/api/secret;x") == (200, "/api/secret;x")
    assert stack.get("optout", "/api/secret.") == (200, "/api/secret.")
    assert stack.get("optout", "/api/secret/")[0] == 403


# --- the builtin decision service ------------------------------------------------------------

BUILTIN = app_policy(name="rules", ext="""
    service: builtin
    rules:
      - {name: no-secret, action: deny, when: {paths: [/api/secret]}}
      - {name: no-private, action: deny, when: {paths: [/api/private/*]}}
      - {name: rest, action: allow}
    """)


def _builtin(case_sensitive: bool) -> str:
    gw = app_gateway(9)
    if not case_sensitive:
        gw = gw.replace("listeners: [{name: http, port: 8080}]}",
                        "listeners: [{name: http, port: 8080}], pathMatching: {caseSensitive: false}}")
        assert "caseSensitive" in gw
    return gw + "---\n" + BUILTIN


def _engine(case_sensitive: bool, path: str) -> str:
    text = "\n---\n".join(HEAD + d for d in _builtin(case_sensitive).split("---\n"))
    pol = compile_table(load_texts({"p.yaml": text}), "v").policies["rules"]
    return decide(pol, Request(method="GET", path=path, headers={})).rule


@pytest.mark.parametrize(("path", "rule"), [
    ("/api/secret", "no-secret"), ("/api/secret/", "no-secret"), ("/api/secret?x=1", "no-secret"),
    ("/api/private", "no-private"), ("/api/private/", "no-private"), ("/api/private/a", "no-private"),
    ("/api/secretx", "rest"), ("/api/privatex", "rest"), ("/API/SECRET", "rest"), ("/", "rest"),
])
def test_builtin_rules_semantics(path, rule):
    assert _engine(True, path) == rule


@pytest.mark.parametrize(("path", "rule"), [
    ("/API/SECRET", "no-secret"), ("/Api/Secret/", "no-secret"), ("/API/PRIVATE", "no-private"),
    ("/api/PRIVATE/x", "no-private"), ("/API/other", "rest"),
])
def test_builtin_rules_ignore_case_on_request(path, rule):
    assert _engine(False, path) == rule


@pytest.mark.parametrize(("raw", "clean"), [
    ("/api/secret/.", "/api/secret/"), ("/api/secret/x/..", "/api/secret/"), ("//api//secret", "/api/secret"),
    ("/api\\secret", "/api/secret"), ("/api/%2E%2E/api/secret", "/api/secret"), ("/a?b=;.", "/a?b=;."),
    ("/api/secret;x", None), ("/api/secret%3Bx", None), ("/api/secret.", None), ("/api/secret%2e", None),
    ("/api/secret./x", None), ("/api/...", None),
])
def test_forward_auth_normalisation(raw, clean):
    assert normalize_path(raw) == clean


@pytest.fixture(params=[True, False], ids=["case-sensitive", "ignore-case"])
def forward(tmp_path, request) -> Iterator[tuple[ServiceThread, bool]]:
    """The decision service with the builtin rules; and whether their gateway ignores case."""
    svc = ServiceThread(write_policies(str(tmp_path / "p"), {"p.yaml": _builtin(request.param)}))
    yield svc, not request.param
    svc.close()


@pytest.mark.parametrize(("uri", "status"), [
    ("/api/secret", 403), ("/api/secret/", 403), ("/api/secret/.", 403), ("/api/x/../secret", 403),
    ("/api/%73ecret", 403), ("//api/secret", 403), ("/api\\secret", 403), ("/api/private", 403),
    ("/api/secret;x", 400), ("/api/secret%3Bx", 400), ("/api/secret.", 400), ("/api/secret%2E", 400),
    ("/api/secret./", 400), ("/api/private;x/a", 400), ("/api/secretx", 200), ("/api/other", 200),
])
def test_forward_auth_refuses_like_envoy(forward, uri, status):
    svc, ignore_case = forward
    port = svc.svc.http_port
    for sent in (uri, uri.upper()):
        by_nginx = request(port, "/authz/rules", headers={"x-original-url": f"https://app.example.com{sent}"})
        by_traefik = request(port, "/authz/rules", headers={"x-forwarded-uri": sent, "x-forwarded-host": "app"})
        expected = status if sent == uri or ignore_case or status != 403 else 200
        # nginx's auth_request knows only 401 and 403 as refusals: 403 there
        assert (by_nginx.status, by_traefik.status) == (403 if expected == 400 else expected, expected), sent
        if expected == 400:
            assert "ambiguous path" in by_nginx.body and "ambiguous path" in by_traefik.body


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: nginx-light)")
@pytest.mark.parametrize("path", ["/app;x", "/app.", "/app%3Bx/y", "/app./y"])
def test_real_nginx_refuses_ambiguous_paths(nginx, idp, path):  # noqa: F811 (the real-nginx fixture)
    """Through ingress-nginx's auth_request: 403 (a 400 would become nginx's 500)."""
    admin = {"cookie": f"session={idp.mint(sub='alice', groups=['admins'])}"}
    assert request(nginx, "/app", headers=admin).status == 200
    assert request(nginx, path, headers=admin).status == 403
