"""Helpers that start the real stack (Valkey, Triton, Envoy) for tests, the demo and benchmarks.

Nothing here is imported by the sidecar itself; it lives in the package so that the demo and
the benchmark can use the same harness as the end-to-end tests.
"""

from __future__ import annotations

from sidecar.testing.procs import (
    EnvoyProcess,
    ManagedProcess,
    ProcessStartError,
    TritonProcess,
    ValkeyProcess,
    find_envoy,
    free_port,
    prepare_triton_server,
    render_bootstrap,
    wait_http,
)

__all__ = [
    "EnvoyProcess",
    "ManagedProcess",
    "ProcessStartError",
    "TritonProcess",
    "ValkeyProcess",
    "find_envoy",
    "free_port",
    "prepare_triton_server",
    "render_bootstrap",
    "wait_http",
]
