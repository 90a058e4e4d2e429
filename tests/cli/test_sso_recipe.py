"""The recipe of user story 2 for clusters that keep their ingress (docs/recipes.md): Grafana,
Kibana and an app with no auth under one parent domain, one sign-in for all three, Kibana for the
ops group only. Run end to end on loopback from the committed files: policies/ingress-sso/
in ``authplane serve`` (the decision service signs users in), deploy/recipes/sso-ingress-nginx/
turned into the directives ingress-nginx generates and run in a real nginx, deploy/recipes/
sso-traefik/ in a real Traefik, three echo upstreams for the apps, and the certified npm
oidc-provider (scope claims from userinfo, a logout confirmation page). A browser-like client
follows redirects and keeps cookies; every host resolves to the proxy under test."""

from __future__ import annotations

import base64
import os
import shutil
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import yaml

from tests.support import ROOT
from tests.support.certified_oidc import Client, _submit, certified_provider, missing, sign_in
from tests.support.http import Response
from tests.support.ingress import (
    NamedEcho,
    Proxy,
    load_yaml,
    start_file_traefik,
    start_ingress_nginx,
)
from tests.support.oidc import Browser
from tests.support.processes import ServeProcess, ServiceThread

POLICIES = os.path.join(ROOT, "policies", "ingress-sso")
NGINX_RECIPE = os.path.join(ROOT, "deploy", "recipes", "sso-ingress-nginx")
TRAEFIK_RECIPE = os.path.join(ROOT, "deploy", "recipes", "sso-traefik")
KEYCLOAK = "https://sso.example.test/realms/main"
AUTHZ = "authplane.authplane.svc.cluster.local:9002"
APPS = {"grafana": "grafana.monitoring:3000", "kibana": "kibana.logging:5601", "app": "app.apps:8080"}
"""App (its host's first label) → the Service and port its Ingress names."""
MANY = [f"team-{i:04d}-with-a-long-name" for i in range(320)]
"""Groups enough for a session cookie past nginx's default 8k header buffer."""
ACCOUNTS: dict[str, dict[str, object]] = {
    "alice": {"email": "alice@example.test", "email_verified": True, "groups": ["ops", "dev"]},
    "bob": {"email": "bob@example.test", "email_verified": True, "groups": ["dev"]},
    "carol": {"email": "carol@example.test", "email_verified": True, "groups": [*MANY, "ops"]},
}
PROXIES = ["ingress-nginx", "traefik"]


@dataclass
class Stack:
    issuer: str
    proxies: dict[str, Proxy]

    def browser(self, proxy: str) -> Browser:
        return Browser(self.proxies[proxy].port, domain=".example.test")


def _policies(dst: str, issuer: str) -> str:
    """The committed set with the provider's issuer, its endpoints from discovery (so the decision
    service reads email and groups from userinfo, as the set's comment says)."""
    shutil.copytree(POLICIES, dst)
    path = os.path.join(dst, "ingress-sso.yaml")
    with open(path) as f:
        text = f.read()
    assert text.count(KEYCLOAK) == 12
    lines = [line for line in text.splitlines(keepends=True)
             if not line.lstrip().startswith(("authorizationEndpoint:", "tokenEndpoint:", "jwksUri:"))]
    with open(path, "w") as f:
        f.write("".join(lines).replace(KEYCLOAK, issuer))
    return dst


def _swap(text: str, swaps: dict[str, str]) -> str:
    for old, new in swaps.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    if missing() is not None:
        pytest.skip(missing() or "")
    tmp = str(tmp_path_factory.mktemp("sso-recipe"))
    with open(os.path.join(POLICIES, "client-secret.dev.txt")) as f:
        secret = f.read().strip()
    client = Client("edge-sso", secret, [f"http://{a}.example.test/oauth2/callback" for a in APPS],
                    ["https://app.example.test/"])
    echoes = {name: NamedEcho(name).start() for name in APPS}
    started: list[Proxy] = []
    serve: ServeProcess | None = None
    try:
        with certified_provider([client], ACCOUNTS) as issuer:
            serve = ServeProcess(_policies(os.path.join(tmp, "policies"), issuer), tmp, 0).wait_started()
            authz = serve.authz_http
            upstreams = {APPS[n]: f"127.0.0.1:{e.port}" for n, e in echoes.items()}
            docs = [d for name in ("ingresses.yaml", "ingress-nginx-controller.yaml")
                    for d in load_yaml(os.path.join(NGINX_RECIPE, name))]
            started.append(start_ingress_nginx(docs, {**upstreams, "authplane.authplane:http-authz": authz,
                                                      AUTHZ: authz}, os.path.join(tmp, "nginx"), "app.example.test"))
            with open(os.path.join(TRAEFIK_RECIPE, "dynamic.yaml")) as f:
                dynamic = _swap(f.read(), {f"http://{svc.replace(':', '.svc.cluster.local:')}": f"http://{up}"
                                           for svc, up in upstreams.items()} | {AUTHZ: authz})
            static = load_yaml(os.path.join(TRAEFIK_RECIPE, "traefik.yaml"))[0]
            started.append(start_file_traefik(static, dynamic, os.path.join(tmp, "traefik"), "websecure",
                                              "app.example.test"))
            yield Stack(issuer, dict(zip(PROXIES, started, strict=True)))
    finally:
        for p in started:
            p.stop()
        if serve is not None:
            serve.stop()
        for e in echoes.values():
            e.stop()


def _seen(r: Response, app: str) -> dict[str, str]:
    """The headers ``app``'s upstream received (the response must come from that app)."""
    assert r.status == 200, (r.status, r.body[:300])
    data = r.json()
    assert data["app"] == app
    return data["headers"]


def _session(b: Browser) -> list[str]:
    return sorted(c.name for c in b.cookies.values() if c.name.startswith("authplane_session"))


@pytest.mark.parametrize("proxy", PROXIES)
def test_sign_in_once_then_every_app_and_kibana_admits_ops(stack, proxy):
    b = stack.browser(proxy)
    r = sign_in(b, "http://grafana.example.test/d/home?orgId=1", "alice")
    seen = _seen(r, "grafana")
    assert b.history[-1][0] == "http://grafana.example.test/d/home?orgId=1"  # back where the browser started
    assert (seen["x-auth-request-user"], seen["x-auth-request-email"]) == ("alice", "alice@example.test")
    assert seen["x-auth-request-groups"] == "ops,dev"
    before = len(b.history)
    seen = _seen(b.get("http://app.example.test/wiki", headers={"x-auth-request-user": "mallory"}), "app")
    assert seen["x-auth-request-user"] == "alice"  # the client's copy never reaches the app
    seen = _seen(b.get("http://kibana.example.test/app/discover"), "kibana")
    assert seen["x-auth-request-groups"] == "ops,dev"
    assert len(b.history) == before + 2  # no trip to the provider: one request per app


@pytest.mark.parametrize("proxy", PROXIES)
def test_a_signed_in_non_member_gets_403_at_kibana_only(stack, proxy):
    b = stack.browser(proxy)
    _seen(sign_in(b, "http://app.example.test/", "bob"), "app")
    _seen(b.get("http://grafana.example.test/"), "grafana")
    r = b.get("http://kibana.example.test/app/discover")
    assert r.status == 403
    if proxy == "traefik":  # nginx answers auth_request's 403 with its own page
        assert r.body == "Kibana is for the ops group\n"


@pytest.mark.parametrize("proxy", PROXIES)
def test_xhr_without_a_session(stack, proxy):
    b = stack.browser(proxy)
    xhr = {"x-requested-with": "XMLHttpRequest", "accept": "application/json"}
    r = b.request("http://grafana.example.test/api/dashboards", headers=xhr)
    if proxy == "traefik":
        assert r.status == 401 and r.headers["www-authenticate"].startswith("Bearer realm=")
    else:  # ingress-nginx sends every 401 of auth-url to auth-signin (documented)
        assert r.status == 302
        assert r.headers["location"] == "https://grafana.example.test/oauth2/start?rd=%2Fapi%2Fdashboards"
    sign_in(b, "http://grafana.example.test/", "alice")
    _seen(b.request("http://grafana.example.test/api/dashboards", headers=xhr), "grafana")


@pytest.mark.parametrize("proxy", PROXIES)
def test_sign_out_on_one_app_ends_the_session_on_every_app(stack, proxy):
    b = stack.browser(proxy)
    _seen(sign_in(b, "http://kibana.example.test/", "alice"), "kibana")
    r = b.get("http://kibana.example.test/oauth2/sign_out?rd=/", follow=False)
    assert r.status == 302 and not _session(b)
    logout = r.headers["location"]
    assert logout.startswith(f"{stack.issuer}/session/end?")
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(logout).query)["post_logout_redirect_uri"] == [
        "https://app.example.test/"]
    for app in APPS:
        r = b.get(f"http://{app}.example.test/x", follow=False)
        assert r.status == 302 and f"{app}.example.test/oauth2/start?rd=" in r.headers["location"], (app, r)
    # The provider's own session ends too: confirm its logout page; it sends the browser to the
    # post-logout URI (the app), which sends it to sign in, and the provider asks for a login again.
    page = b.get(logout)
    assert page.status == 200 and "logout" in page.body, page.body[:300]
    page, where = _submit(b, page, b.history[-1][0], {"logout": "yes"})
    assert where.startswith(f"{stack.issuer}/") and 'name="login"' in page.body, b.history[-6:]
    assert any(url == "https://app.example.test/" for url, _ in b.history)


@pytest.mark.parametrize("proxy", PROXIES)
def test_session_over_4kb_is_split_into_cookies(stack, proxy):
    b = stack.browser(proxy)
    seen = _seen(sign_in(b, "http://kibana.example.test/", "carol"), "kibana")  # ops is the last group
    assert seen["x-auth-request-groups"].split(",") == [*MANY, "ops"]
    names = _session(b)
    assert len(names) >= 2 and names[0] == "authplane_session_0", names
    # past 8 KB, nginx's default header buffer: the controller ConfigMap's setting lets it through
    assert sum(len(c.value) for c in b.cookies.values() if c.name in names) > 8192
    _seen(b.get("http://grafana.example.test/"), "grafana")


@pytest.mark.parametrize("proxy", PROXIES)
def test_rd_to_a_foreign_host_is_refused(stack, proxy):
    b = stack.browser(proxy)
    for rd in ("http://evil.example.com/", "//evil.example.com/", "https://example.test.evil.com/",
               "javascript:alert(1)", "/\\evil.example.com"):
        quoted = urllib.parse.quote(rd, safe="")
        for action in ("start", "sign_out"):
            r = b.get(f"http://app.example.test/oauth2/{action}?rd={quoted}", follow=False)
            assert r.status == 400, (action, rd, r.status, r.headers.get("location"))
    r = b.get("http://app.example.test/oauth2/start?rd=" + urllib.parse.quote("https://kibana.example.test/x"),
              follow=False)
    assert r.status == 302 and r.headers["location"].startswith(f"{stack.issuer}/auth?")


def _flip_last_byte(value: str) -> str:
    raw = bytearray(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    raw[-1] ^= 1
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


@pytest.mark.parametrize("proxy", PROXIES)
def test_a_tampered_session_cookie_is_no_session(stack, proxy):
    b = stack.browser(proxy)
    _seen(sign_in(b, "http://app.example.test/", "alice"), "app")
    cookie = next(c for c in b.cookies.values() if c.name == "authplane_session")
    cookie.value = _flip_last_byte(cookie.value)
    r = b.get("http://app.example.test/", follow=False)
    assert r.status == 302 and "app.example.test/oauth2/start?rd=" in r.headers["location"]
    if proxy == "traefik":
        assert b.request("http://app.example.test/", headers={"accept": "application/json"}).status == 401


def test_recipe_manifests_are_valid_kubernetes_objects() -> None:
    """The Ingress, ConfigMap and NetworkPolicy manifests as the Kubernetes API would take them,
    and the Traefik files parse (Traefik itself refuses unknown fields when the test loads them)."""
    import kubernetes_validate

    from tests.cli.test_deploy import K8S_VERSION

    for name in sorted(os.listdir(NGINX_RECIPE)):
        for doc in load_yaml(os.path.join(NGINX_RECIPE, name)):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    for name in ("traefik.yaml", "dynamic.yaml"):
        with open(os.path.join(TRAEFIK_RECIPE, name)) as f:
            assert isinstance(yaml.safe_load(f), dict)


def test_written_out_endpoints_still_give_the_rules_the_groups(tmp_path) -> None:
    if missing() is not None:
        pytest.skip(missing() or "")
    with open(os.path.join(POLICIES, "client-secret.dev.txt")) as f:
        client = Client("edge-sso", f.read().strip(), ["http://kibana.example.test/oauth2/callback"], [])
    with certified_provider([client], ACCOUNTS) as issuer:
        d = str(tmp_path / "policies")
        shutil.copytree(POLICIES, d)
        path = os.path.join(d, "ingress-sso.yaml")
        with open(path) as f:
            text = _swap(f.read(), {f"{KEYCLOAK}/protocol/openid-connect/auth": f"{issuer}/auth",
                                    f"{KEYCLOAK}/protocol/openid-connect/token": f"{issuer}/token",
                                    f"{KEYCLOAK}/protocol/openid-connect/certs": f"{issuer}/jwks", KEYCLOAK: issuer})
        with open(path, "w") as f:
            f.write(text)
        svc = ServiceThread(d)
        try:
            b = Browser(svc.svc.http_port, domain=".example.test")
            sign_in(b, "http://kibana.example.test/oauth2/start?rd=/", "alice")  # alice is in ops
            assert _session(b)
            r = b.request("http://kibana.example.test/authz", headers={
                "x-forwarded-host": "kibana.example.test", "x-forwarded-uri": "/", "accept": "text/html"})
            assert r.status == 200, (r.status, r.body)
        finally:
            svc.close()
