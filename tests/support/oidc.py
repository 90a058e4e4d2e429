"""Browser sign-in: a real OpenID provider (oidc-provider-mock) on loopback, and a browser-like HTTP
client that follows redirects and keeps cookies, for sign-in flows through a real Envoy."""

from __future__ import annotations

import html.parser
import http.client
import json
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tests.support.http import Response


@contextmanager
def oidc_provider(**options: object) -> Iterator[str]:
    """Start oidc-provider-mock on 127.0.0.1 (OS-chosen port); yields its issuer URL. Any client ID
    and secret are accepted; users sign in with the form (``sub``) and get the claims set with
    ``set_user``. ``options``: for ``oidc_provider_mock.app`` (``access_token_max_age`` ...)."""
    import oidc_provider_mock
    import werkzeug.serving

    server = werkzeug.serving.make_server("127.0.0.1", 0, oidc_provider_mock.app(**options), threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def set_user(issuer: str, sub: str, claims: dict[str, object]) -> None:
    parts = urllib.parse.urlsplit(issuer)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("PUT", f"/users/{urllib.parse.quote(sub, safe='')}", body=json.dumps(claims),
                     headers={"content-type": "application/json"})
        r = conn.getresponse()
        r.read()
        assert r.status == 204, r.status
    finally:
        conn.close()


@dataclass
class Cookie:
    name: str
    value: str
    domain: str  # without a leading dot
    host_only: bool


@dataclass
class Browser:
    """Sends every request for a host ending in ``domain`` to Envoy's port (like a hosts file),
    everything else to the URL's own address; keeps cookies by domain (Secure cookies too: the test
    runs on plain HTTP on loopback)."""

    envoy_port: int
    domain: str = ".localtest"
    cookies: dict[tuple[str, str], Cookie] = field(default_factory=dict)
    history: list[tuple[str, int]] = field(default_factory=list)

    def _cookie_header(self, host: str) -> str:
        found = [c for c in self.cookies.values()
                 if host == c.domain or (not c.host_only and host.endswith("." + c.domain))]
        return "; ".join(f"{c.name}={c.value}" for c in found)

    def _store(self, host: str, set_cookie: str) -> None:
        first, *attrs = [a.strip() for a in set_cookie.split(";")]
        name, _, value = first.partition("=")
        options = {k.lower(): v for k, _, v in (a.partition("=") for a in attrs)}
        domain = options.get("domain", "").lstrip(".").lower()
        key = (domain or host, name)
        expired = "expires=thu, 01 jan 1970" in set_cookie.lower() or options.get("max-age") == "0"
        if expired:
            self.cookies.pop(key, None)
        else:
            self.cookies[key] = Cookie(name, value, domain or host, not domain)

    def request(self, url: str, method: str = "GET", headers: dict[str, str] | None = None,
                body: str | None = None) -> Response:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = self.envoy_port if host.endswith(self.domain) else parts.port or 80
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        sent = {"host": parts.netloc, **(headers or {})}
        cookie = self._cookie_header(host)
        if cookie:
            sent["cookie"] = cookie
        try:
            conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=body, headers=sent)
            r = conn.getresponse()
            data = r.read().decode(errors="replace")
        finally:
            conn.close()
        for k, v in r.getheaders():
            if k.lower() == "set-cookie":
                self._store(host, v)
        self.history.append((url, r.status))
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, data)

    def get(self, url: str, headers: dict[str, str] | None = None, follow: bool = True) -> Response:
        """GET as a browser navigating (``Accept: text/html``), following redirects."""
        r = self.request(url, headers={"accept": "text/html,application/xhtml+xml", **(headers or {})})
        for _ in range(10):
            if not follow or r.status not in (301, 302, 303, 307) or "location" not in r.headers:
                return r
            url = urllib.parse.urljoin(url, r.headers["location"])
            r = self.request(url, headers={"accept": "text/html"})
        raise AssertionError(f"redirect loop: {self.history[-10:]}")

    def submit_login(self, page: Response, page_url: str, sub: str) -> Response:
        """Fill the provider's sign-in form with ``sub`` and follow the redirects back."""
        form = _Form()
        form.feed(page.body)
        action = urllib.parse.urljoin(page_url, form.action or page_url)
        fields = {**form.fields, "sub": sub, "action": "authorize"}
        r = self.request(action, method="POST", body=urllib.parse.urlencode(fields),
                         headers={"content-type": "application/x-www-form-urlencoded", "accept": "text/html"})
        assert r.status in (302, 303), (r.status, r.body[:500])
        return self.get(urllib.parse.urljoin(action, r.headers["location"]))


class _Form(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form" and self.action is None:
            self.action = a.get("action") or ""
        elif tag == "input" and a.get("type") == "hidden" and a.get("name"):
            self.fields[a["name"] or ""] = a.get("value") or ""
