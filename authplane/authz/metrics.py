"""Prometheus metrics of the decision service, in a registry the caller can expose."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.decisions = Counter(
            "authplane_authz_decisions", "Decisions of the builtin decision service.",
            ["policy", "rule", "result"], registry=self.registry)
        self.latency = Histogram(
            "authplane_authz_check_seconds", "Time to answer one check, by front-end.",
            ["protocol"], buckets=BUCKETS, registry=self.registry)
        self.cache = Counter("authplane_authz_cache", "Decision cache lookups.", ["result"],
                             registry=self.registry)
        self.errors = Counter("authplane_authz_errors", "Checks answered with an internal error (500, fail "
                              "closed), by front-end.", ["protocol"], registry=self.registry)
        self._errors = {p: self.errors.labels(p) for p in ("grpc", "http")}
        self._hit = self.cache.labels("hit")
        self._miss = self.cache.labels("miss")
        self._children: dict[tuple[str, ...], object] = {}

    def decided(self, policy: str, rule: str, allow: bool) -> None:
        key = (policy, rule, "allow" if allow else "deny")
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.decisions.labels(*key)
        child.inc()  # type: ignore[attr-defined]

    def failed(self, protocol: str) -> None:
        self._errors[protocol].inc()

    def lookup(self, hit: bool) -> None:
        (self._hit if hit else self._miss).inc()

    def timer(self, protocol: str) -> Histogram:
        key = ("latency", protocol)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.latency.labels(protocol)
        return child  # type: ignore[return-value]
