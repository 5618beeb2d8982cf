"""A sidecar that hangs, behind each shipped bootstrap (sidecar/envoy/common.py, rule 6).

A hung sidecar (alive, its socket open, its event loop stopped: SIGSTOP here) answers nothing.
Without health checks every request would wait Envoy's whole check timeout (30 s on
ext_authz, so that batch work can be held) or, in ext_proc, end in a 504. The shipped
clusters health-check the sidecar's listeners, so within seconds Envoy takes it out and
answers new requests at once with the 503 of `status_on_error`, JSON reason and Retry-After;
once the sidecar answers again, the next health check brings it back.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.test_stack_harness import (  # noqa: F401 - fixtures
    HTTP_BOOTSTRAP,
    Reply,
    echo,
    policy_dir,
    request,
    start_envoy,
    workdir,
)

pytestmark = pytest.mark.stack

BOOTSTRAPS = {
    "http": HTTP_BOOTSTRAP,
    "grpc": HTTP_BOOTSTRAP.parent / "bootstrap-ext-authz-grpc.yaml",
    "ext_proc": HTTP_BOOTSTRAP.parent / "bootstrap-ext-proc.yaml",
}
POLICY = (
    "classes:\n"
    "  standard: {rank: 2, latency_objective_ms: 5000, max_wait_ms: 0, triton_priority: 2}\n"
    "tenants:\n"
    "  team:\n"
    f"    match: {{api_key_sha256: [{hashlib.sha256(b'k-team').hexdigest()}]}}\n"
    "    allowed_classes: [standard]\n"
    "    default_class: standard\n"
)
OUT_WITHIN_S = 10.0  # two missed 1 s checks 1 s apart, with room for a loaded host
FAST_S = 0.5  # an answer Envoy gives itself, without waiting on the sidecar
CLIENT_TIMEOUT_S = 2.0


def _infer(port: int) -> tuple[Reply | None, float]:
    """One request; (None, elapsed) when the client gave up waiting."""
    started = time.monotonic()
    try:
        reply: Reply | None = request(
            port,
            "/v2/models/simgpu/infer",
            method="POST",
            headers={"x-api-key": "k-team", "content-type": "application/json"},
            body=b"{}",
            timeout=CLIENT_TIMEOUT_S,
        )
    except TimeoutError:
        reply = None
    return reply, time.monotonic() - started


def _until(port: int, wanted: Any, within_s: float) -> tuple[Reply, float]:
    """Send requests until one's (reply, elapsed) satisfies `wanted`; fails after `within_s`."""
    deadline = time.monotonic() + within_s
    seen: list[tuple[int | None, float]] = []
    while time.monotonic() < deadline:
        reply, elapsed = _infer(port)
        seen.append((reply.status if reply else None, round(elapsed, 2)))
        if reply is not None and wanted(reply, elapsed):
            return reply, elapsed
        time.sleep(0.1)
    raise AssertionError(f"no wanted answer within {within_s} s; (status, seconds): {seen}")


@pytest.mark.parametrize("mode", sorted(BOOTSTRAPS))
def test_a_hung_sidecar_is_taken_out_within_seconds_and_comes_back(
    mode: str,
    tmp_path: Path,
    echo: int,  # noqa: F811 - the fixture imported above
    start_envoy: Any,  # noqa: F811
) -> None:
    from devstack.sidecar_proc import SidecarProcess

    policies = policy_dir(tmp_path, POLICY)
    with SidecarProcess(tmp_path, policies, transport="tcp") as sidecar:
        port = start_envoy(
            BOOTSTRAPS[mode],
            upstream_port=echo,
            sidecar_http_port=sidecar.http_port,
            sidecar_grpc_port=sidecar.grpc_port,
        )
        _until(port, lambda reply, _: reply.status == 200, 10.0)  # the stack works
        assert sidecar.pid is not None
        os.kill(sidecar.pid, signal.SIGSTOP)
        try:
            stopped = time.monotonic()
            reply, elapsed = _until(
                port, lambda reply, elapsed: reply.status == 503 and elapsed < FAST_S, OUT_WITHIN_S
            )
            taken_out_s = time.monotonic() - stopped
            assert reply.json()["reason"] == "sidecar_unavailable", reply.body
            assert reply.headers.get("retry-after") == "1"
        finally:
            os.kill(sidecar.pid, signal.SIGCONT)
        resumed = time.monotonic()
        _until(port, lambda reply, _: reply.status == 200, OUT_WITHIN_S)
        back_s = time.monotonic() - resumed
    # Logged for the record (pytest -s): how long each step took on this host.
    print(
        f"{mode}: out after {taken_out_s:.1f} s ({elapsed:.3f} s answer), back after {back_s:.1f} s"
    )
