"""Incremental ADS (``DeltaAggregatedResources``).

Each stream remembers the version of every resource the client has (seeded from
``initial_resource_versions`` when Envoy reconnects), so a response carries only the resources
whose version changed and, in ``removed_resources``, those that are gone. A subscribed name the
fleet lacks is answered once in ``removed_resources``: the protocol's "does not exist".
"""

from __future__ import annotations

from typing import Any

from authplane.controlplane.cache import WILDCARD_TYPES, with_nonce
from authplane.controlplane.stream import Sent, Stream, TypeState, check_names, error_message

ABSENT = ""
"""``known`` value of a subscribed name the client was told does not exist."""


class DeltaStream(Stream):
    protocol = "delta"

    async def on_request(self, request: Any, ts: TypeState) -> None:
        type_url = request.type_url
        subscribe = list(request.resource_names_subscribe)
        for what, names in (("resource_names_subscribe", subscribe),
                            ("resource_names_unsubscribe", request.resource_names_unsubscribe),
                            ("initial_resource_versions", request.initial_resource_versions)):
            check_names(names, what)
        if not ts.started:
            ts.started = True
            ts.wildcard = type_url in WILDCARD_TYPES and not subscribe  # legacy wildcard
            ts.known.update(request.initial_resource_versions)
        for name in subscribe:
            if name == "*":
                ts.wildcard = True
            else:
                ts.subscribed.add(name)
        for name in request.resource_names_unsubscribe:
            if name == "*":
                ts.wildcard = False
                ts.known = {n: v for n, v in ts.known.items() if n in ts.subscribed}
            else:
                ts.subscribed.discard(name)
                if not ts.wildcard:
                    ts.known.pop(name, None)
        check_names(ts.subscribed, "the subscription")
        if subscribe or request.resource_names_unsubscribe or request.initial_resource_versions:
            ts.synced = None
        if self.settle(type_url, ts, request.response_nonce, error_message(request)):
            ts.waiting = True
        await self.respond(type_url, ts)

    async def respond(self, type_url: str, ts: TypeState) -> None:
        if self.packed is None:
            return  # nothing valid loaded yet: the client keeps what it has
        if ts.responded and self.packed.unchanged(type_url, ts.synced):
            ts.synced = self.packed  # a push that changed other types: nothing to compare here
            self.unchanged(ts)
            return
        current = self.packed.resources.get(type_url, {})
        versions = self.packed.versions(type_url)
        wanted = current if ts.wildcard else sorted(ts.subscribed)
        send = [name for name in wanted if name in current and ts.known.get(name) != versions[name]]
        gone = (ts.known.keys() | ts.subscribed) - current.keys()
        removed = sorted(name for name in gone if ts.known.get(name) != ABSENT)
        if ts.responded and not send and not removed:
            ts.synced = self.packed
            self.unchanged(ts)
            return
        if not ts.waiting:
            return
        nonce = self.next_nonce()
        response = with_nonce(self.packed.delta_body(type_url, tuple(send), tuple(removed)), nonce)
        for name in send:
            ts.known[name] = versions[name]
        for name in removed:
            if name in ts.subscribed:
                ts.known[name] = ABSENT
            else:
                del ts.known[name]
        await self.send(type_url, ts, response, Sent(nonce, self.packed, tuple(send), tuple(removed)))
