"""Static checks (``policy/lint.py``): each warning at its ``path:line:col``, no warning where the
structure proves nothing, and ``validate --strict`` failing on warnings."""

from __future__ import annotations

from authplane.cli import main
from authplane.policy.loader import load_dir
from tests.support.policies import write_policies

BASE = """kind: Gateway
metadata: {name: edge}
spec: {fleet: edge, listeners: [{name: http, port: 8080}]}
---
kind: Backend
metadata: {name: app}
spec: {endpoints: ["127.0.0.1:9"]}
---
kind: Route
metadata: {name: app}
spec:
  gateway: edge
  rules:
    - {name: main, match: {pathPrefix: /}, backend: app}
    - {name: health, match: {path: /healthz}, backend: app}
"""


def policy(body: str, target: str = "{kind: Route, name: app}", name: str = "p") -> str:
    return f"kind: AuthPolicy\nmetadata: {{name: {name}}}\nspec:\n  targetRef: {target}\n{body}"


def warnings(tmp_path, *docs: str) -> list[str]:
    d = write_policies(str(tmp_path / "p"), {"p.yaml": "\n---\n".join([BASE, *docs])})
    return [str(w).removeprefix(d + "/") for w in load_dir(d).warnings]


def test_allow_rule_under_default_allow(tmp_path):
    got = warnings(tmp_path, policy("""  authorization:
    default: allow
    rules:
      - {name: block, action: deny, when: {methods: [DELETE]}}
      - {name: gets, action: allow, when: {methods: [GET]}}
"""))
    assert got == ["p.yaml:32:30: spec.authorization.rules[1].action: allow rule 'gets' has no effect under "
                   "default: allow (what no deny rule matches is allowed anyway)"]


def test_contradictory_conditions_never_match(tmp_path):
    got = warnings(tmp_path, policy("""  authorization:
    rules:
      - name: never
        action: allow
        when: {headers: {x-a: [{present: true}]}, not: {headers: {x-a: [{present: true}]}}}
      - name: fine
        action: allow
        when: {headers: {x-a: [v]}, not: {headers: {x-b: [{present: true}]}}}
"""), policy("""  jwt:
    providers: [{name: dev, jwks: {inline: {keys: [{kty: oct, k: c2VjcmV0c2VjcmV0, kid: k1}]}}}]
  extAuth:
    service: builtin
    rules:
      - {name: anon-claims, action: allow, when: {authenticated: false, claims: {sub: [alice]}}}
      - {name: rest, action: deny}
""", target="{kind: Gateway, name: edge}", name="q"))
    assert got == [
        "p.yaml:32:15: spec.authorization.rules[0].when: rule 'never' can never match: its conditions "
        "contradict their own 'not' (whatever matches them matches the 'not')",
        "p.yaml:48:50: spec.extAuth.rules[0].when: rule 'anon-claims' can never match: authenticated: false "
        "next to claims, scopes or apiKeys (which need a credential)"]


def test_shadowed_builtin_rules_first_match_wins(tmp_path):
    got = warnings(tmp_path, policy("""  extAuth:
    service: builtin
    rules:
      - {name: admin, action: deny, when: {paths: [/admin/*]}}
      - {name: admin-users, action: allow, when: {paths: [/admin/users], methods: [GET]}}
      - {name: teams, action: allow, when: {headers: {x-team: [a, b]}}}
      - {name: team-a, action: deny, when: {headers: {x-team: [a]}, methods: [POST]}}
      - {name: team-c, action: allow, when: {headers: {x-team: [c]}}}
      - {name: everything, action: deny, deny: {status: 401}}
      - {name: after, action: allow, when: {methods: [GET]}}
"""))
    assert got == [
        "p.yaml:32:9: spec.extAuth.rules[1]: rule 'admin-users' is never reached: the earlier rule 'admin' "
        "(deny) matches every request it matches (the first match wins)",
        "p.yaml:34:9: spec.extAuth.rules[3]: rule 'team-a' is never reached: the earlier rule 'teams' (allow) "
        "matches every request it matches (the first match wins)",
        "p.yaml:37:9: spec.extAuth.rules[6]: rule 'after' is never reached: the earlier rule 'everything' "
        "(deny) matches every request it matches (the first match wins)"]


def test_shadowed_native_rules(tmp_path):
    got = warnings(tmp_path, policy("""  jwt:
    providers: [{name: dev, jwks: {inline: {keys: [{kty: oct, k: c2VjcmV0c2VjcmV0, kid: k1}]}}}]
  authorization:
    rules:
      - {name: office, action: allow, when: {sourceCIDRs: [10.1.0.0/16]}}
      - {name: no-delete, action: deny, when: {methods: [DELETE, PUT]}}
      - {name: delete-from-office, action: allow, when: {methods: [DELETE], sourceCIDRs: [10.1.2.0/24]}}
      - {name: lab, action: allow, when: {sourceCIDRs: [10.1.3.0/24]}}
      - {name: scoped, action: allow, when: {scopes: [read, write], headers: {x-a: [v]}}}
      - {name: scoped-less, action: allow, when: {scopes: [read], headers: {x-a: [{present: true}]}}}
"""))
    assert got == [
        "p.yaml:34:9: spec.authorization.rules[2]: allow rule 'delete-from-office' never allows: deny rule "
        "'no-delete' matches every request it matches (deny rules win)",
        "p.yaml:35:9: spec.authorization.rules[3]: rule 'lab' is shadowed by rule 'office' (same action, "
        "matches every request this one matches)",
        "p.yaml:36:9: spec.authorization.rules[4]: rule 'scoped' is shadowed by rule 'scoped-less' (same "
        "action, matches every request this one matches)"]


def test_nothing_to_report_when_nothing_is_proven(tmp_path):
    """Regexes, prefixes, CEL and claims are compared as written: overlap is not proven shadowing."""
    assert warnings(tmp_path, policy("""  jwt:
    providers: [{name: dev, jwks: {inline: {keys: [{kty: oct, k: c2VjcmV0c2VjcmV0, kid: k1}]}}}]
  authorization:
    rules:
      - {name: a, action: deny, when: {headers: {x-a: [{regex: "a.*"}]}}}
      - {name: b, action: allow, when: {headers: {x-a: [abc]}}}
      - {name: c, action: allow, when: {cel: "request.method == 'GET'"}}
      - {name: d, action: allow, when: {cel: "request.method == 'POST'"}}
      - {name: e, action: allow, when: {claims: {groups: [x]}, not: {claims: {groups: [y]}}}}
""", target="{kind: Gateway, name: edge}")) == []


def test_public_route_under_a_gateway_with_checks(tmp_path):
    got = warnings(tmp_path, policy("""  jwt:
    providers: [{name: dev, jwks: {inline: {keys: [{kty: oct, k: c2VjcmV0c2VjcmV0, kid: k1}]}}}]
""", target="{kind: Gateway, name: edge}", name="gw"), policy("  public: true\n",
                                                               target="{kind: Route, name: app, rule: health}"))
    assert got == ["p.yaml:37:11: spec.public: route app/health is reachable with no credential: public "
                   "turns off the checks of gateway 'edge' (AuthPolicy 'gw')"]


def test_optional_jwt_everywhere_is_anonymous(tmp_path):
    """A gateway JWT with required: false and a route policy that needs no credential either."""
    got = warnings(tmp_path, policy("""  jwt:
    required: false
    providers: [{name: dev, jwks: {inline: {keys: [{kty: oct, k: c2VjcmV0c2VjcmV0, kid: k1}]}}}]
""", target="{kind: Gateway, name: edge}", name="gw"), policy("""  jwt:
    providers: [{name: dev, jwks: {inline: {keys: [{kty: oct, k: c2VjcmV0c2VjcmV0, kid: k1}]}}}]
""", target="{kind: Route, name: app, rule: main}"))
    assert got == ["p.yaml:20:7: spec.rules[1]: route app/health is reachable with no credential although "
                   "gateway 'edge' has checks (AuthPolicy 'gw'): jwt.required: false and no rule needs a "
                   "credential"]


def test_strict_fails_on_warnings(tmp_path, capsys):
    d = write_policies(str(tmp_path / "p"), {"p.yaml": "\n---\n".join([BASE, policy("""  authorization:
    default: allow
    rules: [{name: gets, action: allow, when: {methods: [GET]}}]
""")])})
    assert main(["validate", d]) == 0
    out = capsys.readouterr()
    assert "valid:" in out.out and out.err.startswith(f"warning: {d}/p.yaml:")
    assert main(["validate", "--strict", d]) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err.endswith(f"{d}: 1 warning (--strict)\n")
    clean = write_policies(str(tmp_path / "clean"), {"p.yaml": BASE})
    assert main(["validate", "--strict", clean]) == 0


def test_shadow_rules_neither_shadow_nor_are_shadowed(tmp_path):
    """A ``mode: shadow`` rule is only recorded: it takes no request away from another rule."""
    assert warnings(tmp_path, policy("""  authorization:
    rules:
      - {name: trial-block, action: deny, mode: shadow, when: {methods: [GET, POST]}}
      - {name: gets, action: allow, when: {methods: [GET]}}
      - {name: gets-too, action: allow, mode: shadow, when: {methods: [GET]}}
""")) == []
