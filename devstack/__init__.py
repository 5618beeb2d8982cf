"""Helpers that start the real stack (Valkey, Triton, Envoy) for tests, the demo and benchmarks.

A development tool, not part of the sidecar: it is not in the wheel (pyproject's package list
names only `sidecar*`) and nothing in `sidecar/` imports it. The tests, the demo
(`python3 dev.py demo` = `python -m devstack.demo`) and the benchmarks import it from the
repository root.
"""

from __future__ import annotations

from devstack.envoy import EnvoyProcess, find_envoy, render_bootstrap
from devstack.procs import ManagedProcess, ProcessStartError, ValkeyProcess, free_port, wait_http
from devstack.triton import TritonProcess, prepare_triton_server

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
