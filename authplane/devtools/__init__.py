"""Development helpers used by ``authplane demo`` and the tests: echo upstream, identity provider,
and a sample BYO ext_authz service. Not for production use."""
