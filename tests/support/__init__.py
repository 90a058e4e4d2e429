"""Helpers shared by the tests, one module per concern: ``ports`` (free ports, polling), ``http``
(requests and ``/metrics``), ``policies`` (policy trees on disk), ``processes`` (the control plane,
decision service and Envoys the tests run), ``ads`` (a raw ADS client) and ``oidc`` (a real OpenID
provider and a browser)."""

from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""The repository's root directory."""
TESTDATA = os.path.join(ROOT, "tests", "testdata")
"""The golden cases (``<case>.in.yaml`` → ``<case>.<resource type>.yaml``, ``<case>.ir.yaml``)
and the files they refer to."""
