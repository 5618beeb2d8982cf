"""Leased mode through the service (`sidecar/leased.py`, rules in `core.slices`): decisions
spend slices held locally, the store sees one call per slice, two replicas together never
admit more than the bucket, and what a slice did not spend goes back. On the memory store and
on a real Valkey."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from types import MappingProxyType
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from sidecar.core.types import Decision, QuotaCheck, QuotaResult, Reason, RequestAttributes
from sidecar.metrics import Metrics
from sidecar.policy.model import BucketPolicy, BucketUnit, FailMode, Policy
from sidecar.service import AdmissionService
from sidecar.state.base import QuotaStore
from sidecar.state.memory import MemoryQuotaStore
from sidecar.state.redis_store import RedisQuotaStore
from tests.core_fixtures import make_policy
from tests.fixtures_valkey import ValkeyServer
from tests.test_service_degraded import OutageStore
from tests.test_state_contract import FakeClock

INFER = "/v2/models/simgpu/infer"


def leased_policy(rate: float, burst: float, lease_ms: int) -> Policy:
    """`analytics` (no concurrency limit) with one leased bucket."""
    policy = make_policy()
    bucket = BucketPolicy("requests", BucketUnit.REQUESTS, rate, burst, lease_ms=lease_ms)
    tenants = dict(policy.tenants)
    tenants["analytics"] = replace(tenants["analytics"], buckets=(bucket,))
    return replace(policy, tenants=MappingProxyType(tenants))


def request() -> RequestAttributes:
    return RequestAttributes("POST", INFER, {"x-api-key": "k-analytics"})


class Counting:
    """A store wrapper that counts `take_buckets` calls (the only call leased mode makes). Its
    calls stand for round trips, so the service batches its acquires as a remote store's."""

    answers_inline = False

    def __init__(self, inner: QuotaStore) -> None:
        self.inner, self.takes, self.acquires = inner, 0, 0
        self.on_the_way = self.most_on_the_way = 0

    async def take_buckets(self, check: QuotaCheck) -> QuotaResult:
        self.takes += 1
        self.on_the_way += 1
        self.most_on_the_way = max(self.most_on_the_way, self.on_the_way)
        try:
            await asyncio.sleep(0.001)  # a round trip: other decisions run meanwhile
            return await self.inner.take_buckets(check)
        finally:
            self.on_the_way -= 1

    async def acquire_many(self, checks: Any) -> Any:
        self.acquires += len(checks)
        return await self.inner.acquire_many(checks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def valkey() -> Iterator[ValkeyServer]:
    with ValkeyServer() as server:
        yield server


def test_decisions_spend_the_slice_and_the_store_sees_one_call_per_slice() -> None:
    async def body() -> tuple[int, Counting, AdmissionService]:
        store = Counting(MemoryQuotaStore())
        service = AdmissionService(
            leased_policy(1000.0, 200.0, 100), store, Metrics(CollectorRegistry())
        )  # slices of min(1000/s x 0.1 s, 200 / 2) = 100
        decisions = [await service.check(request(), "test") for _ in range(150)]
        admitted = sum(1 for d in decisions if d.reason is Reason.ADMITTED)
        assert all(d.lease is None and d.charged for d in decisions)  # no lease, charged
        return admitted, store, service

    admitted, store, service = asyncio.run(body())
    assert admitted == 150
    assert (store.takes, store.acquires) == (2, 0)  # 100 + 100 units: 2 calls for 150
    assert service.slices.held("analytics", "requests") == 50.0


def test_a_tenant_with_a_concurrency_limit_stays_exact() -> None:
    policy = leased_policy(1000.0, 200.0, 100)
    tenants = dict(policy.tenants)
    tenants["analytics"] = replace(tenants["analytics"], max_concurrency=100)
    policy = replace(policy, tenants=MappingProxyType(tenants))

    async def body() -> Counting:
        store = Counting(MemoryQuotaStore())
        service = AdmissionService(policy, store, Metrics(CollectorRegistry()))
        for _ in range(5):
            assert (await service.check(request(), "test")).lease is not None
        return store

    store = asyncio.run(body())
    assert (store.takes, store.acquires) == (0, 5)


@pytest.mark.stack
def test_two_replicas_never_admit_more_than_the_bucket(
    valkey: ValkeyServer,
) -> None:
    """10/s, burst 20, slices of 2 units for 200 ms; two replicas ask as fast as they can
    for 1.5 s: together at most burst + rate x elapsed (units are taken before they are
    spent), and at least the burst."""
    policy = leased_policy(10.0, 20.0, 200)

    async def body() -> tuple[int, float, int]:
        replicas = [
            AdmissionService(
                policy, RedisQuotaStore(valkey.url, timeout_s=2.0), Metrics(CollectorRegistry())
            )
            for _ in range(2)
        ]
        await replicas[0].store.charge("analytics", [])  # connect before the clock starts
        started = time.monotonic()

        async def hammer(service: AdmissionService) -> int:
            admitted = 0
            while time.monotonic() - started < 1.5:
                if (await service.check(request(), "test")).admitted:
                    admitted += 1
                else:
                    await asyncio.sleep(0.005)
            return admitted

        counts = await asyncio.gather(*(hammer(s) for s in replicas))
        elapsed = time.monotonic() - started
        for service in replicas:
            await service.store.close()
        return sum(counts), elapsed

    admitted, elapsed = asyncio.run(body())
    assert 20 <= admitted <= 20 + 10 * elapsed + 1  # never more than the bucket holds


def test_what_a_slice_did_not_spend_goes_back_to_the_other_replicas() -> None:
    """Burst 20, slices of 10 (1/s x 10 s, half the burst); the store's clock stands still
    (no refill), the replicas' clock moves. A spends 1 of its slice; B takes the other 10 and
    the bucket is empty. Once A's slice is over and given back, B can use A's 9 units, and
    not one more."""
    store_clock, replica_clock = FakeClock(), FakeClock()
    store = MemoryQuotaStore(clock=store_clock)
    policy = leased_policy(1.0, 20.0, 10_000)

    def replica() -> AdmissionService:
        return AdmissionService(policy, store, Metrics(CollectorRegistry()), clock=replica_clock)

    async def body() -> tuple[int, int]:
        a, b = replica(), replica()
        assert (await a.check(request(), "test")).admitted  # A holds 9
        b_first = [await b.check(request(), "test") for _ in range(11)]
        assert [d.admitted for d in b_first] == [True] * 10 + [False]  # the bucket is empty
        replica_clock.now += 10.0  # slices over; the bucket has not refilled
        await b.return_slices()  # B spent all of its own: nothing to give back
        before = sum([(await b.check(request(), "test")).admitted for _ in range(3)])
        await a.return_slices()  # A's 9 go back
        after = 0
        while (await b.check(request(), "test")).admitted:
            after += 1
        return before, after

    assert asyncio.run(body()) == (0, 9)


def test_an_admit_envoy_never_used_gives_its_units_back_to_the_bucket() -> None:
    """A leased admit takes no lease, but its units were charged: an answer that never
    reached Envoy returns them (as an exact admit returns its lease and charges)."""
    store_clock = FakeClock()
    store = MemoryQuotaStore(clock=store_clock)
    policy = leased_policy(1.0, 20.0, 10_000)  # slices of 10

    async def body() -> tuple[bool, bool]:
        service = AdmissionService(policy, store, Metrics(CollectorRegistry()))
        decision = await service.check(request(), "test")  # the bucket: 20 - 10 = 10 left
        assert decision.admitted and decision.lease is None
        await service.release_undelivered(decision)
        whole = check_of(decision, cost=11.0)  # 11 fit only with the unit given back
        given_back = (await store.take_buckets(whole)).allowed
        return given_back, (await store.take_buckets(check_of(decision, cost=1.0))).allowed

    assert asyncio.run(body()) == (True, False)


def check_of(decision: Any, cost: float) -> QuotaCheck:
    [bucket] = decision.charged
    return QuotaCheck("analytics", "batch", (replace(bucket, cost=cost),), None, None, 30.0)


def test_many_decisions_at_once_share_one_ask_and_ask_again_in_turn() -> None:
    """40 decisions arrive together with nothing held; slices of 10 from a burst of 20: they
    wait for one ask at a time and spend what each brings; the rest are refused, and no
    decision fails because another's ask ended (several waiters woke to ask again)."""

    async def body() -> tuple[list[bool], int, float]:
        store = Counting(MemoryQuotaStore())
        service = AdmissionService(
            leased_policy(100.0, 20.0, 100), store, Metrics(CollectorRegistry())
        )  # slices of min(100/s x 0.1 s, 20 / 2) = 10
        started = time.monotonic()
        decisions = await asyncio.gather(*(service.check(request(), "test") for _ in range(40)))
        return [d.admitted for d in decisions], store.most_on_the_way, time.monotonic() - started

    admitted, most_on_the_way, elapsed = asyncio.run(body())
    assert 20 <= sum(admitted) <= 20 + 100 * elapsed + 1  # the burst, and what refilled
    assert most_on_the_way == 1  # one ask of the tenant's at a time


def test_everything_held_goes_back_at_shutdown() -> None:
    store = MemoryQuotaStore(clock=FakeClock())  # no refill
    policy = leased_policy(1.0, 20.0, 10_000)  # slices of 10

    async def body() -> tuple[bool, bool]:
        service = AdmissionService(policy, store, Metrics(CollectorRegistry()))
        decision = await service.check(request(), "test")  # 9 held here, 10 in the bucket
        await service.return_slices()  # nothing expired yet: nothing back
        before = (await store.take_buckets(check_of(decision, cost=11.0))).allowed
        await service.return_slices(everything=True)
        return before, (await store.take_buckets(check_of(decision, cost=19.0))).allowed

    assert asyncio.run(body()) == (False, True)


def test_slices_the_store_charged_count_in_the_local_share_when_it_stalls() -> None:
    """Burst 20 (1/s) taken as two slices of 10 and spent; then the store stalls. The local
    share starts from the 20 the store charged, not from a full bucket: 10 s later it admits
    the 10 the bucket refilled, as the store would, not 20."""
    clock = FakeClock()
    store = OutageStore(clock)
    base = leased_policy(1.0, 20.0, 10_000)
    local_share = {k: replace(c, on_state_error=FailMode.LOCAL_SHARE)
                   for k, c in base.classes.items()}  # fmt: skip
    policy = replace(base, classes=MappingProxyType(local_share))

    async def body() -> tuple[list[bool], list[Decision]]:
        service = AdmissionService(policy, store, Metrics(CollectorRegistry()), clock=clock)
        spent = [(await service.check(request(), "test")).admitted for _ in range(21)]
        store.down = True
        clock.now += 10.0  # both slices over: the next request asks the stalled store
        return spent, [await service.check(request(), "test") for _ in range(12)]

    spent, stalled = asyncio.run(body())
    assert spent == [True] * 20 + [False]
    assert [d.admitted for d in stalled] == [True] * 10 + [False] * 2
    assert "takes its local share" in " ".join(stalled[0].trace)
    assert stalled[-1].reason is Reason.OVER_RATE
