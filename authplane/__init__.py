"""authplane: auth policy as YAML, compiled to Envoy configuration and served over ADS."""

__version__ = "0.1.0"
API_VERSION = "authplane.dev/v1alpha1"
