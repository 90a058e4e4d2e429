"""``/oauth2/auth`` checks per second with a signed-in session, per decision process.

    python bench/signin.py [--duration 5] [--connections 32] [--only cookie,redis] [--workers 1]

One decision process (``python -m authplane.authz``, one worker) with two sign-in policies, one
keeping sessions in cookies, one in a real Redis (Debian ``redis-server``, started here on
loopback, no persistence). A browser signs in once per policy at oidc-provider-mock; wrk then
replays its cookies as nginx's ``auth_request`` would (``X-Original-URL``), HTTP/1.1 keep-alive.

Scenarios:
  cookie           a small cookie session (3 groups): decrypt, decide (decision cache hit)
  cookie-4kb       200 long group names: the session in two cookie chunks
  cookie-nocache   small cookie session, decision cache off (allowTtl: 0s)
  redis            the cookie is a ticket: one Redis GET and decrypt per check
  redis-4kb        200 groups in the Redis value

Everything shares this machine's cores (wrk, Redis and the decision process); the target is
5,000 checks/s per process for cookie sessions. Installs wrk (Debian) when missing.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.authz import DecisionService, wrk  # noqa: E402
from tests.support.oidc import Browser, oidc_provider, set_user  # noqa: E402
from tests.support.policies import write_policies  # noqa: E402
from tests.support.redis import start_redis  # noqa: E402

SCENARIOS = ["cookie", "cookie-4kb", "cookie-nocache", "redis", "redis-4kb"]
BIG = [f"team-{i:04d}-with-a-long-name" for i in range(200)] + ["admins"]


def _policy(name: str, host: str, issuer: str, session: str, cache: str) -> str:
    return f"""
        ---
        kind: Route
        metadata: {{name: {name}}}
        spec: {{gateway: edge, hostnames: [{host}], rules: [{{name: main, match: {{pathPrefix: /}}, backend: app}}]}}
        ---
        kind: AuthPolicy
        metadata: {{name: {name}}}
        spec:
          targetRef: {{kind: Route, name: {name}}}
          oidc:
            issuer: {issuer}
            clientId: bench
            clientSecret: {{file: secret.txt}}
            scopes: [openid, email, groups]
            cookie: {{prefix: {name.replace("-", "_")}}}
            sessionKeys: [{{file: key.txt}}]
            session: {session}
          extAuth:
            service: builtin
            {cache}
            rules:
              - {{name: sign-in, action: deny, when: {{authenticated: false}}, deny: {{status: 401}}}}
              - {{name: admins, action: allow, when: {{claims: {{groups: [admins]}}}}}}
              - {{name: others, action: deny, deny: {{status: 403}}}}
        """


def policies(issuer: str, redis_url: str) -> dict[str, str]:
    text = """
        kind: Gateway
        metadata: {name: edge}
        spec: {fleet: edge, listeners: [{name: http, port: 8080}]}
        ---
        kind: Backend
        metadata: {name: app}
        spec: {endpoints: ["127.0.0.1:9"]}
        """
    redis = f"{{store: redis, url: '{redis_url}'}}"
    for name in SCENARIOS:
        store = redis if name.startswith("redis") else "{store: cookie}"
        cache = "cache: {allowTtl: 0s}" if name.endswith("nocache") else ""
        text += _policy(name, f"{name}.localtest", issuer, store, cache)
    return {"p.yaml": text, "secret.txt": "bench-client-secret", "key.txt": "bench-session-key-" + "0" * 32}


def sign_in(port: int, name: str) -> str:
    """The Cookie header of a browser signed in to policy ``name`` (user ``alice`` or ``big``)."""
    b = Browser(port)
    host = f"{name}.localtest:{port}"
    page = b.get(f"http://{host}/oauth2/start/{name}?rd=/")
    b.submit_login(page, b.history[-1][0], "big" if name.endswith("4kb") else "alice")
    cookies = [c for c in b.cookies.values() if c.name.startswith(name.replace("-", "_") + "_session")]
    assert cookies, b.history
    return "; ".join(f"{c.name}={c.value}" for c in cookies)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--only", default="")
    ap.add_argument("--workers", type=int, default=1, help="decision processes (the target is per process)")
    args = ap.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the provider's request log
    import authlib.deprecate  # sets its own "always" filter on import: override it afterwards

    warnings.simplefilter("ignore", authlib.deprecate.AuthlibDeprecationWarning)  # inside oidc-provider-mock
    if not shutil.which("wrk"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)
    only = [n for n in SCENARIOS if not args.only or any(n.startswith(o) for o in args.only.split(","))]
    tmp = tempfile.mkdtemp(prefix="authplane-bench-signin-")
    redis = start_redis()
    try:
        with oidc_provider() as issuer:
            set_user(issuer, "alice", {"email": "alice@example.com", "groups": ["admins", "dev", "ops"]})
            set_user(issuer, "big", {"email": "big@example.com", "groups": BIG})
            d = write_policies(os.path.join(tmp, "policies"), policies(issuer, redis.url))
            svc = DecisionService(d, args.workers)
            try:
                for name in only:
                    cookie = sign_in(svc.http_port, name)
                    headers = {"cookie": cookie, "x-original-url": f"http://{name}.localtest/page"}
                    r = wrk(f"http://127.0.0.1:{svc.http_port}/oauth2/auth/{name}", headers, args.duration,
                            args.connections)
                    print(f"{name:<15} cookie {len(cookie):>5} B  {r['rps']:>8.0f} checks/s  "
                          f"p50 {r['p50']:.2f} ms  p99 {r['p99']:.2f} ms"
                          f"{'  NON-2xx: ' + str(int(r['errors'])) if r['errors'] else ''}", flush=True)
            finally:
                svc.stop()
    finally:
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{args.workers} decision process(es); {os.cpu_count()} cores shared by wrk, Redis and the "
          "decision service")


if __name__ == "__main__":
    main()
