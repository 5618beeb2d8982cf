"""qos-sidecar: admission control and per-tenant quotas for Envoy in front of Triton."""

__version__ = "0.1.0"
