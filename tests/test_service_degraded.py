"""The degraded mode through the service: a scripted store outage, local shares, local leases."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from prometheus_client import CollectorRegistry

from sidecar.core.lease import parse_lease
from sidecar.core.types import (
    BucketCheck,
    Decision,
    LeaseRef,
    QuotaCheck,
    QuotaResult,
    Reason,
    RequestAttributes,
)
from sidecar.errors import StateUnavailable
from sidecar.metrics import Metrics
from sidecar.policy.model import FailMode, Policy
from sidecar.service import AdmissionService
from sidecar.state.breaker import CircuitBreaker, GuardedStore
from sidecar.state.memory import MemoryQuotaStore
from tests.core_fixtures import make_policy
from tests.test_state_contract import FakeClock

INFER = "/v2/models/simgpu/infer"


class OutageStore(MemoryQuotaStore):
    """A memory store that, while `down`, fails every call that can fail; counts calls."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock=clock)
        self.down = False
        self.fail_charges = False
        self.releases: list[str] = []
        self.replicas = 2

    def _fail(self, operation: str) -> None:
        if self.down:
            raise StateUnavailable(f"redis {operation}: no answer within 50 ms")

    async def acquire(self, check: QuotaCheck) -> QuotaResult:
        self._fail("acquire")
        return await super().acquire(check)

    async def take_buckets(self, check: QuotaCheck) -> QuotaResult:
        self._fail("take_buckets")
        return await super().take_buckets(check)

    async def release(self, lease: LeaseRef, *, tombstone_s: float = 10.0) -> bool:
        self.releases.append(lease.lease_id)
        self._fail("release")
        return await super().release(lease, tombstone_s=tombstone_s)

    async def charge(self, tenant: str, buckets: Any) -> None:
        self._fail("charge")
        if self.fail_charges:
            raise StateUnavailable("redis charge: no answer within 50 ms")
        await super().charge(tenant, buckets)

    async def heartbeat(self, replica: str, ttl_s: float) -> int:
        self._fail("heartbeat")
        return self.replicas

    async def in_flight_many(self, pairs: Any) -> Any:
        self._fail("in_flight")
        return await super().in_flight_many(pairs)


def policy(replicas: int | None = None) -> Policy:
    base = make_policy()
    classes = dict(base.classes)
    classes["standard"] = replace(classes["standard"], on_state_error=FailMode.LOCAL_SHARE)
    return replace(base, classes=MappingProxyType(classes), replicas=replicas)


def make(replicas: int | None = None) -> tuple[AdmissionService, OutageStore, Metrics]:
    store, metrics = OutageStore(), Metrics(CollectorRegistry())
    guarded = GuardedStore(store, CircuitBreaker(on_change=lambda d: metrics.degraded.set(d)))
    return AdmissionService(policy(replicas), guarded, metrics), store, metrics


def request(klass: str = "standard") -> RequestAttributes:
    return RequestAttributes("POST", INFER, {"x-api-key": "k-search", "x-qos-class": klass})


async def admit_many(service: AdmissionService, n: int) -> list[Decision]:
    return [await service.check(request(), "test") for _ in range(n)]


def test_local_share_admits_at_most_the_limit_over_the_replicas() -> None:
    async def main() -> None:
        service, store, metrics = make()
        assert await service.heartbeat("me", 6.0)  # two replicas, seen before the outage
        store.down = True
        decisions = await admit_many(service, 20)
        admitted = [d for d in decisions if d.admitted]
        # search: max_concurrency 8, so this replica's share is 4 (its bucket's, 10, is more).
        assert len(admitted) == 4
        assert all(d.reason is Reason.ADMITTED for d in admitted)
        assert "takes its local share (1/2 of each limit" in " ".join(admitted[0].trace)
        assert {d.reason for d in decisions if not d.admitted} == {Reason.OVER_CONCURRENCY}
        assert metrics.degraded._value.get() == 1
        assert await service.heartbeat("me", 6.0) is False
        assert service.replicas() == 2  # remembered from before the outage

    asyncio.run(main())


def test_the_policy_replicas_overrides_the_heartbeats() -> None:
    async def main() -> None:
        service, store, _ = make(replicas=4)
        await service.heartbeat("me", 6.0)
        store.down = True
        admitted = [d for d in await admit_many(service, 20) if d.admitted]
        assert len(admitted) == 2  # 8 / 4

    asyncio.run(main())


def test_local_leases_are_released_locally_then_the_store_takes_over() -> None:
    async def main() -> None:
        service, store, _ = make()
        await service.heartbeat("me", 6.0)
        store.down = True
        admitted = [d for d in await admit_many(service, 6) if d.admitted]
        assert len(admitted) == 4
        token = dict(admitted[0].headers)["x-qos-lease"]
        assert await service.complete(token)  # freed here...
        assert parse_lease(token) is not None
        assert store.releases == []  # ...never sent to the store
        assert len(service.local_leases) == 3
        again = await service.check(request(), "test")
        assert again.admitted  # its slot is free again

        store.down = False
        service.store.breaker._next_probe_s = 0.0  # type: ignore[attr-defined]
        await service.store.probe()  # type: ignore[attr-defined]  # the store answers
        back = await service.check(request(), "test")
        assert back.admitted and "local share" not in " ".join(back.trace)
        assert await store.in_flight("search", None) == 1  # new admits go to the store
        for decision in admitted[1:]:  # local leases drain locally
            assert await service.complete(dict(decision.headers)["x-qos-lease"])
        assert store.releases == []
        assert await service.local.in_flight("search", None) == 1  # `again`, still running
        assert await service.complete(dict(again.headers)["x-qos-lease"])
        assert service.local_leases == {} and store.releases == []
        assert await service.local.in_flight("search", None) == 0

    asyncio.run(main())


def test_open_and_closed_classes_keep_their_meaning() -> None:
    async def main() -> None:
        service, store, _ = make()
        store.down = True
        opened = await service.check(request("interactive"), "test")  # fixtures: OPEN
        assert (opened.admitted, opened.reason) == (True, Reason.ADMITTED_FAIL_OPEN)
        analytics = RequestAttributes("POST", INFER, {"x-api-key": "k-analytics"})
        closed = await service.check(analytics, "test")  # batch: CLOSED
        assert (closed.status, closed.reason) == (503, Reason.STATE_UNAVAILABLE)
        assert service.local_leases == {}

    asyncio.run(main())


def test_an_open_circuit_owes_no_release() -> None:
    async def main() -> None:
        service, store, _ = make()
        store.down = True
        await admit_many(service, 10)
        # Only the two calls that reached the store (and may have run there) are owed.
        assert service.leases.backlog == 2

    asyncio.run(main())


def test_in_flight_gauges_keep_moving_while_the_store_is_down() -> None:
    """Last count read, plus what this replica started and ended since (issue 10 §3)."""

    async def main() -> None:
        service, store, metrics = make()
        await service.heartbeat("me", 6.0)

        def gauge() -> float:
            return metrics.in_flight.labels("search", "standard")._value.get()

        before = [d for d in await admit_many(service, 2) if d.admitted]
        assert await service.refresh_in_flight() and gauge() == 2
        store.down = True
        during = [d for d in await admit_many(service, 3) if d.admitted]  # local leases
        assert len(during) == 3
        assert not await service.refresh_in_flight()
        assert gauge() == 5  # 2 read + 3 started here since
        for decision in (*before, during[0]):
            await service.complete(dict(decision.headers)["x-qos-lease"])
        assert not await service.refresh_in_flight()
        assert gauge() == 2  # both of the store's ended (their releases owed) and one local
        store.down = False
        await asyncio.sleep(0.6)  # the circuit's next probe is due...
        await service.store.probe()  # type: ignore[attr-defined]  # ...and the store answers
        assert await service.refresh_in_flight()
        assert gauge() == 2  # the store's count: its two releases are still owed...
        await service.leases.drain()
        assert await service.refresh_in_flight()
        assert gauge() == 0  # ...and done now; the local leases were never in it

    asyncio.run(main())


def test_once_the_circuit_is_open_a_decision_takes_no_loop_tick() -> None:
    """Degraded decisions are made in one step: no batched store call to wait on, so no
    other work of the loop runs in the middle of one (the < 1 ms target of issue 10)."""

    async def main() -> None:
        service, store, _ = make()
        await service.heartbeat("me", 6.0)
        store.down = True
        await admit_many(service, 3)  # the first failures open the circuit
        assert service.store.breaker.is_open  # type: ignore[attr-defined]
        for klass in ("standard", "interactive"):  # local share, fail-open
            step = service.check(request(klass), "test")
            try:
                step.send(None)
            except StopIteration as done:
                decision = done.value
            else:
                step.close()
                raise AssertionError(f"{klass}: the decision waited on the event loop")
            assert decision.admitted

    asyncio.run(main())


def make_clocked(clock: FakeClock) -> tuple[AdmissionService, OutageStore]:
    store, metrics = OutageStore(clock), Metrics(CollectorRegistry())
    guarded = GuardedStore(store, CircuitBreaker(clock=clock))
    return AdmissionService(policy(), guarded, metrics, clock=clock), store


async def spend(service: AdmissionService, n: int) -> list[Decision]:
    """n requests through the store, each ended before the next (the bucket, not the
    concurrency limit, is what runs out)."""
    decisions = []
    for _ in range(n):
        decision = await service.check(request(), "test")
        decisions.append(decision)
        if decision.admitted:
            await service.complete(dict(decision.headers)["x-qos-lease"])
    return decisions


def test_a_bucket_spent_through_the_store_stays_spent_when_it_goes_down() -> None:
    """search: 20 requests of burst, 10 per second. Spent through the store, then the store
    goes down: the local share starts empty, not full, and refills at the share's rate."""

    async def main() -> None:
        clock = FakeClock()
        service, store = make_clocked(clock)
        assert await service.heartbeat("me", 6.0)  # two replicas: a share of 10, 5 per second
        assert [d.admitted for d in await spend(service, 21)] == [True] * 20 + [False]
        store.down = True
        assert [d.reason for d in await spend(service, 2)] == [Reason.OVER_RATE] * 2
        clock.now += 1.0  # the share refills 5 in a second
        assert [d.admitted for d in await spend(service, 6)] == [True] * 5 + [False]

    asyncio.run(main())


def test_what_the_store_refunds_comes_back_to_the_local_share_too() -> None:
    """A token reconciliation refund (here 4 requests' worth) reaches the local record too."""

    async def main() -> None:
        clock = FakeClock()
        service, store = make_clocked(clock)
        assert await service.heartbeat("me", 6.0)
        await spend(service, 20)
        bucket = next(b for b in service.policy.tenants["search"].buckets if b.name == "requests")
        refund = BucketCheck("requests", bucket.rate_per_s, bucket.burst, -4.0)
        await service.tokens._charge("search", [refund])  # the store took it, and the record
        store.down = True
        # This replica's own spend, given back: 4 more here (its half was empty, never owing).
        assert [d.admitted for d in await spend(service, 5)] == [True] * 4 + [False]

    asyncio.run(main())


def test_what_the_local_share_admitted_is_charged_to_the_store_once_it_answers() -> None:
    """The store's bucket refills through an outage while the local share admits: once it
    answers, the local admits are charged there, so its burst is not handed out twice. A
    charge that fails stays owed."""

    async def main() -> None:
        clock = FakeClock()
        service, store = make_clocked(clock)
        assert await service.heartbeat("me", 6.0)  # two replicas: a share of 10
        store.down = True
        assert [d.admitted for d in await spend(service, 11)] == [True] * 10 + [False]
        assert not await service.heartbeat("me", 6.0)  # still down: nothing settled
        store.down = False
        service.store.breaker._next_probe_s = 0.0  # type: ignore[attr-defined]
        await service.store.probe()  # type: ignore[attr-defined]  # the store answers
        store.fail_charges = True  # ...but the charge fails: owed still
        assert await service.heartbeat("me", 6.0)
        store.fail_charges = False
        assert await service.heartbeat("me", 6.0)  # settled: 10 of the store's 20 gone
        assert [d.admitted for d in await spend(service, 11)] == [True] * 10 + [False]
        assert await service.heartbeat("me", 6.0)  # nothing owed now: no second charge
        clock.now += 1.0  # 10 per second
        assert [d.admitted for d in await spend(service, 11)] == [True] * 10 + [False]

    asyncio.run(main())
