"""Prometheus metrics of the control plane, in a registry of its own (served on ``/metrics``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from authplane.compiler.render import SECTION
from authplane.errors import Problem

MAX_PROBLEM_SERIES = 20


def type_label(type_url: str) -> str:
    """``clusters``, ``endpoints``, ``listeners``, ``routes``, ``secrets``; any other type (a
    client may send any string) is ``other``, so clients cannot create metric series."""
    return SECTION.get(type_url) or "other"


def type_name(type_url: str) -> str:
    """As ``type_label``, but other types by message name: for status (bounded per stream)."""
    return SECTION.get(type_url) or type_url.rpartition("/")[2] or "none"


NodeCounts = Callable[[], dict[tuple[str, str], int]]


class NodeStates(Collector):
    """``authplane_xds_nodes``: Envoys by fleet and state, counted when scraped (the states of
    ``/status``), so that an alert can see nodes out of sync."""

    def __init__(self, count: NodeCounts) -> None:
        self.count = count

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily("authplane_xds_nodes", "Envoys this process knows, by fleet (empty: a fleet no "
                                 "Gateway names) and state (in sync, updating, rejected, waiting, disconnected)",
                                 labels=["fleet", "state"])

    def describe(self) -> Iterator[Metric]:
        yield self._family()  # without calling count: registering must not read the nodes

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for (fleet, state), n in sorted(self.count().items()):
            family.add_metric([fleet, state], n)
        yield family


class DecisionMetrics:
    """The decision log's (``serve --decision-log``): label values are names of loaded policies
    and their rules only (``controlplane/decisions.py``), so Envoys cannot add series."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter("authplane_decisions", "Requests decided on checked routes, as Envoys report "
                                 "them, by policy, rule (empty: none named) and verdict (allow, deny, would-deny)",
                                 ["policy", "rule", "verdict"], registry=registry)
        self.entries = Counter("authplane_decision_log_entries", "Decision log lines: written, dropped (the "
                               "writer was behind by the queue's bound) or failed (the file could not be "
                               "written)", ["result"], registry=registry)
        for result in ("written", "dropped", "failed"):
            self.entries.labels(result)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.streams = Gauge("authplane_xds_streams", "Connected ADS streams", ["protocol"], registry=r)
        self.refused = Counter("authplane_xds_refused_streams", "ADS streams ended by the server: fleet (not "
                               "named by the client certificate) or limit (a bound exceeded)", ["reason"],
                               registry=r)
        self.requests = Counter("authplane_xds_requests", "Discovery requests received (ACKs and NACKs included)",
                                ["type"], registry=r)
        self.pushes = Counter("authplane_xds_pushes", "Discovery responses sent", ["type"], registry=r)
        self.acks = Counter("authplane_xds_acks", "Responses Envoy accepted", ["type"], registry=r)
        self.nacks = Counter("authplane_xds_nacks", "Responses Envoy rejected", ["type"], registry=r)
        self.reloads = Counter("authplane_reloads", "Policy reloads by result (applied, unchanged, error)",
                               ["result"], registry=r)
        self.compile_seconds = Histogram(
            "authplane_compile_duration_seconds", "Loading and compiling the policy directory",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.snapshot = Gauge("authplane_snapshot_info", "The snapshot each fleet is served (value 1)",
                              ["fleet", "version", "git"], registry=r)
        self.reload_ok = Gauge("authplane_last_reload_success",
                               "1 when the last reload was applied, 0 when it was rejected", registry=r)
        self.reload_problem = Gauge(
            "authplane_reload_problem", "Problems of the rejected reload, by policy file position (value 1; "
            "cleared by the next good reload)", ["path", "line", "col"], registry=r)
        for result in ("applied", "unchanged", "error"):
            self.reloads.labels(result)
        for reason in ("fleet", "limit"):
            self.refused.labels(reason)

    def count_nodes(self, count: NodeCounts) -> None:
        self.registry.register(NodeStates(count))

    def fleets(self, versions: dict[str, str], git: str | None) -> None:
        self.snapshot.clear()
        for fleet, version in versions.items():
            self.snapshot.labels(fleet, version, git or "").set(1)

    def reload_failed(self, problems: list[Problem]) -> None:
        self.reloads.labels("error").inc()
        self.reload_ok.set(0)
        self.reload_problem.clear()
        for p in problems[:MAX_PROBLEM_SERIES]:
            self.reload_problem.labels(p.path, str(p.line), str(p.col)).set(1)

    def reload_applied(self, changed: bool) -> None:
        self.reloads.labels("applied" if changed else "unchanged").inc()
        self.reload_ok.set(1)
        self.reload_problem.clear()
