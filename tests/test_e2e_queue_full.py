"""Issue 12 on the real stack: a class whose hold queue is full makes room for a new arrival.

After a surge, a full queue of old waiters used to refuse every new arrival of the class for
as long as the backlog took to drain (batch 503s at 1x for over 10 s after the 3x step). Now
the arrival displaces the earliest-deadline waiter of the tenant holding the most, which is
shed 503 at once, and the band serves newest first (core/queue.py).

Envoy (ext_authz HTTP), real Triton running the simulated GPU model, Valkey, the sidecar as
its own process watching Triton every 50 ms. One request in flight at a time
(`max_in_flight: 1`), so that the others are held.
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
QUEUED = 3  # the class's max_queued
LONG_MS = 1500  # the request in flight while the others are held


def write_policy(directory: Path) -> Path:
    return write_policy_file(
        directory,
        f"""
classes:
  batch:
    rank: 1
    latency_objective_ms: 30000
    max_wait_ms: 20000
    triton_priority: 1
    max_queued: {QUEUED}
    overload: {{admit_below: 100, shed_above: 1000, max_in_flight: 1}}
tenants:
  flood:
    match: {{api_key_sha256: [{key_digest("k-flood")}]}}
    allowed_classes: [batch]
    default_class: batch
    max_concurrency: 50
  newcomer:
    match: {{api_key_sha256: [{key_digest("k-newcomer")}]}}
    allowed_classes: [batch]
    default_class: batch
""",
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    yield from watching_stack(tmp_path_factory, "queue-full", write_policy)


def held(stack: LocalStack) -> float:
    return metric_value(stack.admin_url, "qos_held_requests", **{"class": "batch"})


def displaced(stack: LocalStack) -> float:
    return metric_value(
        stack.admin_url,
        "qos_hold_duration_seconds_count",
        **{"class": "batch", "result": "displaced"},
    )


def timed(url: str, key: str, delay_ms: float) -> tuple[Reply, float]:
    """The reply and the monotonic time it came back."""
    reply = infer(url, api_key=key, delay_ms=delay_ms, timeout_s=60)
    return reply, time.monotonic()


def test_a_new_arrival_displaces_the_flooding_tenants_oldest_and_goes_first(
    stack: LocalStack,
) -> None:
    url = stack.url("http")
    displaced_before = displaced(stack)
    with ThreadPoolExecutor(max_workers=QUEUED + 2) as pool:
        long = pool.submit(timed, url, "k-flood", LONG_MS)
        wait_for(
            lambda: metric_value(stack.admin_url, "qos_model_in_flight_requests") >= 1,
            10,
            "the long request in flight",
        )
        flood: list[Future[tuple[Reply, float]]] = []
        for i in range(QUEUED):  # one at a time: their deadlines are in this order
            flood.append(pool.submit(timed, url, "k-flood", 100))
            wait_for(lambda n=i + 1: held(stack) >= n, 10, f"{i + 1} of the flood held")
        assert not long.done(), "the long request ended before the queue was full"
        sent = time.monotonic()
        newcomer = pool.submit(timed, url, "k-newcomer", 100)
        # The flood's oldest waiter makes room: shed at once, long before the GPU is free.
        oldest_reply, oldest_at = flood[0].result(timeout=30)
        assert oldest_reply.status == 503, oldest_reply.body
        assert oldest_reply.headers.get("x-qos-reason") == "overloaded"
        assert oldest_reply.headers.get("retry-after") is not None
        assert not long.done() or oldest_at < long.result()[1], "shed only after the GPU freed"
        assert oldest_at - sent < LONG_MS / 1000
        assert displaced(stack) == displaced_before + 1  # how an operator sees it
        # The newcomer is held, not refused, and takes its tenant's turn once the GPU frees:
        # the flood's next waiter, then the newcomer (its tenant was given nothing yet),
        # before the flood's last.
        new_reply, new_at = newcomer.result(timeout=30)
        assert new_reply.status == 200, new_reply.body
        rest = [f.result(timeout=30) for f in flood[1:]]
        assert all(reply.status == 200 for reply, _ in rest), [r.body for r, _ in rest]
        assert rest[0][1] < new_at < rest[1][1], (new_at, [at for _, at in rest])
        assert long.result(timeout=30)[0].status == 200
    wait_for(lambda: held(stack) == 0, 10, "nothing left held")
