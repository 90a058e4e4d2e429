"""authplane: auth policy as YAML, compiled to Envoy configuration and served over ADS."""

import os

# authplane never uses gRPC in a forked child, and it forks with gRPC threads running (the demo's
# children get a preexec_fn): gRPC's fork handlers then abort the child (seen as Envoy "exited
# with -6" during demo start-up). Read by grpc when it is first imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

__version__ = "0.1.0"
from authplane.contract import API_VERSION

__all__ = ["API_VERSION", "__version__"]
