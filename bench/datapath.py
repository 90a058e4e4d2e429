"""What each compiled data-path choice costs: hand-edited variants of the bench's native route.

    python bench/datapath.py [--duration 5] [--connections 64] [--rounds 2] [--only a,b]

Compiles ``bench/authz.py``'s policy set to a static bootstrap (the fleet ``edge``), then for each
variant edits that bootstrap (see ``VARIANTS``), starts one Envoy (one worker) on it and runs wrk
against the no-auth route and the native route (JWT from a local JWKS + one RBAC claim rule) of
that same Envoy, one after the other with the same settings. Variants run in turn, ``--rounds``
times interleaved, so a noisy neighbour hits every variant alike; the table shows the median
req/s of each and its ratio to the no-auth route of the ``compiled`` variant (the output as the
compiler writes it). Several variants are not equivalent to the policy (they drop a check): they
price one part of the path. The upstream is a second Envoy with a direct response.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from authplane.compiler.render import dump, static_bootstrap, to_dict  # noqa: E402
from authplane.compiler.snapshot import compile_policies  # noqa: E402
from authplane.devtools.idp import DevIdentityProvider  # noqa: E402
from authplane.envoy_bin import EnvoyProcess  # noqa: E402
from authplane.policy.loader import load_dir  # noqa: E402
from bench.authz import UPSTREAM, ensure_tools, policies, wrk  # noqa: E402
from tests.support.policies import write_policies  # noqa: E402

Config = dict[str, Any]
NATIVE = "r/native"
JWT = "envoy.filters.http.jwt_authn"
RBAC = "envoy.filters.http.rbac.route"


def hcm(boot: Config) -> Config:
    return boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def routes(boot: Config) -> list[Config]:
    return hcm(boot)["route_config"]["virtual_hosts"][0]["routes"]


def route(boot: Config, name: str) -> Config:
    return next(r for r in routes(boot) if r["name"] == name)


def http_filter(boot: Config, name: str) -> Config:
    return next(f for f in hcm(boot)["http_filters"] if f["name"] == name)


def providers(boot: Config) -> dict[str, Config]:
    return http_filter(boot, JWT)["typed_config"]["providers"]


def native_rbac(boot: Config) -> Config:
    return route(boot, NATIVE)["typed_per_filter_config"][RBAC]["rbac"]


def v_compiled(boot: Config) -> None:
    """As the compiler writes it."""


def v_jwt_only(boot: Config) -> None:
    """native: JWT only, no RBAC rule (payload still written to metadata)."""
    del route(boot, NATIVE)["typed_per_filter_config"][RBAC]


def v_jwt_only_no_payload(boot: Config) -> None:
    """native: JWT only, no RBAC rule, no payload_in_metadata."""
    v_jwt_only(boot)
    for p in providers(boot).values():
        p.pop("payload_in_metadata", None)


def v_no_stat_prefix(boot: Config) -> None:
    """native: RBAC without rules_stat_prefix."""
    native_rbac(boot).pop("rules_stat_prefix", None)


def v_one_matcher(boot: Config) -> None:
    """native: the claim rule's list matcher only (not the or of string and list)."""
    principal = native_rbac(boot)["rules"]["policies"]["bench"]["principals"][0]
    principal.update(principal.pop("or_ids")["ids"][1])


def v_metadata_principal(boot: Config) -> None:
    """native: the claim matched by the ``metadata`` principal instead of ``sourced_metadata``."""
    ids = native_rbac(boot)["rules"]["policies"]["bench"]["principals"][0]["or_ids"]["ids"]
    for i, p in enumerate(ids):
        ids[i] = {"metadata": p["sourced_metadata"]["metadata_matcher"]}


def v_lean_rbac(boot: Config) -> None:
    """native: RBAC without rules_stat_prefix and with the list matcher only."""
    v_no_stat_prefix(boot)
    v_one_matcher(boot)


def v_no_jwt_cache(boot: Config) -> None:
    """JWT providers without jwt_cache_config (every token's signature verified)."""
    for p in providers(boot).values():
        p.pop("jwt_cache_config", None)


def v_big_jwt_cache(boot: Config) -> None:
    """JWT cache of 10,000 tokens instead of 100."""
    for p in providers(boot).values():
        p["jwt_cache_config"] = {"jwt_cache_size": 10000}


def v_forward(boot: Config) -> None:
    """JWT providers with forward: true (the Authorization header kept)."""
    for p in providers(boot).values():
        p["forward"] = True


def v_no_disabled(boot: Config) -> None:
    """Filters disabled at the listener and unused by native/no-auth dropped from the chain."""
    f = hcm(boot)
    gone = {x["name"] for x in f["http_filters"] if x.get("disabled")}
    f["http_filters"] = [x for x in f["http_filters"] if x["name"] not in gone]
    f["route_config"]["virtual_hosts"][0]["routes"] = [
        r for r in routes(boot) if not gone & set(r.get("typed_per_filter_config", {}))
        or r["name"] in ("authplane:ambiguous-path", "r/any[none/401]")]
    for r in routes(boot):
        for name in gone:
            r.get("typed_per_filter_config", {}).pop(name, None)


def v_minimal_chain(boot: Config) -> None:
    """Only jwt_authn, the RBAC filter and the router in the chain; only no-auth and native."""
    v_no_disabled(boot)
    f = hcm(boot)
    f["route_config"]["virtual_hosts"][0]["routes"] = [
        r for r in routes(boot) if r["name"] in ("authplane:ambiguous-path", "r/open", NATIVE)]
    for p in list(providers(boot)):
        if not p.startswith("native/"):
            del providers(boot)[p]
    reqs = http_filter(boot, JWT)["typed_config"]["requirement_map"]
    for k in list(reqs):
        if k != "native":
            del reqs[k]


def v_jwt_filter_rules(boot: Config) -> None:
    """native's JWT requirement as a filter-level rule (prefix match) instead of per-route config."""
    cfg = http_filter(boot, JWT)["typed_config"]
    cfg["rules"] = [{"match": {"path_separated_prefix": "/native"}, "requires": {"provider_name": "native/dev"}}]
    route(boot, NATIVE)["typed_per_filter_config"].pop(JWT)
    for r in routes(boot):
        tpfc = r.get("typed_per_filter_config", {})
        if "requirement_name" in tpfc.get(JWT, {}):
            del tpfc[JWT]


def v_suppress_envoy_headers(boot: Config) -> None:
    """Router with suppress_envoy_headers (no x-envoy-upstream-service-time)."""
    http_filter(boot, "envoy.filters.http.router")["typed_config"]["suppress_envoy_headers"] = True


def v_no_ambiguous_guard(boot: Config) -> None:
    """Without the ambiguous-path regex route (every request pays its regex)."""
    r = hcm(boot)["route_config"]["virtual_hosts"][0]
    r["routes"] = [x for x in r["routes"] if x["name"] != "authplane:ambiguous-path"]


VARIANTS: dict[str, Callable[[Config], None]] = {
    n.removeprefix("v_").replace("_", "-"): f for n, f in list(globals().items()) if n.startswith("v_")}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its descendants (the envoy wrapper execs or spawns)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, todo = set(), [pid]
    while todo:
        p = todo.pop()
        tree.add(p)
        todo.extend(c for c, pp in parents.items() if pp == p and c not in tree)
    total = 0
    for p in tree:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


Measure = tuple[float, float]
"""req/s and Envoy CPU microseconds per request."""


def measure(pid: int, url: str, headers: dict[str, str], duration: int, connections: int) -> Measure:
    before = cpu_seconds(pid)
    r = wrk(url, headers, duration, connections)
    if r["errors"]:
        raise RuntimeError(f"{url}: {r['errors']} non-2xx answers")
    return r["rps"], 1e6 * (cpu_seconds(pid) - before) / (r["rps"] * duration)


def run_variant(boot: Config, tmp: str, token: str, duration: int, connections: int) -> tuple[Measure, Measure]:
    path = os.path.join(tmp, "edge.yaml")
    with open(path, "w") as f:
        f.write(dump(boot))
    envoy = EnvoyProcess(path, concurrency=1).start()
    try:
        envoy.wait_ready()
        assert envoy.proc is not None
        port = envoy.listener_port("edge/http")
        open_ = measure(envoy.proc.pid, f"http://127.0.0.1:{port}/no-auth/x", {}, duration, connections)
        native = measure(envoy.proc.pid, f"http://127.0.0.1:{port}/native/x",
                         {"authorization": f"Bearer {token}"}, duration, connections)
        return open_, native
    finally:
        envoy.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", default="", help="variants to run (compiled always runs)")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list:
        for name, f in VARIANTS.items():
            print(f"{name:<24} {f.__doc__}")
        return
    ensure_tools()
    names = ["compiled", *(n for n in VARIANTS if n != "compiled"
                           and (not args.only or n in args.only.split(",")))]
    idp = DevIdentityProvider(issuer="https://idp.bench")
    token = idp.mint(groups=["bench"], ttl=3600)
    tmp = tempfile.mkdtemp(prefix="authplane-datapath-")
    with open(os.path.join(tmp, "upstream.yaml"), "w") as f:
        f.write(UPSTREAM)
    upstream = EnvoyProcess(os.path.join(tmp, "upstream.yaml"), concurrency=1).start()
    results: dict[str, list[tuple[Measure, Measure]]] = {n: [] for n in names}
    try:
        upstream.wait_ready()
        d = write_policies(os.path.join(tmp, "policies"), policies(
            upstream.listener_port("upstream"), json.dumps(idp.jwks())))
        base = to_dict(static_bootstrap(compile_policies(load_dir(d))["edge"]))
        for lst in base["static_resources"]["listeners"]:
            lst["address"]["socket_address"].update(address="127.0.0.1", port_value=0)
        base["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}
        for rnd in range(args.rounds):
            for name in names:
                boot = copy.deepcopy(base)
                VARIANTS[name](boot)
                results[name].append(run_variant(boot, tmp, token, args.duration, args.connections))
                (o, oc), (n, nc) = results[name][-1]
                print(f"round {rnd + 1} {name:<24} no-auth {o:>8.0f} req/s {oc:5.1f} us  "
                      f"native {n:>8.0f} req/s {nc:5.1f} us  {n / o:.3f}", flush=True)
    finally:
        upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    med = {name: [statistics.median(m[side][k] for m in results[name]) for side in (0, 1) for k in (0, 1)]
           for name in names}
    ref_cpu = med["compiled"][1]
    print(f"\nmedian of {args.rounds} rounds, {args.duration}s x {args.connections} connections, one Envoy "
          f"worker, {os.cpu_count()} cores shared with wrk and the upstream Envoy; 'us' is Envoy CPU per "
          "request, the figure a busy machine disturbs least; 'cpu ratio' is the compiled no-auth "
          "route's CPU per request over this variant's native route's")
    print(f"{'variant':<24} {'no-auth':>8} {'us':>5} {'native':>8} {'us':>5} {'rps ratio':>9} {'cpu ratio':>9}")
    for name in names:
        o, oc, n, nc = med[name]
        print(f"{name:<24} {o:>8.0f} {oc:>5.1f} {n:>8.0f} {nc:>5.1f} {n / o:>9.3f} {ref_cpu / nc:>9.3f}   "
              f"{VARIANTS[name].__doc__}")


if __name__ == "__main__":
    main()
