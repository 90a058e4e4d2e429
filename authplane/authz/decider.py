"""The state every front-end shares: the current rule table, the decision cache and metrics."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from authplane.authz.cache import TtlCache, cache_key
from authplane.authz.evaluate import Decision, Request, decide, deny
from authplane.authz.metrics import Metrics
from authplane.authz.rules import CompiledPolicy, RuleTable
from authplane.authz.tokens import Verifier

log = logging.getLogger("authplane.authz")
_NAME = re.compile(r"[a-z0-9]([-a-z0-9_.]{0,61}[a-z0-9])?")


class Decider:
    def __init__(self, metrics: Metrics, cache_size: int = 100_000) -> None:
        self.metrics = metrics
        self.table = RuleTable.empty()
        self.cache = TtlCache(cache_size)
        self._verifiers: dict[str, Verifier] = {}

    def swap(self, table: RuleTable) -> None:
        """Replace the rules at once; decisions of the old table are never served again."""
        verifiers = {name: Verifier(p.jwt, p.jwks_files) for name, p in table.policies.items() if p.jwt}
        self.table, self._verifiers = table, verifiers
        self.cache.clear()
        log.info("decision rules updated: version %s, %d policies", table.version, len(table.policies))

    def policy(self, name: str | None) -> CompiledPolicy | Decision:
        """The compiled policy, or the denial to send when there is none (fail closed)."""
        if not name:
            return deny("no policy named in the check (the route carries no authplane.policy)")
        pol = self.table.policies.get(name)
        if pol is None:
            shown = repr(name) if _NAME.fullmatch(name) else "(not a policy name)"  # never echo input
            return deny(f"unknown policy {shown} (not a service: builtin policy in version "
                        f"{self.table.version or 'none'})")
        return pol

    def policy_for(self, host: str, path: str, method: str, headers: dict[str, str]) -> CompiledPolicy | Decision:
        """The policy of the route Envoy would take for this request (forward auth naming none)."""
        target = self.table.routes.find(host, path, method, headers)
        if target.policy is None:
            return deny(target.reason)
        return self.policy(target.policy)

    def verifier(self, pol: CompiledPolicy) -> Verifier | None:
        return self._verifiers.get(pol.name)

    def lookup(self, pol: CompiledPolicy, req: Request, tag: str) -> tuple[bytes, Any]:
        key = cache_key(self.table.version, pol, req, tag)
        value = self.cache.get(key)
        self.metrics.lookup(value is not None)
        return key, value

    def remember(self, key: bytes, pol: CompiledPolicy, decision: Decision, value: Any) -> None:
        ttl = pol.allow_ttl if decision.allow else pol.deny_ttl
        if decision.allow and decision.expires is not None:
            ttl = min(ttl, decision.expires - time.time())
        self.cache.put(key, value, ttl)

    def decide(self, pol: CompiledPolicy, req: Request) -> Decision:
        return decide(pol, req)

    def count(self, policy: str, decision: Decision) -> None:
        self.metrics.decided(policy, decision.rule, decision.allow)
