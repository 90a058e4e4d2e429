"""``authplane test`` wall time for 100 cases, Envoy start included.

Target (issue 12): 100 cases in under 5 s. The policy set has a gateway-level JWT + RBAC policy,
a route-level RBAC policy and a builtin ext_authz route; the cases cycle through allows and
denies of each. Reported: the whole command (``python -m authplane.cli test``, interpreter start
and imports included) and the in-process run (harness start + cases), median of ``--repeat``.

    python bench/policy_test.py [--cases 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HEAD = "apiVersion: authplane.dev/v1alpha1\n"
POLICIES = [
    "kind: Gateway\nmetadata: {name: edge}\nspec: {fleet: edge, listeners: [{name: http, port: 10000}]}",
    "kind: Backend\nmetadata: {name: app}\nspec: {endpoints: ['127.0.0.1:9']}",
    "kind: Route\nmetadata: {name: api}\nspec:\n  gateway: edge\n  rules:\n"
    "    - {name: admin, match: {pathPrefix: /admin}, backend: app}\n"
    "    - {name: partner, match: {pathPrefix: /partner}, backend: app}\n"
    "    - {name: rest, match: {pathPrefix: /}, backend: app}",
    "kind: AuthPolicy\nmetadata: {name: edge}\nspec:\n  targetRef: {kind: Gateway, name: edge}\n"
    "  jwt: {providers: [{name: corp, issuer: https://idp.example.com, audiences: [api],\n"
    "        jwks: {uri: https://idp.example.com/jwks}, claimsToHeaders: {sub: x-user-id}}]}\n"
    "  authorization: {default: allow, rules: [{name: no-trace, action: deny, when: {methods: [TRACE]}}]}",
    "kind: AuthPolicy\nmetadata: {name: admins}\nspec:\n  targetRef: {kind: Route, name: api, rule: admin}\n"
    "  authorization: {rules: [{name: admins, action: allow, when: {claims: {groups: [admins]}}}]}",
    "kind: AuthPolicy\nmetadata: {name: partners}\nspec:\n  targetRef: {kind: Route, name: api, rule: partner}\n"
    "  extAuth: {service: builtin, rules: [{name: blue, action: allow, when: {headers: {x-team: [blue]}}},\n"
    "           {name: others, action: deny}]}",
]
KINDS = [
    ("GET", "/admin/u", "admins", "", 200), ("GET", "/admin/u", "dev", "", 403), ("GET", "/admin/u", None, "", 401),
    ("GET", "/partner/x", "dev", "blue", 200), ("GET", "/partner/x", "dev", "red", 403),
    ("GET", "/other", "dev", "", 200), ("TRACE", "/other", "dev", "", 403),
]


def suite(n: int) -> str:
    lines = [HEAD + "kind: PolicyTest\nmetadata: {name: bench}\nspec:\n  fleet: edge\n  cases:"]
    for i in range(n):
        method, path, group, team, status = KINDS[i % len(KINDS)]
        req = f"{{method: {method}, path: {path}"
        if team:
            req += f", headers: {{x-team: {team}}}"
        if group:
            req += f", jwt: {{provider: corp, claims: {{sub: u{i}, groups: [{group}]}}}}"
        lines.append(f"    - {{name: case {i}, request: {req}}}, expect: {{status: {status}}}}}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "policies.yaml"), "w") as f:
            f.write("\n---\n".join(HEAD + doc for doc in POLICIES) + "\n---\n" + suite(args.cases))
        whole, inside = [], []
        for _ in range(args.repeat):
            started = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "authplane.cli", "test", d], capture_output=True, text=True)
            whole.append(time.perf_counter() - started)
            if r.returncode != 0:
                sys.exit(f"authplane test failed:\n{r.stdout}{r.stderr}")

            from authplane.policy.loader import load_dir
            from authplane.testrun import run_tests

            started = time.perf_counter()
            policies = load_dir(d)
            results = run_tests(policies, list(policies.tests.values()))
            inside.append(time.perf_counter() - started)
            assert all(x.passed for x in results) and len(results) == args.cases
    print(f"authplane test, {args.cases} cases (Envoy start included), median of {args.repeat}:")
    print(f"  whole command:        {statistics.median(whole):.2f} s   (target < 5 s)")
    print(f"  in-process run:       {statistics.median(inside):.2f} s   (load, harness start, cases)")


if __name__ == "__main__":
    main()
