"""authplane's builtin decision service: Envoy ext_authz (gRPC and HTTP) and forward auth.

- ``rules.py``     policy set → an immutable table of compiled builtin rules (pure)
- ``evaluate.py``  one request against one compiled policy → a ``Decision`` (pure)
- ``decider.py``   what every front-end shares: the current table, the decision cache, metrics
- ``grpc_api.py`` / ``http_api.py``   the front-ends (Envoy gRPC and HTTP mode, forward auth)
- ``service.py``   ``AuthzService``: both front-ends on their ports in the caller's event loop
- ``workers.py`` / ``worker.py``   N processes on shared ports, fed rule tables
- ``component.py`` the decision service as a component of ``authplane serve`` (in-process or
                   workers), its rules swapped with each revision
"""
