"""Tenant weights on the real stack: held requests of a class are let go in proportion to
their tenants' `weight` (weighted VTC, core/queue.py), not in equal turns.

Envoy (ext_authz HTTP), real Triton running the simulated GPU model, Valkey, the sidecar as
its own process watching Triton every 50 ms. One request in flight at a time
(`max_in_flight: 1`): a long request of a third tenant holds the GPU while both tenants'
requests queue, then they go one by one, and the order they come back in is the order the
sidecar let them go.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from devstack.stack import LocalStack
from tests.stack_client import Reply, infer, key_digest, metric_value, wait_for, write_policy_file
from tests.test_e2e_overload import watching_stack

pytestmark = pytest.mark.stack
EACH = 8  # requests per weighted tenant
LONG_MS = 4000  # the request in flight while the others queue


def write_policy(directory: Path) -> Path:
    tenant = """
  {name}:
    match: {{api_key_sha256: [{digest}]}}
    allowed_classes: [batch]
    default_class: batch
    weight: {weight}"""
    tenants = "".join(
        tenant.format(name=name, digest=key_digest(f"k-{name}"), weight=weight)
        for name, weight in (("starter", 1), ("heavy", 3), ("light", 1))
    )
    return write_policy_file(
        directory,
        f"""
classes:
  batch:
    rank: 1
    latency_objective_ms: 30000
    max_wait_ms: 25000
    triton_priority: 1
    max_queued: 100
    overload: {{admit_below: 100, shed_above: 1000, max_in_flight: 1}}
tenants:{tenants}
""",
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    yield from watching_stack(tmp_path_factory, "tenant-weights", write_policy)


def held(stack: LocalStack) -> float:
    return metric_value(stack.admin_url, "qos_held_requests", **{"class": "batch"})


def timed(url: str, key: str, delay_ms: float) -> tuple[Reply, float]:
    """The reply and the monotonic time it came back."""
    reply = infer(url, api_key=key, delay_ms=delay_ms, timeout_s=60)
    return reply, time.monotonic()


def test_held_requests_go_in_proportion_to_their_tenants_weights(stack: LocalStack) -> None:
    url = stack.url("http")
    with ThreadPoolExecutor(max_workers=2 * EACH + 1) as pool:
        long = pool.submit(timed, url, "k-starter", LONG_MS)
        wait_for(
            lambda: metric_value(stack.admin_url, "qos_model_in_flight_requests") >= 1,
            10,
            "the long request in flight",
        )
        queued: list[tuple[str, Future[tuple[Reply, float]]]] = []
        for i in range(2 * EACH):  # alternately, one at a time: their deadlines in this order
            name = ("heavy", "light")[i % 2]
            queued.append((name, pool.submit(timed, url, f"k-{name}", 50)))
            wait_for(lambda n=i + 1: held(stack) >= n, 10, f"{i + 1} held")
        assert not long.done(), "the long request ended before both tenants queued"
        ended = sorted((future.result(timeout=60)[1], name) for name, future in queued)
        assert all(future.result()[0].status == 200 for _, future in queued)
        assert long.result(timeout=30)[0].status == 200
    # Weight 3 against 1, equal work: three turns to one while both are backlogged. Equal
    # weights would alternate (4 of the first 8); the queue's own order gives 6.
    first = [name for _, name in ended[:EACH]]
    assert first.count("heavy") == 6, first
    wait_for(lambda: held(stack) == 0, 10, "nothing left held")
