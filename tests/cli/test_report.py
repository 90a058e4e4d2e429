"""``authplane validate --report``: per fleet, listener, host and route, the checks of each level
with their file:line and whether the route is reachable anonymously."""

from __future__ import annotations

from authplane.cli import main
from tests.support.policies import write_policies

POLICIES = """kind: Gateway
metadata: {name: edge}
spec: {fleet: edge, listeners: [{name: http, port: 8080}, {name: alt, port: 8081}]}
---
kind: Backend
metadata: {name: app}
spec: {endpoints: ["127.0.0.1:9"]}
---
kind: Route
metadata: {name: app}
spec:
  gateway: edge
  listeners: [http]
  hostnames: [app.example.com]
  rules:
    - {name: main, match: {pathPrefix: /}, backend: app}
    - {name: health, match: {path: /healthz}, backend: app}
    - {name: ci, match: {pathPrefix: /ci, methods: [POST]}, backend: app}
---
kind: Route
metadata: {name: other}
spec: {gateway: edge, rules: [{name: all, backend: app}]}
---
kind: AuthPolicy
metadata: {name: gw}
spec:
  targetRef: {kind: Gateway, name: edge}
  jwt:
    required: false
    providers: [{name: dev, jwks: {inline: {keys: [{kty: oct, k: c2VjcmV0c2VjcmV0, kid: k1}]}}}]
  authorization:
    rules: [{name: staff, action: allow, when: {claims: {groups: [staff]}}}]
---
kind: AuthPolicy
metadata: {name: health}
spec: {targetRef: {kind: Route, name: app, rule: health}, public: true}
---
kind: AuthPolicy
metadata: {name: ci}
spec:
  targetRef: {kind: Route, name: app, rule: ci}
  basicAuth: {file: users.htpasswd}
"""

GW = ("gateway: AuthPolicy gw ({d}/p.yaml:32): jwt (optional) {d}/p.yaml:37, "
      "authorization (default deny, 1 rule) {d}/p.yaml:40")
EXPECTED = """fleet edge
  listener edge/alt (0.0.0.0:8081)
    host *
      route other/all: pathPrefix / -> app ({d}/p.yaml:26)
        {gw}
        route: none
        anonymous: no (authorization allows only requests with a verified JWT)
  listener edge/http (0.0.0.0:8080)
    host app.example.com
      route app/health: path /healthz -> app ({d}/p.yaml:13)
        gateway: off (public)
        route: AuthPolicy health ({d}/p.yaml:47): public (every check off)
        anonymous: yes (public)
      route app/ci: pathPrefix /ci methods POST -> app ({d}/p.yaml:13)
        {gw}
        route: AuthPolicy ci ({d}/p.yaml:50): basicAuth {d}/p.yaml:55
        anonymous: no (authorization allows only requests with a verified JWT)
      route app/main: pathPrefix / -> app ({d}/p.yaml:13)
        {gw}
        route: none
        anonymous: no (authorization allows only requests with a verified JWT)
      route other/all: pathPrefix / -> app ({d}/p.yaml:26)
        {gw}
        route: none
        anonymous: no (authorization allows only requests with a verified JWT)
    host *
      route other/all: pathPrefix / -> app ({d}/p.yaml:26)
        {gw}
        route: none
        anonymous: no (authorization allows only requests with a verified JWT)
"""


def test_report_per_listener_host_and_route(tmp_path, capsys):
    users = "ci:{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=\n"
    d = write_policies(str(tmp_path / "p"), {"p.yaml": POLICIES, "users.htpasswd": users})
    assert main(["validate", "--report", d]) == 0
    out = capsys.readouterr()
    report, _, summary = out.out.rpartition(f"{d}: valid:")
    assert report == EXPECTED.format(d=d, gw=GW.format(d=d))
    assert summary.startswith(" 1 gateways, 2 routes")
    assert "spec.public: route app/health is reachable with no credential" in out.err
