"""A certified OpenID provider written by others (npm ``oidc-provider``, installed by ``.ci/run``
into tests/support/oidc-provider/) on loopback, started and stopped by PID, and signing in to it
with the ``Browser`` of tests/support/oidc.py (its development login and consent pages)."""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tests.support.http import Response
from tests.support.oidc import Browser, _Form
from tests.support.ports import free_port

FOLDER = os.path.join(os.path.dirname(__file__), "oidc-provider")
SCRIPT = os.path.join(FOLDER, "provider.mjs")


def missing() -> str | None:
    """Why the provider cannot run here (for a skip), or None. Installs it (``npm ci``, pinned by
    the lock file; once, under a lock, as test processes run in parallel) where npm exists, so the
    README's test command needs no step of its own."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node and npm are not installed"
    installed = os.path.join(FOLDER, "node_modules", "oidc-provider")
    with open(os.path.join(FOLDER, ".install.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isdir(installed):
            done = subprocess.run(["npm", "ci", "--prefix", FOLDER, "--no-audit", "--no-fund", "--loglevel=error"],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                return f"npm ci in {FOLDER} failed: {done.stderr.strip()[-500:]}"
    return None


@dataclass
class Client:
    client_id: str
    client_secret: str
    redirect_uris: list[str]
    post_logout_redirect_uris: list[str]
    token_endpoint_auth_method: str = "client_secret_post"


@contextmanager
def certified_provider(clients: list[Client], accounts: dict[str, dict[str, object]],
                       require_token_auth: str | None = None) -> Iterator[str]:
    """Start the provider on 127.0.0.1 with these clients and accounts (sub → claims); yields its
    issuer URL once it prints that it listens. ``require_token_auth`` (``client_secret_basic`` or
    ``client_secret_post``): refuse token requests sending the client secret the other way, as
    stricter providers do (oidc-provider itself takes both)."""
    config = {"port": free_port(), "clients": [vars(c) for c in clients], "accounts": accounts,
              "requireTokenAuth": require_token_auth}
    proc = subprocess.Popen(["node", SCRIPT, json.dumps(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=FOLDER)
    try:
        assert proc.stdout is not None
        deadline, line = time.monotonic() + 30, b""
        while not line.endswith(b"\n") and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 0.2)[0]:
                line += os.read(proc.stdout.fileno(), 4096)
        if not line.startswith(b"ready "):
            proc.kill()
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise AssertionError(f"oidc-provider did not start: {line!r} {err[-2000:]}")
        yield line.split()[1].decode()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe:
                pipe.close()


def _submit(browser: Browser, page: Response, page_url: str, fields: dict[str, str]) -> tuple[Response, str]:
    """Post the page's first form with ``fields`` added and follow the redirects; the final
    response and its URL."""
    form = _Form()
    form.feed(page.body)
    action = urllib.parse.urljoin(page_url, form.action or page_url)
    r = browser.request(action, method="POST", body=urllib.parse.urlencode({**form.fields, **fields}),
                        headers={"content-type": "application/x-www-form-urlencoded", "accept": "text/html"})
    assert r.status in (302, 303), (r.status, r.body[:500])
    r = browser.get(urllib.parse.urljoin(action, r.headers["location"]))
    return r, browser.history[-1][0]


def sign_in(browser: Browser, url: str, login: str) -> Response:
    """Navigate to ``url``, get sent to the provider, sign in as ``login`` and consent to what the
    client asks; the final response (from the app, back through Envoy)."""
    page = browser.get(url)
    where = browser.history[-1][0]
    assert page.status == 200 and 'name="login"' in page.body, browser.history
    page, where = _submit(browser, page, where, {"login": login, "password": "any"})
    if 'name="prompt" value="consent"' in page.body:
        page, where = _submit(browser, page, where, {})
    return page
