"""Metrics, health, policy status and explain: the operator's view of the sidecar."""
