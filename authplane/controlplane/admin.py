"""The admin HTTP endpoint (``/`` the status page, ``/status``, ``/metrics``, ``/healthz``, ``/readyz``)
and ``authplane status``.

``/healthz`` is liveness (the process answers); ``/readyz`` is 503 until a valid policy revision
is served (``serve --allow-empty`` on a broken directory), 200 from then on."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from importlib.resources import files
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from authplane.addresses import split_address

log = logging.getLogger("authplane.admin")

StatusFn = Callable[[], Awaitable[dict[str, Any]]]
DECISIONS = "authplane_authz_decisions"
"""The decision service's counter (``authz/metrics.py``), summed per policy for ``/status``."""


def _page() -> tuple[bytes, str]:
    """The status page (one file, no external assets) and its Content-Security-Policy: only its
    own inline script (by hash) runs, and it can only fetch from this origin."""
    html = files("authplane.controlplane").joinpath("status.html").read_text(encoding="utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
                      for s in scripts)
    csp = (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; connect-src 'self'; "
           "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html.encode(), csp


def printable(text: str) -> str:
    """``text`` with control and other non-printable characters escaped (``\\x1b``, ``\\n``):
    what clients send (node ids, Envoy's error details) cannot move the cursor or fake rows."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class AdminServer:
    """A component of ``serve`` (see ``app.Component``). ``registries`` are concatenated on
    ``/metrics``; components that bring their own registry append theirs."""

    def __init__(self, address: str, status: StatusFn, registries: list[CollectorRegistry],
                 ready: Callable[[], bool] = lambda: True) -> None:
        self.requested = address
        self.address = address
        self.registries = registries
        self._status = status
        self._ready = ready
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        host, port = split_address(self.requested)
        app = web.Application()
        self._page, self._csp = _page()
        app.router.add_get("/", self._get_page)
        app.router.add_get("/status", self._get_status)
        app.router.add_get("/metrics", self._get_metrics)
        app.router.add_get("/healthz", self._get_healthz)
        app.router.add_get("/readyz", self._get_readyz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except OSError as e:
            await runner.cleanup()
            raise OSError(f"cannot listen on {self.requested} (admin): {e.strerror}") from None
        bound = runner.addresses[0]
        self.address = f"{host}:{bound[1]}"
        self._runner = runner
        log.info("admin (/ status page, /status, /metrics, /healthz, /readyz) on http://%s", self.address)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _get_page(self, request: web.Request) -> web.Response:
        return web.Response(body=self._page, content_type="text/html", charset="utf-8", headers={
            "Content-Security-Policy": self._csp, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})

    async def _get_status(self, request: web.Request) -> web.Response:
        doc = {**await self._status(), "decisions": self.decisions()}
        return web.json_response(doc, dumps=lambda d: json.dumps(d, indent=2) + "\n",
                                 headers={"Cache-Control": "no-store"})

    def decisions(self) -> dict[str, dict[str, float]]:
        """Decisions so far per policy and result (``{"app": {"allow": 3, "deny": 1}}``), summed
        over rules, from whichever registry holds the decision service's counter: its own
        in-process, the workers' multiprocess collector otherwise. Rates are differences of these."""
        totals: dict[str, dict[str, float]] = {}
        for registry in self.registries:
            for metric in registry.collect():
                if metric.name != DECISIONS:
                    continue
                for sample in metric.samples:
                    if sample.name == f"{DECISIONS}_total":
                        per = totals.setdefault(sample.labels.get("policy", ""), {"allow": 0.0, "deny": 0.0})
                        result = sample.labels.get("result", "")
                        per[result] = per.get(result, 0.0) + sample.value
        return dict(sorted(totals.items()))

    async def _get_metrics(self, request: web.Request) -> web.Response:
        body = b"".join(generate_latest(r) for r in self.registries)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _get_healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _get_readyz(self, request: web.Request) -> web.Response:
        if self._ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready: no valid policy revision loaded yet\n")


# -- authplane status ------------------------------------------------------------------------

TYPES = ("clusters", "endpoints", "listeners", "routes")


def fetch_status(address: str, timeout: float = 5) -> dict[str, Any]:
    """GET /status; OSError with a one-line message if the server cannot be reached."""
    url = f"http://{address}/status"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise OSError(f"{url} answered {e.code}") from None
    except urllib.error.URLError as e:
        raise OSError(f"cannot reach {url}: {getattr(e.reason, 'strerror', None) or e.reason}") from None
    except (OSError, ValueError) as e:
        raise OSError(f"cannot read {url}: {e}") from None


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    cells = [[printable(str(c)) for c in row] for row in (header, *rows)]
    widths = [max(len(c) for c in col) for col in zip(*cells, strict=False)]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in cells]


def _acked(node: dict[str, Any]) -> str:
    acked = {t: v for t, v in node["acked"].items() if v}
    versions = set(acked.values())
    if len(versions) == 1 and len(acked) == len(node["acked"]):
        return versions.pop()
    return " ".join(f"{t}={v or '-'}" for t, v in node["acked"].items()) or "-"


def _shadow_lines(shadow: dict[str, Any] | None) -> list[str]:
    """Policies in shadow (``serve --decision-log``): what each would have denied, and whom."""
    if not shadow:
        return []
    lines = ["", "SHADOW policies (would deny, as Envoys reported; rate: of the requests each one checked):"]
    lines += table(("POLICY", "WOULD DENY", "DECISIONS", "RATE", "TOP IDENTITIES"),
                   [(p, str(s["would_deny"]), str(s["decisions"]), f"{s['rate']:.1%}",
                     ", ".join(f"{i['identity']} ({i['would_deny']})" for i in s["top_identities"][:3]) or "-")
                    for p, s in shadow.items()])
    return lines


def format_status(doc: dict[str, Any]) -> str:
    """The ``authplane status`` table: fleets, the last reload, and one row per node."""
    git = doc.get("git")
    lines = [f"policies: {doc['policy_dir']}" + (f" (git {git})" if git else "") +
             f"; xDS on {doc['xds']}"]
    fleets = doc["fleets"]
    lines += table(("FLEET", "VERSION", *(t.upper() for t in TYPES)),
                   [(f, info["version"], *(str(info["resources"][t]) for t in TYPES))
                    for f, info in fleets.items()]) if fleets else ["no fleets (nothing valid loaded yet)"]
    error = doc.get("last_reload_error")
    if error:
        lines.append(f"last change REJECTED at {error['at']} (still serving the versions above):")
        lines += [f"  {p}" for p in error["problems"]]
    elif doc.get("last_reload_at"):
        lines.append(f"last reload: ok at {doc['last_reload_at']}")
    refused = doc.get("refused") or []
    if refused:
        lines.append("")
        lines.append("REFUSED xDS streams (fleet: not named by the client certificate, nothing sent; "
                     "limit: a bound exceeded):")
        lines += table(("NODE", "FLEET", "REASON", "TIMES", "LAST", "PEER"),
                       [(r["id"] or "-", r["fleet"] or "-", r["reason"], str(r["count"]), r["last_at"], r["peer"])
                        for r in refused])
        lines += [f"  {printable(r['id'] or '-')}: {printable(r['message'])}" for r in refused]
    lines += _shadow_lines(doc.get("shadow"))
    nodes = doc["nodes"]
    lines.append("")
    if not nodes:
        lines.append("no Envoy has connected")
        return "\n".join(lines) + "\n"
    rows = [(n["id"], n["fleet"] + ("" if n["known_fleet"] else " (unknown)"), n["protocol"], n["state"],
             _acked(n), n["connected_since"] if n["connected"] else f"gone {n['disconnected_at']}")
            for n in nodes]
    lines += table(("NODE", "FLEET", "PROTOCOL", "STATE", "ACKED VERSION", "CONNECTED SINCE"), rows)
    for n in nodes:
        node_id = printable(n["id"])
        if n.get("state") == "waiting":
            lines.append(f"{node_id}: sent nothing yet (no valid policy revision loaded); it keeps what it runs")
        for other in n.get("other_streams", ()):
            lines.append(f"{node_id}: another stream claims this id ({printable(other['protocol'])} from "
                         f"{printable(other['peer'])} since {other['connected_since']}); not shown above")
        rej = n.get("last_rejection")
        if rej:
            lines.append(f"{node_id}: {'REJECTS' if rej['active'] else 'rejected (resolved)'} "
                         f"{printable(rej['type'])} of version {rej['version']} at {rej['at']}:")
            lines.append(f"  envoy: {printable(rej['error_detail'])}")
            lines += [f"  from {printable(s)}" for s in rej["sources"]]
    return "\n".join(lines) + "\n"
