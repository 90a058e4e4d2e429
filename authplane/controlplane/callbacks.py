"""The one hook into stream events (go-control-plane's ``Callbacks``): status and metrics use it.

Every method is called on the event loop and must not block. The default does nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from authplane.controlplane.stream import Sent, Stream


class Callbacks:
    def stream_opened(self, stream: Stream) -> None:
        """The stream's first request arrived: ``stream.node_id`` and ``stream.fleet`` are known."""

    def stream_closed(self, stream: Stream) -> None:
        """The stream ended (only called for streams that were opened)."""

    def stream_refused(self, stream: Stream, reason: str, message: str) -> None:
        """The stream is ended with an error: ``reason`` "fleet" (its certificate does not name
        ``stream.fleet``; nothing was sent) or "limit" (it exceeded a bound)."""

    def request(self, stream: Stream, type_url: str) -> None:
        """Any request, including ACKs, NACKs and stale ones."""

    def response(self, stream: Stream, type_url: str, sent: Sent) -> None:
        """A response was written."""

    def ack(self, stream: Stream, type_url: str, sent: Sent) -> None:
        """Envoy accepted ``sent``."""

    def nack(self, stream: Stream, type_url: str, sent: Sent, error: str) -> None:
        """Envoy rejected ``sent`` with ``error`` (its ``error_detail.message``); it keeps the
        previous config, and the stream does not send the rejected content again."""
