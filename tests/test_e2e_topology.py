"""Issue 10 §1 on the real stack: the topology decides whose in-flight count `max_in_flight`
caps.

Two sidecar processes on one Valkey, both watching one real Triton (the cheapest setup that
shows the scope: the cap is applied from the store's count, which is what the topology
changes). Pod topology: each is one pod's sidecar and reaches its own cap. Gateway topology:
they front one pool, and the cap is the pool's. Decisions are asked of each sidecar's ext_authz
HTTP listener directly, as Envoy would; no completion arrives, so each admit keeps its slot.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest
import redis

from devstack.procs import ValkeyProcess
from devstack.sidecar_proc import SidecarProcess
from devstack.triton import TritonProcess
from tests.stack_client import (
    INFER_PATH,
    Reply,
    key_digest,
    metric_value,
    post,
    wait_for,
    write_policy_file,
)

pytestmark = pytest.mark.stack
CAP = 2


# The tenant's limit: a concurrency limit (exact mode: a lease in its sets per request), or a
# leased bucket and none (leased mode: each request's lease is its model's entry alone).
EXACT = "max_concurrency: 50"
LEASED = "buckets: [{unit: requests, rate: 1000, burst: 100, lease_ms: 1000}]"


def write_policy(directory: Path, limit: str = EXACT) -> Path:
    key = key_digest("k-app")
    return write_policy_file(
        directory,
        f"""
classes:
  standard:
    rank: 1
    latency_objective_ms: 2000
    max_wait_ms: 300
    triton_priority: 1
    overload: {{admit_below: 100, shed_above: 1000, max_in_flight: {CAP}}}
tenants:
  app:
    match: {{api_key_sha256: [{key}]}}
    allowed_classes: [standard]
    default_class: standard
    {limit}
""",
    )


def ask(sidecar: SidecarProcess) -> Reply:
    """One ext_authz HTTP check, as Envoy sends it."""
    url = f"http://127.0.0.1:{sidecar.http_port}/authz{INFER_PATH}"
    return post(url, {}, {"x-api-key": "k-app"}, timeout_s=10)


def admits_until_refused(sidecar: SidecarProcess) -> int:
    """Ask one after the other until a request is not admitted (held to its max_wait_ms, then
    refused, or refused at once); how many were admitted."""
    for admitted in range(CAP + 2):
        if ask(sidecar).status != 200:
            return admitted
    return CAP + 2


@pytest.mark.parametrize(
    ("pods", "expected", "limit"),
    [
        (("pod-a", "pod-b"), [CAP, CAP], EXACT),  # each pod its own cap: 2 x CAP at once
        (("", ""), [CAP, 0], EXACT),  # gateway: one pool, one cap
        (("", ""), [CAP, 0], LEASED),  # the same with no lease in the tenant's sets
    ],
    ids=["pod", "gateway", "gateway-leased"],
)
def test_each_pod_reaches_its_own_max_in_flight(
    valkey_and_triton: tuple[Path, ValkeyProcess, TritonProcess],
    pods: tuple[str, str],
    expected: list[int],
    limit: str,
) -> None:
    work, valkey, triton = valkey_and_triton
    store = redis.Redis.from_url(valkey.url, decode_responses=True)
    store.flushall()
    policy = write_policy(work / "policies", limit)
    with contextlib.ExitStack() as stack:
        sidecars = [
            stack.enter_context(
                SidecarProcess(
                    work,
                    policy,
                    redis_url=valkey.url,
                    transport="tcp",
                    pod_id=pod,
                    extra_env={
                        "QOS_TRITON_URLS": triton.http_url,
                        "QOS_TRITON_METRICS_URLS": triton.metrics_url,
                        "QOS_TRITON_SCRAPE_MS": "50",
                    },
                )
            )
            for pod in pods
        ]
        first, second = sidecars
        got = [admits_until_refused(first)]
        # The first replica's admits are in the store (its own refresh read them back)...
        wait_for(
            lambda: metric_value(first.admin_url, "qos_model_in_flight_requests") == CAP,
            10,
            f"the first sidecar's model count read back from the store (it admitted {got})",
        )
        # ...and the second's refresh (every 50 ms) has had ten chances to read them: in the
        # gateway topology it must see them, in the pod topology it must not count them.
        time.sleep(0.5)
        got.append(admits_until_refused(second))
        assert got == expected
        if pods[0]:
            for pod in pods:
                assert store.zcard(f"qos:{{=simgpu@{pod}}}:model_leases") == CAP
            assert not store.exists("qos:{=simgpu}:model_leases")
            assert metric_value(second.admin_url, "qos_model_in_flight_requests") == CAP
        else:
            assert store.zcard("qos:{=simgpu}:model_leases") == CAP
        # Tenant concurrency stays global in both: every admit counts once for the tenant;
        # in leased mode the model's entry is each admit's whole lease.
        assert store.zcard("qos:{app}:leases") == (sum(expected) if limit == EXACT else 0)
        if limit == LEASED:
            assert metric_value(first.admin_url, "qos_slice_calls_total", call="slice") == 1
    store.close()
