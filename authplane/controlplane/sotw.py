"""State-of-the-world ADS (``StreamAggregatedResources``).

Listeners and clusters are wildcard (every response carries all of them); routes and endpoints
are sent for the names Envoy asked for. A response is sent when the content for the stream's
request differs from the last one sent: the first request, a change of names, a new snapshot.
"""

from __future__ import annotations

from typing import Any

from authplane.controlplane.cache import WILDCARD_TYPES, with_nonce
from authplane.controlplane.stream import Sent, Stream, TypeState, check_names, error_message


class SotwStream(Stream):
    protocol = "sotw"

    async def on_request(self, request: Any, ts: TypeState) -> None:
        type_url = request.type_url
        check_names(request.resource_names, "resource_names")
        if not self.settle(type_url, ts, request.response_nonce, error_message(request)):
            return
        ts.names = frozenset(request.resource_names)
        ts.waiting = True
        await self.respond(type_url, ts)

    def fixes(self, sent: Sent, rejected: set[str]) -> set[str]:
        """A SotW response is the whole state of its type: accepting it resolves every rejection."""
        return rejected

    def _key(self, type_url: str, ts: TypeState) -> tuple[tuple[str, str], ...]:
        assert self.packed is not None
        if type_url in WILDCARD_TYPES and (not ts.names or "*" in ts.names):
            return self.packed.keys.get(type_url, ())
        versions = self.packed.versions(type_url)
        return tuple((name, versions[name]) for name in sorted(ts.names) if name in versions)

    async def respond(self, type_url: str, ts: TypeState) -> None:
        if self.packed is None:
            return  # nothing valid loaded yet: the client keeps what it has
        key = self._key(type_url, ts)
        if ts.last is not None and ts.last.key == key:
            self.unchanged(ts)
            return
        if not ts.waiting:
            return
        nonce = self.next_nonce()
        names = tuple(name for name, _ in key)
        response = with_nonce(self.packed.sotw_body(type_url, names), nonce)
        await self.send(type_url, ts, response, Sent(nonce, self.packed, names, key=key))
