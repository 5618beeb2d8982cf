"""Shadow mode on the real stack (issue 13 §1): Valkey, Triton, Envoy and the sidecar.

A tenant whose limits are `enforce: false` is admitted while the metrics say what its
policy would have shed; its shadow leases live in a store space of their own and end with
their requests; then the same policy, enforced, sheds exactly what it would have.
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from devstack.stack import LocalStack
from tests.stack_client import infer, metric_value, wait_for
from tests.test_stack_harness import (  # noqa: F401 - fixtures
    HTTP_BOOTSTRAP,
    echo,
    policy_dir,
    request,
    start_envoy,
    workdir,
)

pytestmark = pytest.mark.stack

MODES = ("http", "extproc")
POLICY = (
    "lease_ttl_s: 60\n"  # a lease's end within the test is its release, not its expiry
    "classes:\n"
    "  interactive: {rank: 1, latency_objective_ms: 1000, max_wait_ms: 0, triton_priority: 1,"
    " on_state_error: closed}\n"
    "tenants:\n"
    "  trial:\n"
    f"    match: {{api_key_sha256: [{hashlib.sha256(b'k-trial').hexdigest()}]}}\n"
    "    allowed_classes: [interactive]\n"
    "    default_class: interactive\n"
    "    max_concurrency: 50\n"
    "    buckets:\n"
    "      - {unit: requests, rate: 0.001, burst: 3}\n"
)


def _version(stack: LocalStack) -> str:
    with urllib.request.urlopen(stack.admin_url + "/v1/policy", timeout=5) as response:
        return str(json.load(response)["version"])


def _decisions(stack: LocalStack, shadow: str, reason: str) -> float:
    return metric_value(
        stack.admin_url, "qos_decisions_total", tenant="trial", shadow=shadow, reason=reason
    )


def _shadow_leases(stack: LocalStack) -> Any:
    import redis

    assert stack.valkey is not None
    client = redis.Redis.from_url(stack.valkey.url)
    try:
        return client.zcard("qos:{trial%1Fshadow}:leases")
    finally:
        client.close()


def test_a_shadowed_tenant_is_admitted_then_the_same_policy_enforced(tmp_path: Path) -> None:
    policies = policy_dir(tmp_path, "enforce: false\n" + POLICY)
    policy_file = policies / "p.yaml"
    with LocalStack(tmp_path / "work", policies, modes=MODES) as stack:
        for mode in MODES:
            statuses = [infer(stack.url(mode), api_key="k-trial").status for _ in range(3)]
            assert statuses == [200, 200, 200], mode
        # Six admitted; the written policy's bucket (burst 3, no refill to speak of) would
        # have shed the last three, whichever Envoy API asked.
        assert _decisions(stack, "false", "admitted") == 6
        assert _decisions(stack, "true", "admitted") == 3
        assert _decisions(stack, "true", "over_rate") == 3
        # Shadow leases were taken in their own space and ended with their requests.
        wait_for(lambda: _shadow_leases(stack) == 0, 10, "shadow leases released")
        assert metric_value(stack.admin_url, "qos_completions_total", result="bad_lease") == 0

        before = _version(stack)
        policy_file.write_text(POLICY)  # the same limits, enforced
        wait_for(lambda: _version(stack) != before, 10, "enforced policy loaded")
        statuses = [infer(stack.url("http"), api_key="k-trial").status for _ in range(5)]
        # The enforced bucket was never drawn on while shadowed: its burst, then 429.
        assert statuses == [200, 200, 200, 429, 429]
        assert _decisions(stack, "false", "over_rate") == 2


def test_upstream_sees_what_the_written_policy_decided(
    tmp_path: Path,
    echo: int,  # noqa: F811 - the fixture imported above
    start_envoy: Any,  # noqa: F811
) -> None:
    """The real sidecar behind the shipped HTTP bootstrap, an echo server as Triton: every
    admitted request carries `x-qos-shadow-decision` upstream, and a client's forged copy
    never passes."""
    from devstack.sidecar_proc import SidecarProcess

    policies = policy_dir(tmp_path, "enforce: false\n" + POLICY)
    with SidecarProcess(tmp_path, policies, transport="tcp") as sidecar:
        port = start_envoy(HTTP_BOOTSTRAP, upstream_port=echo, sidecar_http_port=sidecar.http_port)
        seen: list[list[str]] = []
        for _ in range(5):
            reply = request(
                port,
                "/v2/models/simgpu/infer",
                method="POST",
                headers={"x-api-key": "k-trial", "x-qos-shadow-decision": "admit 200 forged"},
                body=b"{}",
            )
            assert reply.status == 200
            seen.append(reply.json()["headers"]["x-qos-shadow-decision"])
    assert seen == [["admit 200 admitted"]] * 3 + [["shed 429 over_rate"]] * 2
