"""``authplane serve``: live delivery of compiled snapshots to Envoy fleets over ADS.

The parts follow go-control-plane's split, so either side can change alone:

- ``store.py``     policy directory → last good ``Revision`` (snapshots per fleet, git SHA, errors)
- ``watch.py``     file watcher that asks the store to reload (debounced, temp-file safe)
- ``cache.py``     snapshot per fleet, packed once, with the streams watching each fleet
- ``stream.py``    what SotW and Delta streams share: nonces, ACK/NACK, flow control
- ``sotw.py`` / ``delta.py``   the two ADS protocol variants
- ``server.py``    the gRPC service that hands each call to a stream
- ``callbacks.py`` the one hook into stream events; ``tracker.py`` uses it for status and metrics
- ``admin.py``     ``/status``, ``/metrics``, ``/healthz`` and the ``authplane status`` table
- ``bootstrap.py`` the Envoy bootstrap of one fleet member
- ``app.py``       the asyncio components of ``serve`` and their shared store
"""


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 in brackets) → (host, port); ValueError with a one-line message."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"invalid address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)
