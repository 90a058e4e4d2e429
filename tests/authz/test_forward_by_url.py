"""Forward auth without a policy name: the policy of the route Envoy would take for the original
host and path, through the real HTTP endpoint (and a real nginx when installed)."""

from __future__ import annotations

import subprocess
import time

import pytest

from authplane.authz.rules import compile_table
from authplane.authz.workers import start_workers
from authplane.policy.loader import load_dir
from tests.authz.test_authz_nginx import CONFIG, NGINX
from tests.support.http import request
from tests.support.policies import write_policies
from tests.support.ports import closed_port
from tests.support.processes import ServiceThread
from tests.support.traefik import Traefik, traefik


def _route(name: str, hosts: str, match: str) -> str:
    return f"""kind: Route
metadata: {{name: {name}}}
spec: {{gateway: edge, hostnames: {hosts}, rules: [{{name: r, match: {match}, backend: app}}]}}"""


def _builtin(name: str, team: str) -> str:
    return f"""kind: AuthPolicy
metadata: {{name: {name}}}
spec:
  targetRef: {{kind: Route, name: {name}}}
  extAuth:
    service: builtin
    rules:
      - {{name: team, action: allow, when: {{headers: {{x-team: [{team}]}}}}, upstreamHeaders: {{x-policy: {name}}}}}
      - {{name: rest, action: deny, deny: {{status: 401, body: "{name} says no"}}}}"""


POLICIES = "\n---\n".join([
    "kind: Gateway\nmetadata: {name: edge}\nspec: {fleet: edge, listeners: [{name: http, port: 8080}]}",
    'kind: Backend\nmetadata: {name: app}\nspec: {endpoints: ["127.0.0.1:9"]}',
    _route("shop", "[shop.example.com]", "{pathPrefix: /}"), _builtin("shop", "shop"),
    _route("blog", "[blog.example.com]", "{pathPrefix: /}"), _builtin("blog", "blog"),
    _route("blog-admin", "[blog.example.com]", "{pathPrefix: /admin}"), _builtin("blog-admin", "admins"),
    _route("wild", '["*.example.com"]', "{pathPrefix: /}"), _builtin("wild", "wild"),
    _route("open", "[open.example.org]", "{path: /health}"),
    "kind: AuthPolicy\nmetadata: {name: open}\nspec: {targetRef: {kind: Route, name: open}, public: true}",
    _route("native", "[native.example.org]", "{pathPrefix: /}"),
    "kind: AuthPolicy\nmetadata: {name: native}\nspec: {targetRef: {kind: Route, name: native}, "
    "authorization: {default: allow}}",
])


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    d = write_policies(str(tmp_path_factory.mktemp("forward-by-url")), {"p.yaml": POLICIES})
    svc = ServiceThread(d)
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, service):
    """A real Traefik in front of an echo upstream, its forwardAuth address plain ``/authz``."""
    from authplane.devtools.echo import EchoServer

    echo = EchoServer().start()
    try:
        with traefik(str(tmp_path_factory.mktemp("traefik")), {"plain": f"http://127.0.0.1:{service.svc.http_port}/authz"},
                     echo.port, ["X-Policy"]) as t:
            yield t
    finally:
        echo.stop()


def nginx_check(svc: ServiceThread, url: str, path: str = "/authz", **headers: str):
    return request(svc.svc.http_port, path, host="authplane.auth.svc", headers={
        "x-original-url": url, "x-original-method": "GET", "x-real-ip": "203.0.113.7", **headers})


def traefik_check(proxy: Traefik, host: str, uri: str, **headers: str):
    """GET ``uri`` on ``host`` through the real Traefik (an allowed request's headers are those the
    upstream received)."""
    return proxy.send("plain", uri, host=host, headers={"x-forwarded-proto": "https", **headers})


def test_two_hosts_two_policies(service, proxy):
    r = nginx_check(service, "https://shop.example.com/cart", **{"x-team": "shop"})
    assert (r.status, r.headers["x-policy"]) == (200, "shop")
    r = nginx_check(service, "https://shop.example.com/cart", **{"x-team": "blog"})
    assert (r.status, r.body) == (401, "shop says no")
    r = traefik_check(proxy, "blog.example.com", "/post/1", **{"x-team": "blog"})
    assert (r.status, r.headers["x-policy"]) == (200, "blog")
    assert traefik_check(proxy, "blog.example.com", "/post/1", **{"x-team": "shop"}).body == "blog says no"


def test_route_order_is_envoys(service, proxy):
    """The longer prefix wins, on whole segments; the port and the letter case of the host do not
    count; a suffix wildcard takes the other hosts under it."""
    r = nginx_check(service, "http://BLOG.example.com:8443/admin/users", **{"x-team": "admins"})
    assert (r.status, r.headers["x-policy"]) == (200, "blog-admin")
    assert nginx_check(service, "http://blog.example.com/admin", **{"x-team": "blog"}).body == "blog-admin says no"
    r = nginx_check(service, "http://blog.example.com/administrator", **{"x-team": "blog"})
    assert (r.status, r.headers["x-policy"]) == (200, "blog")
    r = nginx_check(service, "http://blog.example.com/x/../admin/y", **{"x-team": "blog"})
    assert r.body == "blog-admin says no"  # normalised before the route is picked
    r = traefik_check(proxy, "news.example.com", "/", **{"x-team": "wild"})
    assert (r.status, r.headers["x-policy"]) == (200, "wild")


def test_naming_a_policy_still_wins(service):
    r = nginx_check(service, "https://shop.example.com/cart", path="/authz/blog", **{"x-team": "blog"})
    assert (r.status, r.headers["x-policy"]) == (200, "blog")
    r = nginx_check(service, "https://shop.example.com/cart", **{"x-authplane-policy": "blog", "x-team": "blog"})
    assert (r.status, r.headers["x-policy"]) == (200, "blog")


def test_fails_closed(service):
    r = nginx_check(service, "https://unknown.example.org/x", **{"x-team": "shop"})
    assert r.status == 403 and "no route for this host and path" in r.body
    r = nginx_check(service, "http://open.example.org/health")
    assert r.status == 403 and "route open/r is public" in r.body
    r = nginx_check(service, "http://open.example.org/other")
    assert r.status == 403 and "no route" in r.body
    r = nginx_check(service, "http://native.example.org/")
    assert r.status == 403 and "policy 'native' (route level) has no builtin extAuth rules" in r.body
    r = request(service.svc.http_port, "/authz", host="shop.example.com", headers={"x-team": "shop"})
    assert r.status == 403 and "no original URL" in r.body
    assert "no original URL" in nginx_check(service, "/cart", **{"x-team": "shop"}).body  # no host in it


def test_in_a_worker_process(tmp_path):
    """``serve`` decides in worker processes: the route table travels with the rules."""
    table = compile_table(load_dir(write_policies(str(tmp_path / "p"), {"p.yaml": POLICIES})), "v1")
    pool = start_workers(1, None, "127.0.0.1:0", table)
    try:
        port = int(pool.http_addr.rsplit(":", 1)[1])
        r = request(port, "/authz", headers={"x-original-url": "https://blog.example.com/admin/", "x-team": "admins"})
        assert (r.status, r.headers["x-policy"]) == (200, "blog-admin")
        assert request(port, "/authz", headers={"x-original-url": "https://nowhere.example.org/"}).status == 403
    finally:
        pool.stop()


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: nginx-light)")
def test_real_nginx_with_plain_authz(tmp_path, echo, service):
    """ingress-nginx's auth-url pointing at plain /authz: the host picks the policy."""
    port = closed_port()
    conf = tmp_path / "nginx.conf"
    text = CONFIG.format(tmp=tmp_path, port=port, authz=service.svc.http_port, echo=echo.port)
    conf.write_text(text.replace("/authz/sso;", "/authz;"))
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(tmp_path)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                request(port, "/", host="shop.example.com")
                break
            except OSError:
                time.sleep(0.05)
        assert request(port, "/cart", host="shop.example.com", headers={"x-team": "shop"}).status == 200
        r = request(port, "/cart", host="shop.example.com", headers={"x-team": "blog"})
        assert r.status == 302 and r.headers["location"].startswith("https://auth.example.com/")  # 401 → sign-in
        assert request(port, "/post", host="blog.example.com", headers={"x-team": "blog"}).status == 200
        assert request(port, "/post", host="elsewhere.example.org", headers={"x-team": "blog"}).status == 403
    finally:
        proc.terminate()
        proc.wait(10)
