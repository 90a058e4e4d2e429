"""The HTTP side of the decision service (aiohttp, low-level server, no router):

* ``/envoy/<policy>/<original path>``: Envoy's ext_authz in HTTP mode. Envoy sends the original
  method and path behind the per-route path prefix, the headers the rules read, and, from its own
  state, the client address and the verified JWT payload (headers Envoy always overwrites).
* ``/authz/<policy>`` (or ``/authz`` with ``X-Authplane-Policy``): forward auth for ingress-nginx
  ``auth-url`` and Traefik ``forwardAuth``; the original request is described by
  ``X-Original-URL``/``X-Original-Method`` (nginx) or ``X-Forwarded-*`` (Traefik). Plain
  ``/authz``: the policy of the route Envoy would take for that host and path (``routing.py``).
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
from urllib.parse import unquote, urlsplit

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from multidict import CIMultiDict
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from authplane.authz.decider import Decider
from authplane.authz.evaluate import Decision, Request, deny, shadow_report
from authplane.authz.rules import CompiledPolicy
from authplane.authz.tokens import InvalidToken
from authplane.contract import BUILTIN_HTTP_PREFIX, CLIENT_IP_HEADER, JWT_PAYLOAD_HEADER

log = logging.getLogger("authplane.authz")
FORWARD_PREFIX = "/authz"
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

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw = request.raw_path
        try:
            if raw.startswith(BUILTIN_HTTP_PREFIX):
                return self.envoy(request)
            if raw == FORWARD_PREFIX or raw.startswith((FORWARD_PREFIX + "/", FORWARD_PREFIX + "?")):
                return await self._timed_async(self._forward_timer, self.forward(request))
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
        name, _, rest = request.raw_path[len(BUILTIN_HTTP_PREFIX):].partition("/")
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
        self._envoy_timer.observe(time.perf_counter() - start)
        return response

    async def forward(self, request: web.BaseRequest) -> web.Response:
        h = request.headers
        name = request.path[len(FORWARD_PREFIX) + 1:] or h.get(POLICY_HEADER, "")
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
        key, hit = self.decider.lookup(pol, req, "forward")
        if hit is None:
            verifier = self.decider.verifier(pol)
            try:
                req.claims = await verifier.verify(headers, urlsplit(req.path).query) if verifier else None
            except InvalidToken as e:
                challenge = f'Bearer realm="{pol.name}", error="invalid_token"'
                hit = Decision(False, "", e.status, f"authplane: {e}\n",
                               (("www-authenticate", challenge),), reason=str(e))
            else:
                hit = self._fresh(pol, req, key)
        self.decider.count(pol.name, hit)
        return self._forward_answer(hit, nginx)

    @staticmethod
    def _forward_answer(d: Decision, nginx: bool) -> web.Response:
        if nginx and d.status == 302:
            # nginx auth_request understands only 2xx, 401 and 403: the auth-signin annotation
            # redirects browsers instead.
            d = Decision(False, d.rule, 401, d.body,
                         tuple((k, v) for k, v in d.headers if k != "location"), reason=d.reason)
        return _response(d)
