"""authplane's builtin decision service: Envoy ext_authz (gRPC and HTTP) and forward auth.

``rules`` (policies → compiled table) and ``engine`` (decisions) are pure; ``service.AuthzService``
runs the servers in the caller's event loop; ``workers.start_workers`` runs N processes on shared
ports. Kept import-light: the compiler imports ``rules``.
"""
