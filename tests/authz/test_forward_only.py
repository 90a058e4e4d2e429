"""A policy set used only for forward auth (Routes without ``gateway``, no Gateway, no Backend):
the decision service picks the policy from the original host and path as it does for Envoy's
routes, through the real HTTP endpoint, a real Traefik, ``authplane serve`` and the shipped
``policies/forward-auth`` recipe."""

from __future__ import annotations

import os
import shutil

import pytest

from authplane.devtools.idp import DevIdentityProvider
from tests.authz.test_forward_by_url import _builtin as by_url_policy
from tests.authz.test_forward_by_url import nginx_check, traefik_check
from tests.support import ROOT
from tests.support.http import request
from tests.support.policies import write_policies
from tests.support.processes import ServeProcess, ServiceThread
from tests.support.traefik import traefik


def _builtin(name: str, team: str, target: str) -> str:
    """test_forward_by_url's policy (allow ``x-team: <team>``, else 401 "<name> says no") on ``target``."""
    return by_url_policy(name, team).replace(f"{{kind: Route, name: {name}}}", target)


FORWARD_ONLY = "\n---\n".join([
    "kind: Route\nmetadata: {name: shop}\nspec: {hostnames: [shop.example.com]}",
    _builtin("shop", "shop", "{kind: Route, name: shop}"),
    """kind: Route
metadata: {name: blog}
spec:
  hostnames: [blog.example.com]
  rules:
    - {name: posts}
    - {name: admin, match: {pathPrefix: /admin}}
    - {name: feed, match: {path: /feed.xml, methods: [GET]}}""",
    _builtin("blog-posts", "blog", "{kind: Route, name: blog, rule: posts}"),
    _builtin("blog-admin", "admins", "{kind: Route, name: blog, rule: admin}"),
    "kind: AuthPolicy\nmetadata: {name: feed}\nspec: {targetRef: {kind: Route, name: blog, rule: feed}, "
    "extAuth: {service: builtin, rules: [{name: all, action: allow, upstreamHeaders: {x-policy: feed}}]}}",
    "kind: Route\nmetadata: {name: wild}\nspec: {hostnames: ['*.example.com']}",
    _builtin("wild", "wild", "{kind: Route, name: wild}"),
])

ENVOY_TOO = "\n---\n".join([
    "kind: Gateway\nmetadata: {name: edge}\nspec: {fleet: edge, listeners: [{name: http, port: 8080}]}",
    'kind: Backend\nmetadata: {name: app}\nspec: {endpoints: ["127.0.0.1:9"]}',
    "kind: Route\nmetadata: {name: api}\nspec: {gateway: edge, hostnames: [api.example.org], "
    "rules: [{name: all, backend: app}]}",
    _builtin("api", "api", "{kind: Route, name: api}"),
    "kind: Route\nmetadata: {name: shop-envoy}\nspec: {gateway: edge, hostnames: [shop.example.com], "
    "rules: [{name: all, backend: app}]}",
    _builtin("shop-envoy", "shop", "{kind: Route, name: shop-envoy}"),
])


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    d = write_policies(str(tmp_path_factory.mktemp("forward-only")), {"p.yaml": FORWARD_ONLY})
    svc = ServiceThread(d)
    yield svc
    svc.close()


def test_the_original_host_and_path_pick_the_policy(service, tmp_path):
    r = nginx_check(service, "https://shop.example.com/cart", **{"x-team": "shop"})
    assert (r.status, r.headers["x-policy"]) == (200, "shop")
    assert nginx_check(service, "https://shop.example.com/cart", **{"x-team": "blog"}).body == "shop says no"
    from authplane.devtools.echo import EchoServer

    echo = EchoServer().start()
    try:
        with traefik(str(tmp_path), {"plain": f"http://127.0.0.1:{service.svc.http_port}/authz"},
                     echo.port, ["X-Policy"]) as proxy:
            r = traefik_check(proxy, "blog.example.com", "/2024/hello", **{"x-team": "blog"})
            assert (r.status, r.headers["x-policy"]) == (200, "blog-posts")
            r = traefik_check(proxy, "news.example.com", "/", **{"x-team": "wild"})
            assert (r.status, r.headers["x-policy"]) == (200, "wild")  # the suffix wildcard
            assert traefik_check(proxy, "blog.example.com", "/admin/x", **{"x-team": "blog"}).body == \
                "blog-admin says no"
    finally:
        echo.stop()


def test_route_order_is_envoys(service):
    """Rules of one route are ordered as Envoy orders them (exact, longer prefix, catch-all), and
    the exact host wins over the wildcard, whatever the order they are written in."""
    r = nginx_check(service, "http://blog.example.com/feed.xml")
    assert (r.status, r.headers["x-policy"]) == (200, "feed")
    assert nginx_check(service, "http://blog.example.com/feed.xml/", **{"x-team": "x"}).status == 200
    r = nginx_check(service, "http://blog.example.com/admin", **{"x-team": "admins"})
    assert (r.status, r.headers["x-policy"]) == (200, "blog-admin")
    r = nginx_check(service, "http://blog.example.com/administrator", **{"x-team": "blog"})
    assert (r.status, r.headers["x-policy"]) == (200, "blog-posts")  # prefixes match whole segments
    r = nginx_check(service, "http://blog.example.com/x/../admin/y", **{"x-team": "blog"})
    assert r.body == "blog-admin says no"  # normalised before the route is picked


def test_naming_a_policy_still_works(service):
    r = nginx_check(service, "https://nowhere.example.org/", path="/authz/shop", **{"x-team": "shop"})
    assert (r.status, r.headers["x-policy"]) == (200, "shop")


def test_fails_closed(service, tmp_path):
    r = nginx_check(service, "https://unknown.example.org/x", **{"x-team": "shop"})
    assert r.status == 403 and "no route for this host and path" in r.body
    both = ServiceThread(write_policies(str(tmp_path), {"p.yaml": FORWARD_ONLY + "\n---\n" + ENVOY_TOO}))
    try:
        r = nginx_check(both, "https://api.example.org/", **{"x-team": "api"})
        assert (r.status, r.headers["x-policy"]) == (200, "api")  # an Envoy route alone still answers
        r = nginx_check(both, "https://shop.example.com/cart", **{"x-team": "shop"})
        assert r.status == 403
        assert ("listeners route this request differently (edge:edge/http: shop-envoy/all, "
                "forward-auth: shop/rule-0)") in r.body
    finally:
        both.close()


def test_serve_with_no_gateway_serves_the_decision_service(tmp_path, processes):
    d = write_policies(str(tmp_path / "p"), {"p.yaml": FORWARD_ONLY})
    serve = ServeProcess(d, str(tmp_path))
    processes[1].append(serve)
    serve.wait_started()
    status = serve.status()
    assert status["fleets"] == {} and status["last_reload_error"] is None
    port = int(serve.authz_http.rpartition(":")[2])
    r = request(port, "/authz", headers={"x-original-url": "https://shop.example.com/", "x-team": "shop"})
    assert (r.status, r.headers["x-policy"]) == (200, "shop")
    assert request(port, "/authz", headers={"x-original-url": "https://shop.example.com/"}).status == 401
    assert serve.stop() == 0


def test_the_forward_auth_recipe_needs_nothing_else(tmp_path):
    """policies/forward-auth alone (with the dev JWKS it names): no Gateway, Route for Envoy or
    Backend; by URL and by name, the same policy."""
    d = tmp_path / "policies"
    shutil.copytree(os.path.join(ROOT, "policies", "forward-auth"), d / "forward-auth")
    (d / "jwt").mkdir()
    shutil.copy(os.path.join(ROOT, "policies", "jwt", "dev-jwks.json"), d / "jwt")
    svc = ServiceThread(str(d))
    try:
        with open(os.path.join(ROOT, "authplane", "devtools", "dev-idp-key.pem"), "rb") as f:
            idp = DevIdentityProvider.from_pem(f.read(), issuer="http://127.0.0.1:9400", kid="authplane-dev-1")
        alice = {"authorization": f"Bearer {idp.mint(sub='alice', groups=['admins'])}"}
        for path in ("/authz", "/authz/team-app"):
            assert nginx_check(svc, "http://localhost:10080/", path=path).status == 401
            r = nginx_check(svc, "http://localhost:10080/", path=path, **alice)
            assert (r.status, r.headers["x-auth-request-user"]) == (200, "alice")
    finally:
        svc.close()
