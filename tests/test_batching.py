"""Store calls sent together (`sidecar/batching.py`), and the concurrency grace: what a
burst of completions costs in store calls, and what a closed-loop client at its limit sees."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from prometheus_client import CollectorRegistry

from sidecar.batching import Batcher
from sidecar.core.types import LeaseRef, QuotaCheck, QuotaResult, RequestAttributes
from sidecar.errors import StateUnavailable
from sidecar.metrics import Metrics
from sidecar.service import AdmissionService
from sidecar.state.memory import MemoryQuotaStore
from tests.core_fixtures import make_policy


class Recording:
    """A `release_many` that records each call, answers after a tick, and can fail."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.failing: set[str] = set()
        self.down = False

    async def __call__(self, leases: list[LeaseRef]) -> list[bool | None]:
        self.calls.append([lease.lease_id for lease in leases])
        await asyncio.sleep(0.01)
        if self.down:
            raise StateUnavailable("redis release_many: no answer within 50 ms")
        return [None if lease.lease_id in self.failing else True for lease in leases]


def lease(n: int) -> LeaseRef:
    return LeaseRef("acme", "gold", f"l{n}")


def test_releases_asked_for_together_share_one_call_and_later_ones_the_next() -> None:
    store = Recording()
    batcher: Batcher[LeaseRef, bool] = Batcher(store)

    async def body() -> None:
        first = [asyncio.create_task(batcher.submit(lease(n))) for n in range(100)]
        await asyncio.sleep(0)  # the tick ends: the 100 go out in one call
        later = [asyncio.create_task(batcher.submit(lease(n))) for n in range(100, 150)]
        assert all(await asyncio.gather(*first, *later))
        # The 50 that came while the first call was out went together once it was back.
        assert [len(call) for call in store.calls] == [100, 50]

    asyncio.run(body())


def test_a_failed_lease_or_call_raises_for_its_callers_only() -> None:
    store = Recording()
    batcher: Batcher[LeaseRef, bool] = Batcher(store)

    async def body() -> None:
        store.failing = {"l1"}
        results = await asyncio.gather(
            *(batcher.submit(lease(n)) for n in range(3)), return_exceptions=True
        )
        assert results[0] is True and results[2] is True
        assert isinstance(results[1], StateUnavailable)
        store.down = True
        with pytest.raises(StateUnavailable):
            await batcher.submit(lease(9))

    asyncio.run(body())


def test_a_cancelled_caller_does_not_stop_its_release() -> None:
    store = Recording()
    batcher: Batcher[LeaseRef, bool] = Batcher(store)

    async def body() -> None:
        task = asyncio.create_task(batcher.submit(lease(1)))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.sleep(0.05)
        assert store.calls == [["l1"]]

    asyncio.run(body())


def request() -> RequestAttributes:
    return RequestAttributes("POST", "/v2/models/m/infer", {"x-api-key": "k-search"})


def test_a_refusal_for_concurrency_waits_for_the_release_on_its_way() -> None:
    """search may run 8 at once. The 9th is refused at first, then admitted as soon as one
    of the 8 is released: 20 ms later here, well within the grace."""
    policy = make_policy()
    search = dataclasses.replace(policy.tenants["search"], buckets=())
    policy = dataclasses.replace(policy, tenants={**policy.tenants, "search": search})
    service = AdmissionService(
        policy, MemoryQuotaStore(), Metrics(CollectorRegistry()), release_grace_s=0.5
    )

    async def body() -> None:
        running = [await service.check(request(), "test") for _ in range(8)]
        assert all(d.admitted for d in running)
        ninth = asyncio.create_task(service.check(request(), "test"))
        await asyncio.sleep(0.02)
        assert not ninth.done()  # waiting for a release, not refused yet
        await service.complete(dict(running[0].headers)["x-qos-lease"])
        decision = await asyncio.wait_for(ninth, 0.2)  # long before the grace ends
        assert decision.admitted
        assert any("waits up to 0.5s for a release" in line for line in decision.trace)
        # None on its way: the 10th is refused, after the grace.
        refused = await service.check(request(), "test")
        assert refused.status == 429

    asyncio.run(body())


class Suspending(MemoryQuotaStore):
    """A store whose acquires wait a tick, as a remote store's round trip does."""

    answers_inline = False

    async def acquire(self, check: QuotaCheck) -> QuotaResult:
        await asyncio.sleep(0)
        return await super().acquire(check)


def test_an_in_process_store_answers_a_decision_inline_and_a_remote_one_is_batched() -> None:
    """The memory store's acquire never suspends: the decision is made within the step that
    asked (no batch, no loop turn: the task is done after one step). A store whose acquire
    waits for a round trip goes through the acquire batcher, where concurrent decisions share
    one call."""
    policy = make_policy()

    async def body() -> None:
        inline = AdmissionService(policy, MemoryQuotaStore(), Metrics(CollectorRegistry()))
        step = asyncio.get_running_loop().create_task(inline.check(request(), "test"))
        await asyncio.sleep(0)  # the task's first step runs here, and only that
        assert step.done() and step.result().admitted
        assert inline.acquires.batches == 0
        remote = AdmissionService(policy, Suspending(), Metrics(CollectorRegistry()))
        decisions = await asyncio.gather(*(remote.check(request(), "test") for _ in range(5)))
        assert all(d.admitted for d in decisions)
        assert (remote.acquires.batches, remote.acquires.sent) == (1, 5)

    asyncio.run(body())
