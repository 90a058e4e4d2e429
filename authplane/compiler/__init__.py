"""Policy model → IR (``translate``) → Envoy resources (``filters/``, ``resources``) → snapshots."""
