"""``authplane serve``: live delivery of compiled snapshots to Envoy fleets over ADS.

The parts follow go-control-plane's split, so either side can change alone:

- ``store.py``     policy directory → last good ``Revision`` (snapshots per fleet, git SHA, errors)
- ``watch.py``     file watcher that asks the store to reload (debounced, temp-file safe)
- ``cache.py``     snapshot per fleet, packed once, with the streams watching each fleet
- ``stream.py``    what SotW and Delta streams share: nonces, ACK/NACK, flow control, and
                   ``Callbacks``, the one hook into stream events (``tracker.py`` uses it)
- ``sotw.py`` / ``delta.py``   the two ADS protocol variants
- ``ads.py``       the gRPC service that hands each call to a stream
- ``admin.py``     ``/status``, ``/metrics``, ``/healthz`` and the ``authplane status`` table
- ``bootstrap.py`` the Envoy bootstrap of one fleet member
- ``app.py``       the asyncio components of ``serve`` and their shared store
"""

