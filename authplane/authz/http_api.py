"""The HTTP side of the decision service (aiohttp, low-level server, no router):

* ``/envoy/<policy>/<original path>``: Envoy's ext_authz in HTTP mode. Envoy sends the original
  method and path behind the per-route path prefix, the headers the rules read, and, from its own
  state, the client address and the verified JWT payload (headers Envoy always overwrites).
  ``/envoy-report/<policy>/...``: the same, with the decision log on (a denial names its rule in
  headers Envoy keeps from the client, ``contract.DENIED``).
* ``/authz/<policy>`` (or ``/authz`` with ``X-Authplane-Policy``): forward auth for ingress-nginx
  ``auth-url`` and Traefik ``forwardAuth``; the original request is described by
  ``X-Original-URL``/``X-Original-Method`` (nginx) or ``X-Forwarded-*`` (Traefik). Plain
  ``/authz``: the policy of the route Envoy would take for that host and path (``routing.py``).
* ``/oauth2/start``, ``/oauth2/callback``, ``/oauth2/sign_out`` and ``/oauth2/auth``: the
  oauth2-proxy contract, the decision service's own sign-in for policies with ``oidc``
  (``signin.py``); ``/oauth2/auth`` is forward auth answering 202 with the identity headers.
* ``/healthz`` and ``/metrics``.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import time
from collections.abc import Awaitable, Mapping
from http import HTTPStatus
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from multidict import CIMultiDict
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from authplane.authz.decider import Decider
from authplane.authz.evaluate import BROWSER, Decision, Request, deny, deny_report, shadow_report
from authplane.authz.rules import CompiledPolicy
from authplane.authz.signin import SignInError, SignInFlow, _jar, absolute, safe_redirect
from authplane.authz.tokens import InvalidToken
from authplane.contract import (
    BUILTIN_HTTP_PREFIX,
    BUILTIN_HTTP_REPORT_PREFIX,
    CLIENT_IP_HEADER,
    JWT_PAYLOAD_HEADER,
)

log = logging.getLogger("authplane.authz")
FORWARD_PREFIX = "/authz"
OAUTH2_PREFIX = "/oauth2/"
POLICY_HEADER = "x-authplane-policy"
REMOVE_HEADER = "x-envoy-auth-headers-to-remove"
"""Envoy (HTTP mode) removes the headers listed here from the upstream request."""
MAX_HEADER = 128 * 1024
"""Longest request line or header accepted: Envoy forwards headers up to its 60 KiB default
``max_request_headers_kb`` (aiohttp's own limit, 8,190 bytes, refused ordinary cookies)."""
MAX_HEADERS = 256
_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "upgrade",
                  "proxy-connection", "content-length"})


_AMBIGUOUS = re.compile(r";|\.(?:/|$)")


def normalize_path(path: str) -> str | None:
    """What Envoy does before routing (decode, backslash to slash, merge slashes, resolve dot
    segments): proxies without it pass the raw URI, and a path rule must not be dodged with
    ``/a/../admin``. None for what Envoy's guard route refuses: a path with a path parameter
    (``;``, ``%3B``) or a segment ending in a dot (``/a.``, ``/a./b``), which backends such as
    Tomcat or IIS serve as ``/a`` (see ``resources.AMBIGUOUS_PATH``)."""
    bare, sep, query = path.partition("?")
    decoded = unquote(bare).replace("\\", "/")
    clean = posixpath.normpath("/" + decoded.lstrip("/"))
    if clean != "/" and (decoded.endswith("/") or decoded.rpartition("/")[2] in (".", "..")):
        clean += "/"  # as Envoy: /a/ and /a/b/.. both become /a/
    clean = clean.replace("//", "/")
    return None if _AMBIGUOUS.search(clean) else clean + sep + query


def _client_ip(headers: Mapping[str, str], peer: str) -> str:
    real = headers.get("x-real-ip")
    if real:
        return real.strip()
    xff = headers.get("x-forwarded-for")
    return xff.rsplit(",", 1)[-1].strip() if xff else peer


def _response(d: Decision, extra: dict[str, str] | None = None) -> web.Response:
    if d.allow:
        headers = CIMultiDict(d.upstream)
        if d.remove:
            headers[REMOVE_HEADER] = ",".join(d.remove)
        headers.extend(d.headers)
        return web.Response(status=200, headers=headers)
    return web.Response(status=d.status, headers=CIMultiDict(d.headers), text=d.body or None)


def _redirect(location: str, cookies: list[str]) -> web.Response:
    headers = CIMultiDict({"location": location, "cache-control": "no-store"})
    for c in cookies:
        headers.add("set-cookie", c)
    return web.Response(status=302, headers=headers)


class _Protocol(web.RequestHandler):
    """aiohttp's connection handler, with errors (unparsable requests, timeouts) answered by a
    fixed text and logged as one line: aiohttp's own answer quotes the offending input and its
    log carries a traceback per bad request."""

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, LineTooLong):
            status = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
        if isinstance(exc, HttpProcessingError) or status < 500:
            log.info("bad HTTP request from %s: %d", request.remote, status)
        else:
            log.error("request from %s failed: %d (%s)", request.remote, status, type(exc).__name__)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        try:
            phrase = HTTPStatus(status).phrase.lower()
        except ValueError:
            phrase = "bad request"
        response = web.Response(status=status, text=f"authplane: {phrase}\n")
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> web.RequestHandler:
        return _Protocol(self, loop=self._loop, **self._kwargs)


def http_server(frontend: HttpFrontend) -> web.Server:
    """The low-level aiohttp server for ``frontend``, with header limits fit for what Envoy sends."""
    return _Server(frontend.handle, access_log=None, max_line_size=MAX_HEADER,
                   max_field_size=MAX_HEADER, max_headers=MAX_HEADERS)


class HttpFrontend:
    def __init__(self, decider: Decider) -> None:
        self.decider = decider
        self._envoy_timer = decider.metrics.timer("http")
        self._forward_timer = decider.metrics.timer("forward")
        self.signin = SignInFlow()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw = request.raw_path
        try:
            if raw.startswith((BUILTIN_HTTP_PREFIX, BUILTIN_HTTP_REPORT_PREFIX)):
                return self.envoy(request)
            if raw == FORWARD_PREFIX or raw.startswith((FORWARD_PREFIX + "/", FORWARD_PREFIX + "?")):
                return await self._timed_async(self._forward_timer, self.forward(request))
            if raw.startswith(OAUTH2_PREFIX):
                return await self.oauth2(request)
            if raw == "/healthz":
                return web.Response(text="ok\n")
            if raw == "/metrics":
                body = generate_latest(self.decider.metrics.registry)
                return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})
            return web.Response(status=404, text="authplane decision service: use /envoy/<policy>/"
                                                 "<path> (Envoy) or /authz/<policy> (forward auth)\n")
        except Exception:  # never crash on input; fail closed
            log.exception("check failed")
            self.decider.metrics.failed("http")
            return _response(deny("internal error in the decision service", 500))

    @staticmethod
    async def _timed_async(timer: Any, pending: Awaitable[web.Response]) -> web.Response:
        start = time.perf_counter()
        response = await pending
        timer.observe(time.perf_counter() - start)
        return response

    def _fresh(self, pol: CompiledPolicy, req: Request, key: bytes) -> Decision:
        """Decide a cache miss (``req.claims`` set) and remember the decision."""
        decision = self.decider.decide(pol, req)
        self.decider.remember(key, pol, decision, decision)
        return decision

    def envoy(self, request: web.BaseRequest) -> web.Response:
        start = time.perf_counter()
        report = request.raw_path.startswith(BUILTIN_HTTP_REPORT_PREFIX)  # the decision log is on
        prefix = BUILTIN_HTTP_REPORT_PREFIX if report else BUILTIN_HTTP_PREFIX
        name, _, rest = request.raw_path[len(prefix):].partition("/")
        pol = self.decider.policy(name)
        if isinstance(pol, Decision):
            return _response(pol)
        headers = request.headers
        payload = headers.get(JWT_PAYLOAD_HEADER, "")
        req = Request(method=request.method, path="/" + rest, headers=headers,
                      source=headers.get(CLIENT_IP_HEADER, ""), host=request.host,
                      scheme=headers.get("x-forwarded-proto", "http"), claims_raw=payload.encode())

        key, hit = self.decider.lookup(pol, req, "http")
        if hit is None:
            try:
                claims = json.loads(payload) if payload else None
            except ValueError:
                claims = None
            req.claims = claims if isinstance(claims, dict) else None
            hit = self._fresh(pol, req, key)
        self.decider.count(pol.name, hit)
        response = _response(hit)
        if hit.would_deny:  # Envoy turns these into dynamic metadata (dynamic_metadata_from_headers)
            response.headers.update(shadow_report(hit))
        elif report:  # the route keeps these from the client (contract.DENIED)
            response.headers.update(deny_report(pol.name, hit))
        self._envoy_timer.observe(time.perf_counter() - start)
        return response

    async def forward(self, request: web.BaseRequest, prefix: str = FORWARD_PREFIX,
                      auth: bool = False) -> web.Response:
        """Forward auth; ``auth``: ``/oauth2/auth`` (202 on allow, 401 without a session)."""
        h = request.headers
        name = request.path[len(prefix) + 1:] or h.get(POLICY_HEADER, "")
        pol = self.decider.policy(name) if name else None
        if isinstance(pol, Decision):
            return _response(pol)
        nginx = "x-original-url" in h
        if nginx:
            try:
                url = urlsplit(h["x-original-url"])
            except ValueError:  # e.g. an unclosed IPv6 literal: fail closed, without echoing it
                return _response(deny("malformed X-Original-URL", 400))
            method = h.get("x-original-method", "GET")
            scheme, host = url.scheme or "http", url.netloc
            path = url.path + (f"?{url.query}" if url.query else "")
        else:
            method = h.get("x-forwarded-method", request.method)
            scheme = h.get("x-forwarded-proto", "http")
            host = h.get("x-forwarded-host", h.get("host", ""))
            path = h.get("x-forwarded-uri", "/")
        headers = {k.lower(): v for k, v in h.items() if k.lower() not in _HOP}
        clean = normalize_path(path or "/")
        if clean is None:  # nginx auth_request turns any status but 401 and 403 into a 500
            return _response(deny("ambiguous path (a ';' or a segment ending in '.')", 403 if nginx else 400))
        if pol is None:  # no name: the route Envoy would take picks the policy
            if not host or not (nginx or ("x-forwarded-host" in h and "x-forwarded-uri" in h)):
                return _response(deny("no policy named and no original URL with a host (X-Original-URL, "
                                      "or X-Forwarded-Host and X-Forwarded-Uri)"))
            pol = self.decider.policy_for(host, clean.partition("?")[0], method.upper(), headers)
            if isinstance(pol, Decision):
                return _response(pol)
        req = Request(method=method.upper(), path=clean, headers=headers,
                      source=_client_ip(h, request.remote or ""), host=host, scheme=scheme)
        try:
            claims, set_cookie = await self.signin.session(pol, headers, scheme == "https")
        except SignInError as e:  # the session store is down: its status, never an allow
            return _response(deny(str(e), e.status))
        key, hit = self.decider.lookup(pol, req, "forward")
        signed_in = claims is not None
        if pol.signin is not None and not signed_in and hit is not None and hit.allow and "cookie" in headers:
            hit = None  # allowed with a session that has ended since (signed out, expired)
        if hit is None:
            verifier = self.decider.verifier(pol)
            try:
                req.claims = claims
                if req.claims is None and verifier:
                    req.claims = await verifier.verify(headers, urlsplit(req.path).query)
            except InvalidToken as e:
                challenge = f'Bearer realm="{pol.name}", error="invalid_token"'
                hit = Decision(False, "", e.status, f"authplane: {e}\n",
                               (("www-authenticate", challenge),), reason=str(e))
            else:
                hit = self._fresh(pol, req, key)
        self.decider.count(pol.name, hit)
        if pol.signin is not None and not hit.allow and not signed_in:
            hit = self._sign_in_answer(pol, hit, req, nginx or auth)
        response = self._forward_answer(hit, nginx)
        if auth and hit.allow:
            response.set_status(202)
        for cookie in set_cookie:  # a renewed or ended session (nginx: auth_request_set)
            response.headers.add("set-cookie", cookie)
        return response

    @staticmethod
    def _sign_in_answer(pol: CompiledPolicy, d: Decision, req: Request, api: bool) -> Decision:
        """No session: 401 for ``/oauth2/auth``, nginx and API clients (XHR, no ``text/html``);
        browsers behind Traefik (which passes the answer through) go to sign in."""
        xhr = req.headers.get("x-requested-with", "").lower() == "xmlhttprequest"
        if api or xhr or BROWSER not in req.headers.get("accept", ""):
            headers = tuple((k, v) for k, v in d.headers if k != "location")
            if not any(k == "www-authenticate" for k, _ in headers):
                headers += (("www-authenticate", f'Bearer realm="{pol.name}"'),)
            return Decision(False, d.rule, 401, d.body if d.status == 401 else "authplane: sign in\n",
                            headers, reason=d.reason)
        if d.status == 302:
            return d
        start = f"{req.scheme}://{req.host}/oauth2/start?rd={quote(req.url(), safe='', errors='surrogateescape')}"
        return Decision(False, d.rule, 302, "", (("location", start),), reason=d.reason)

    async def oauth2(self, request: web.BaseRequest) -> web.Response:
        action, _, name = request.path[len(OAUTH2_PREFIX):].partition("/")
        if action == "auth":
            return await self._timed_async(self._forward_timer, self.forward(request, "/oauth2/auth", auth=True))
        h = request.headers
        scheme = h.get("x-forwarded-proto", request.scheme)
        host = h.get("x-forwarded-host", request.host)
        base, secure, jar = f"{scheme}://{host}", scheme == "https", _jar(h)
        rd = request.query.get("rd", "")
        try:
            if action == "callback":
                return await self._callback(request, jar, secure)
            if action not in ("start", "sign_out"):
                return web.Response(status=404, text="authplane: unknown /oauth2/ endpoint\n")
            pol = self._signin_policy(name or h.get(POLICY_HEADER, ""), absolute(base, rd or "/"))
            assert pol.signin is not None
            target = safe_redirect(pol.signin, rd or "/", host)
            if target is None:
                raise SignInError("rd must point to a host under the cookie domain")
            if action == "start":
                location, cookies = self.signin.start(pol, base, absolute(base, target), jar, secure)
            else:
                location, cookies = await self.signin.sign_out(pol, target, jar, secure)
        except SignInError as e:
            return web.Response(status=e.status, text=f"authplane: {e}\n")
        return _redirect(location, cookies)

    def _signin_policy(self, name: str, url: str) -> CompiledPolicy:
        """The policy named, else the one the route table gives for ``url``, else the only policy
        with sign-in."""
        if name:
            pol = self.decider.policy(name)
        else:
            parts = urlsplit(url)
            pol = self.decider.policy_for(parts.netloc, normalize_path(parts.path or "/") or "/", "GET", {})
            if isinstance(pol, Decision) or pol.signin is None:
                only = [p for p in self.decider.table.policies.values() if p.signin]
                pol = only[0] if len(only) == 1 else pol
        if isinstance(pol, Decision) or pol.signin is None:
            raise SignInError("no policy with oidc sign-in for this URL (name it: /oauth2/<action>/<policy>)")
        return pol

    async def _callback(self, request: web.BaseRequest, jar: Mapping[str, str], secure: bool) -> web.Response:
        for pol in self.decider.table.policies.values():
            flow = self.signin.pending(pol, jar) if pol.signin else None
            if flow is None:
                continue
            own = self.decider.table.policies.get(str(flow.get("policy")))
            if own is None or own.signin is None:
                break
            location, cookies = await self.signin.callback(own, flow, request.query, jar, secure)
            return _redirect(location, cookies)
        raise SignInError("no sign-in in progress (cookies blocked, or it took too long): start again")

    @staticmethod
    def _forward_answer(d: Decision, nginx: bool) -> web.Response:
        if nginx and d.status == 302:
            # nginx auth_request understands only 2xx, 401 and 403: the auth-signin annotation
            # redirects browsers instead.
            d = Decision(False, d.rule, 401, d.body,
                         tuple((k, v) for k, v in d.headers if k != "location"), reason=d.reason)
        return _response(d)
