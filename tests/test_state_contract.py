"""One contract, two stores: every test taking `harness` runs against `MemoryQuotaStore` and
against `RedisQuotaStore` on a real Valkey server.

Time: the memory store runs on a fake clock the tests move. Redis uses its own clock, so the
Redis runs never wait for a bucket to refill; they use slow rates (a token every few seconds),
where the few milliseconds a test takes change `retry_after_s` by a negligible amount.
The only real wait is lease expiry on Redis, with a 50 ms TTL, polled with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from sidecar.app import make_store
from sidecar.core.fleet import encode_summary
from sidecar.core.lease import format_lease, parse_lease
from sidecar.core.types import BucketCheck, LeaseRef, LimitKind, QuotaCheck, QuotaResult
from sidecar.errors import StateUnavailable
from sidecar.metrics import Metrics
from sidecar.settings import Settings
from sidecar.state import MemoryQuotaStore, QuotaStore, RedisQuotaStore
from sidecar.state.breaker import GuardedStore
from sidecar.state.keys import encode_name
from tests.fixtures_valkey import ValkeyServer, free_port
from tests.test_state_keys import cluster_hash_tag

# Redis answers a few ms after the previous call, so its retry_after_s values are that much
# below the exact ones the fake clock gives. Generous, because CI machines are noisy.
SLACK_S = 0.25


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Harness:
    kind: str
    make_store: Callable[[], QuotaStore]
    clock: FakeClock | None  # None for Redis: time is the server's

    def run(self, body: Callable[[QuotaStore], Awaitable[None]]) -> None:
        """Run `body` with a fresh store on a fresh event loop, and close the store."""

        async def main() -> None:
            store = self.make_store()
            try:
                await body(store)
            finally:
                await store.close()

        asyncio.run(main())

    async def let_leases_expire(
        self, store: QuotaStore, ttl_s: float, tenant: str, model: str | None = None
    ) -> None:
        """Until the tenant's leases (and the model's, if given) have expired."""
        if self.clock is not None:
            self.clock.advance(ttl_s)
            return
        deadline = time.monotonic() + 2.0
        while await store.in_flight(tenant, None) > 0 or (
            model is not None and await store.model_in_flight(model) > 0
        ):
            assert time.monotonic() < deadline, "leases did not expire within 2 s"
            await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def valkey() -> Iterator[ValkeyServer]:
    with ValkeyServer() as server:
        yield server


@pytest.fixture
def redis_sync(valkey: ValkeyServer) -> Iterator[redis.Redis]:
    """A plain client to inspect and reset the server; the db is emptied for each test."""
    client = redis.Redis.from_url(valkey.url, decode_responses=True)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.stack)])
def harness(request: pytest.FixtureRequest) -> Harness:
    if request.param == "memory":
        clock = FakeClock()
        return Harness("memory", lambda: MemoryQuotaStore(clock=clock), clock)
    server: ValkeyServer = request.getfixturevalue("valkey")
    request.getfixturevalue("redis_sync")  # empty db
    # A deadline far above the default: these tests are about semantics, not latency, and
    # 50 concurrent first connections on a busy CI machine can take longer than 50 ms.
    return Harness("redis", lambda: RedisQuotaStore(server.url, timeout_s=2.0), None)


def bucket(name: str = "req", rate: float = 0.5, burst: float = 5, cost: float = 1) -> BucketCheck:
    return BucketCheck(name=name, rate_per_s=rate, burst=burst, cost=cost)


def check(
    *buckets: BucketCheck,
    tenant: str = "acme",
    klass: str = "standard",
    max_concurrency: int | None = None,
    max_class_concurrency: int | None = None,
    lease_ttl_s: float = 60.0,
    model: str | None = None,
) -> QuotaCheck:
    return QuotaCheck(
        tenant=tenant,
        klass=klass,
        buckets=buckets,
        max_concurrency=max_concurrency,
        max_class_concurrency=max_class_concurrency,
        lease_ttl_s=lease_ttl_s,
        model=model,
    )


def model_step_failures(metrics: Metrics) -> float:
    """Model steps that failed without failing their call, as Prometheus reports them (the
    labelled series exists only from the first)."""
    value = metrics.registry.get_sample_value(
        "qos_state_errors_total", {"operation": "model_lease"}
    )
    return value or 0.0


def lease_of(c: QuotaCheck, result: QuotaResult) -> LeaseRef:
    assert result.lease_id is not None
    return LeaseRef.of(c, result.lease_id)


def assert_retry_after(harness: Harness, result: QuotaResult, exact_s: float) -> None:
    """Exact on the fake clock; on Redis, at most `exact_s` and not much less."""
    if harness.clock is not None:
        assert result.retry_after_s == pytest.approx(exact_s)
    else:
        assert exact_s - SLACK_S < result.retry_after_s <= exact_s + 1e-6


# -- buckets --------------------------------------------------------------------------------


def test_burst_passes_then_denies_with_retry_after_one_emission(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        c = check(bucket(rate=0.5, burst=5))
        results = [await store.acquire(c) for _ in range(5)]
        assert all(r.allowed for r in results)
        assert [r.in_flight for r in results] == [1, 2, 3, 4, 5]
        assert [r.class_in_flight for r in results] == [1, 2, 3, 4, 5]
        assert len({r.lease_id for r in results}) == 5

        denied = await store.acquire(c)
        assert not denied.allowed
        assert denied.denied_by is LimitKind.BUCKET
        assert denied.denied_bucket == "req"
        assert denied.lease_id is None
        assert denied.in_flight == 5
        assert_retry_after(harness, denied, 1 / 0.5)

    harness.run(body)


def test_retry_after_counts_the_cost_asked(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        c = check(bucket(rate=2, burst=10, cost=4))
        assert (await store.acquire(c)).allowed
        assert (await store.acquire(c)).allowed  # 8 of 10 taken
        denied = await store.acquire(c)
        assert denied.denied_by is LimitKind.BUCKET
        assert_retry_after(harness, denied, (4 - 2) / 2)  # 2 units short at 2 per second

    harness.run(body)


def test_cost_above_burst_is_denied_with_full_refill_time_and_charges_nothing(
    harness: Harness,
) -> None:
    async def body(store: QuotaStore) -> None:
        denied = await store.acquire(check(bucket(rate=0.5, burst=5, cost=6)))
        assert denied.denied_by is LimitKind.BUCKET
        assert denied.retry_after_s == pytest.approx(5 / 0.5)  # no clock involved: exact
        results = [await store.acquire(check(bucket(rate=0.5, burst=5))) for _ in range(6)]
        assert [r.allowed for r in results] == [True] * 5 + [False]

    harness.run(body)


def test_zero_cost_passes_an_empty_bucket(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        assert (await store.acquire(check(bucket(burst=1)))).allowed
        assert not (await store.acquire(check(bucket(burst=1)))).allowed
        free = await store.acquire(check(bucket(burst=1, cost=0)))
        assert free.allowed
        assert free.lease_id is not None  # still a request in flight

    harness.run(body)


def test_the_bucket_with_the_longest_wait_is_reported(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        c = check(bucket("fast", rate=1, burst=1), bucket("slow", rate=0.1, burst=1))
        assert (await store.acquire(c)).allowed
        denied = await store.acquire(c)
        assert denied.denied_by is LimitKind.BUCKET
        assert denied.denied_bucket == "slow"
        assert_retry_after(harness, denied, 10.0)

    harness.run(body)


def test_a_bucket_denial_charges_no_other_bucket_and_takes_no_lease(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        roomy, tight = bucket("roomy", burst=3), bucket("tight", burst=1)
        assert (await store.acquire(check(roomy, tight))).allowed  # roomy: 2 left
        denied = await store.acquire(check(roomy, tight))
        assert denied.denied_bucket == "tight"
        assert denied.in_flight == 1
        assert await store.in_flight("acme", None) == 1
        # roomy still has exactly 2: the denied call did not charge it.
        results = [await store.acquire(check(roomy)) for _ in range(3)]
        assert [r.allowed for r in results] == [True, True, False]

    harness.run(body)


# -- concurrency ----------------------------------------------------------------------------


def test_a_concurrency_denial_charges_no_bucket(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        c = check(bucket(burst=2), max_concurrency=1)
        first = await store.acquire(c)
        assert first.allowed
        denied = await store.acquire(c)
        assert denied.denied_by is LimitKind.CONCURRENCY
        assert denied.retry_after_s == 0.0
        assert denied.denied_bucket is None
        assert (denied.in_flight, denied.class_in_flight) == (1, 1)

        assert await store.release(lease_of(c, first))
        second = await store.acquire(c)
        assert second.allowed  # the bucket had 1 left: the denial took none
        assert await store.release(lease_of(c, second))
        assert (await store.acquire(c)).denied_by is LimitKind.BUCKET

    harness.run(body)


def test_class_concurrency_is_per_class(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        gold = check(klass="gold", max_class_concurrency=1, max_concurrency=3)
        bronze = check(klass="bronze", max_class_concurrency=1, max_concurrency=3)
        assert (await store.acquire(gold)).allowed
        denied = await store.acquire(gold)
        assert denied.denied_by is LimitKind.CLASS_CONCURRENCY
        assert denied.retry_after_s == 0.0
        assert (denied.in_flight, denied.class_in_flight) == (1, 1)

        other = await store.acquire(bronze)
        assert other.allowed
        assert (other.in_flight, other.class_in_flight) == (2, 1)
        assert await store.in_flight("acme", None) == 2
        assert await store.in_flight("acme", "gold") == 1
        assert await store.in_flight("acme", "silver") == 0
        assert await store.in_flight("nobody", None) == 0

    harness.run(body)


def test_denials_name_class_concurrency_then_concurrency_then_buckets(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        taken = check(bucket(burst=1))
        assert (await store.acquire(taken)).allowed  # bucket empty, 1 in flight, 1 in class

        every_limit = check(bucket(burst=1), max_concurrency=1, max_class_concurrency=1)
        assert (await store.acquire(every_limit)).denied_by is LimitKind.CLASS_CONCURRENCY
        tenant_and_bucket = check(bucket(burst=1), max_concurrency=1, max_class_concurrency=2)
        assert (await store.acquire(tenant_and_bucket)).denied_by is LimitKind.CONCURRENCY
        bucket_only = check(bucket(burst=1), max_concurrency=2, max_class_concurrency=2)
        assert (await store.acquire(bucket_only)).denied_by is LimitKind.BUCKET
        assert await store.in_flight("acme", None) == 1

    harness.run(body)


def test_zero_concurrency_refuses_everything(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        denied = await store.acquire(check(max_concurrency=0))
        assert denied.denied_by is LimitKind.CONCURRENCY

    harness.run(body)


def test_release_frees_a_slot_once(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        c = check(max_concurrency=1)
        result = await store.acquire(c)
        assert not (await store.acquire(c)).allowed
        assert await store.release(lease_of(c, result)) is True
        assert await store.release(lease_of(c, result)) is False
        assert await store.in_flight("acme", None) == 0
        assert await store.in_flight("acme", "standard") == 0
        assert (await store.acquire(c)).allowed
        unknown = LeaseRef(tenant="nobody", klass="standard", lease_id="x")
        assert await store.release(unknown) is False

    harness.run(body)


def test_leases_expire_after_their_ttl(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        c = check(max_concurrency=1, lease_ttl_s=0.05)
        held = await store.acquire(c)
        assert held.allowed
        assert not (await store.acquire(c)).allowed

        await harness.let_leases_expire(store, 0.05, "acme")
        assert await store.in_flight("acme", "standard") == 0
        assert await store.release(lease_of(c, held)) is False  # expired: nothing freed
        again = await store.acquire(c)
        assert again.allowed
        assert again.in_flight == 1

    harness.run(body)


def test_concurrent_acquires_never_exceed_the_limit(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        c = check(bucket(rate=0.5, burst=100), max_concurrency=10)
        results = await asyncio.gather(*(store.acquire(c) for _ in range(50)))
        assert sum(r.allowed for r in results) == 10
        assert {r.denied_by for r in results if not r.allowed} == {LimitKind.CONCURRENCY}
        assert await store.in_flight("acme", None) == 10

    harness.run(body)


# -- peek and charge ------------------------------------------------------------------------


def test_peek_answers_like_acquire_and_takes_nothing(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        c = check(bucket(burst=2), max_concurrency=5)
        for _ in range(5):
            peeked = await store.peek(c)
            assert peeked.allowed
            assert peeked.lease_id is None
            assert peeked.in_flight == 0
        assert (await store.acquire(c)).allowed
        assert (await store.acquire(c)).allowed

        peeked = await store.peek(c)
        assert peeked.denied_by is LimitKind.BUCKET
        assert_retry_after(harness, peeked, 2.0)
        assert (peeked.in_flight, peeked.class_in_flight) == (2, 2)
        assert (await store.peek(check(max_concurrency=2))).denied_by is LimitKind.CONCURRENCY
        assert await store.in_flight("acme", None) == 2

    harness.run(body)


def test_take_buckets_charges_all_or_nothing_and_takes_no_lease(harness: Harness) -> None:
    """Leased mode's slices: the buckets of `acquire`, without the lease."""

    async def body(store: QuotaStore) -> None:
        small, large = bucket("small", burst=5, cost=4), bucket("large", burst=50, cost=4)
        taken = await store.take_buckets(check(small, large))
        assert taken.allowed and taken.lease_id is None
        assert await store.in_flight("acme", None) == 0  # no lease
        denied = await store.take_buckets(check(small, large))  # small has 1 left
        assert (denied.allowed, denied.denied_by, denied.denied_bucket) == (
            False,
            LimitKind.BUCKET,
            "small",
        )
        assert_retry_after(harness, denied, (4 - 1) / 0.5)
        # Nothing was charged by the denial: `large` still holds 46.
        assert (await store.take_buckets(check(bucket("large", burst=50, cost=46)))).allowed
        assert not (await store.take_buckets(check(bucket("large", burst=50, cost=1)))).allowed
        for bad in (check(small, max_concurrency=3), check(small, model="m")):
            with pytest.raises(ValueError):
                await store.take_buckets(bad)

    harness.run(body)


def test_charge_and_refund_move_the_bucket(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        b = bucket(burst=5)
        await store.charge("acme", [bucket(cost=3)])
        results = [await store.acquire(check(b)) for _ in range(3)]
        assert [r.allowed for r in results] == [True, True, False]

        await store.charge("acme", [bucket(cost=-2)])
        results = [await store.acquire(check(b)) for _ in range(3)]
        assert [r.allowed for r in results] == [True, True, False]

    harness.run(body)


def test_a_refund_never_fills_a_bucket_past_its_burst(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        await store.charge("acme", [bucket(cost=-100)])
        results = [await store.acquire(check(bucket(burst=5))) for _ in range(6)]
        assert [r.allowed for r in results] == [True] * 5 + [False]

    harness.run(body)


def test_charge_may_overdraw_a_bucket(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        await store.charge("acme", [bucket(rate=0.5, cost=7)])  # 2 units past a burst of 5
        denied = await store.acquire(check(bucket(rate=0.5, burst=5)))
        assert denied.denied_by is LimitKind.BUCKET
        assert_retry_after(harness, denied, (7 + 1 - 5) / 0.5)

    harness.run(body)


def test_one_charge_moves_several_buckets_each_at_its_own_rate(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        req, tokens = bucket("req", rate=0.5, burst=5), bucket("tokens", rate=0.25, burst=8)
        await store.charge("acme", [replace(req, cost=3), replace(tokens, cost=6)])
        # 2 left in each: 1 unit short of 3 is 2 s at 0.5/s and 4 s at 0.25/s.
        assert_retry_after(harness, await store.peek(check(replace(req, cost=3))), 2.0)
        assert_retry_after(harness, await store.peek(check(replace(tokens, cost=3))), 4.0)

        await store.charge("acme", [replace(req, cost=-1), replace(tokens, cost=-100)])
        # req has 3, tokens is full (8) again; nothing else moved.
        assert (await store.acquire(check(replace(req, cost=3), replace(tokens, cost=8)))).allowed
        assert not (await store.peek(check(replace(req, cost=1)))).allowed
        assert (await store.peek(check(replace(req, cost=5), tenant="other"))).allowed

        await store.charge("acme", [])  # nothing to move: no error, no change
        assert not (await store.peek(check(replace(req, cost=1)))).allowed

    harness.run(body)


def test_a_refused_charge_moves_no_bucket(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        for bad in [
            [bucket("req", cost=3), bucket("tokens", rate=0)],
            [bucket("req", cost=3), bucket("req", cost=-3)],
            [bucket("req", cost=3), bucket("tokens", cost=float("nan"))],
        ]:
            with pytest.raises(ValueError):
                await store.charge("acme", bad)
        results = [await store.acquire(check(bucket("req", burst=5))) for _ in range(6)]
        assert [r.allowed for r in results] == [True] * 5 + [False]

    harness.run(body)


# -- per model ------------------------------------------------------------------------------


def test_a_model_counts_its_leases_up_on_acquire_and_down_on_release(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        c = check(model="llama")
        assert await store.model_in_flight("llama") == 0
        results = [await store.acquire(c) for _ in range(3)]
        assert all(r.allowed for r in results)
        assert await store.model_in_flight("llama") == 3
        assert await store.model_in_flight("mistral") == 0

        assert await store.release(lease_of(c, results[0]))
        assert await store.model_in_flight("llama") == 2
        assert await store.in_flight("acme", None) == 2
        for result in results[1:]:
            assert await store.release(lease_of(c, result))
        assert await store.model_in_flight("llama") == 0

    harness.run(body)


def test_a_lease_released_twice_counts_once(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        c = check(model="llama")
        first, second = await store.acquire(c), await store.acquire(c)
        assert await store.release(lease_of(c, first)) is True
        assert await store.release(lease_of(c, first)) is False
        assert await store.model_in_flight("llama") == 1
        assert await store.release(lease_of(c, second)) is True
        assert await store.model_in_flight("llama") == 0
        unknown = LeaseRef(tenant="nobody", klass="standard", lease_id="x", model="llama")
        assert await store.release(unknown) is False
        assert await store.model_in_flight("llama") == 0

    harness.run(body)


def test_denied_acquires_and_peeks_leave_model_counts_alone(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        assert (await store.peek(check(model="llama"))).allowed
        assert await store.model_in_flight("llama") == 0

        assert (await store.acquire(check(bucket(burst=1), model="llama"))).allowed
        for denied in [
            check(model="llama", max_class_concurrency=1),
            check(model="llama", max_concurrency=1),
            check(bucket(burst=1), model="llama"),
        ]:
            assert not (await store.acquire(denied)).allowed
            assert not (await store.peek(denied)).allowed
        assert (await store.peek(check(model="llama"))).allowed
        assert await store.model_in_flight("llama") == 1

    harness.run(body)


def test_model_leases_expire_after_their_ttl(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        c = check(model="llama", lease_ttl_s=0.05)
        held = await store.acquire(c)
        assert held.allowed
        assert await store.model_in_flight("llama") == 1

        await harness.let_leases_expire(store, 0.05, "acme", "llama")
        assert await store.model_in_flight("llama") == 0
        assert await store.release(lease_of(c, held)) is False  # expired: nothing freed
        assert await store.model_in_flight("llama") == 0
        assert (await store.acquire(c)).allowed
        assert await store.model_in_flight("llama") == 1

    harness.run(body)


def test_a_model_only_lease_lives_in_its_model_set_alone(harness: Harness) -> None:
    """Leased mode's lease of a counted request (`LeaseRef.model_only`): no tenant lease,
    only the model's entry, which `count_for_model` writes and `renew` and `release` find
    there; a second release frees nothing, and a tenant lease beside it is released as
    before in the same call."""

    async def body(store: QuotaStore) -> None:
        only = LeaseRef("acme", "standard", "only-1", "llama", model_only=True)
        await store.count_for_model(only, 60.0)
        assert await store.model_in_flight("llama") == 1
        assert await store.in_flight("acme", None) == 0  # no tenant lease
        assert await store.renew("acme", [only], 60.0) == {"only-1"}
        c = check(model="llama")
        held = await store.acquire(c)
        exact = lease_of(c, held)
        assert await store.model_in_flight("llama") == 2
        assert await store.release_many([only, exact]) == [True, True]
        assert await store.model_in_flight("llama") == 0
        assert await store.in_flight("acme", None) == 0
        assert await store.release(only) is False  # released already: nothing freed twice
        assert await store.renew("acme", [only], 60.0) == set()  # gone: never brought back
        assert await store.model_in_flight("llama") == 0
        with pytest.raises(ValueError):
            await store.release(LeaseRef("acme", "standard", "x", model_only=True))

        # Ended before its entry was written (its end reached another replica first): the
        # late write adds nothing, so nothing is left counted, or renewed, for a gone request.
        late = LeaseRef("acme", "standard", "only-late", "llama", model_only=True)
        assert await store.release(late) is False
        await store.count_for_model_many([late], 60.0)
        assert await store.model_in_flight("llama") == 0
        assert await store.renew("acme", [late], 60.0) == set()

        short = LeaseRef("acme", "standard", "only-2", "llama", model_only=True)
        await store.count_for_model(short, 0.05)
        await harness.let_leases_expire(store, 0.05, "acme", "llama")
        assert await store.renew("acme", [short], 60.0) == set()  # expired: gone
        assert await store.release(short) is False

    harness.run(body)


def test_leases_of_one_model_add_up_across_tenants_and_classes(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        acme_gold = check(tenant="acme", klass="gold", model="llama")
        acme_bronze = check(tenant="acme", klass="bronze", model="llama")
        globex = check(tenant="globex", model="llama", max_concurrency=1)
        held = [await store.acquire(c) for c in (acme_gold, acme_bronze, globex)]
        assert all(r.allowed for r in held)
        assert not (await store.acquire(globex)).allowed  # globex is at its own limit
        assert (await store.acquire(check(tenant="globex", model="mistral"))).allowed
        assert await store.model_in_flight("llama") == 3
        assert await store.model_in_flight("mistral") == 1

        assert await store.release(lease_of(globex, held[2]))
        assert await store.model_in_flight("llama") == 2
        assert await store.in_flight("globex", None) == 1

    harness.run(body)


def test_a_check_without_a_model_counts_for_no_model(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        with_model = check(model="llama")
        held = await store.acquire(with_model)
        plain = await store.acquire(check())
        assert plain.allowed
        assert plain.in_flight == 2
        assert await store.model_in_flight("llama") == 1
        assert await store.release(lease_of(check(), plain))
        assert await store.model_in_flight("llama") == 1

        # The store finds the model set through the ref's model only: a ref without it frees
        # the tenant's lease and leaves the model's entry to its TTL.
        assert held.lease_id is not None
        assert await store.release(LeaseRef("acme", "standard", held.lease_id))
        assert await store.in_flight("acme", None) == 0
        assert await store.model_in_flight("llama") == 1
        assert await store.release(lease_of(with_model, held)) is False
        assert await store.model_in_flight("llama") == 0

    harness.run(body)


def test_a_lease_counted_later_counts_only_from_then(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        later = replace(check(model="llama"), count_model_now=False)
        first = await store.acquire(later)
        assert first.allowed and await store.model_in_flight("llama") == 0
        # Released before it was counted (a held request shed): harmless.
        assert await store.release(lease_of(later, first))
        assert await store.model_in_flight("llama") == 0

        second = await store.acquire(later)
        lease = lease_of(later, second)
        await store.count_for_model(lease, 60.0)  # let go to Triton
        assert await store.model_in_flight("llama") == 1
        assert await store.release(lease)
        assert await store.model_in_flight("llama") == 0

    harness.run(body)


def test_concurrent_acquires_count_each_admitted_lease_for_the_model(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        c = check(max_concurrency=10, model="llama")
        results = await asyncio.gather(*(store.acquire(c) for _ in range(50)))
        assert sum(r.allowed for r in results) == 10
        assert await store.model_in_flight("llama") == 10
        admitted = [r for r in results if r.allowed]
        await asyncio.gather(*(store.release(lease_of(c, r)) for r in admitted))
        assert await store.model_in_flight("llama") == 0

    harness.run(body)


AWKWARD_MODELS = ["acme", "a", "a.b", "a}{b:c", "=a", "%3Da", "モデル", "qos:{=a}"]


def test_awkward_model_names_are_separate_models_and_never_a_tenant(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        for count, model in enumerate(AWKWARD_MODELS, start=1):
            for _ in range(count):
                assert (await store.acquire(check(model=model))).allowed, model
        for count, model in enumerate(AWKWARD_MODELS, start=1):
            assert await store.model_in_flight(model) == count, model
        # A tenant named like a model: its leases and the model's are counted apart.
        assert await store.in_flight("acme", None) == sum(range(1, len(AWKWARD_MODELS) + 1))
        assert await store.in_flight("a", None) == 0

    harness.run(body)


# -- per pod (pod topology) -----------------------------------------------------------------


def test_each_pods_count_of_a_model_is_its_own(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        pod_a = replace(check(model="llama"), model_pod="pod-a")
        pod_b = replace(check(model="llama"), model_pod="pod-b")
        for c, times in ((pod_a, 2), (pod_b, 1), (check(model="llama"), 1)):
            for _ in range(times):
                assert (await store.acquire(c)).allowed
        assert await store.model_in_flight("llama", "pod-a") == 2
        assert await store.model_in_flight("llama", "pod-b") == 1
        assert await store.model_in_flight("llama") == 1  # the fleet's set is a third one
        assert await store.model_in_flight_many(["llama", "mistral"], "pod-a") == {
            "llama": 2,
            "mistral": 0,
        }
        assert await store.in_flight("acme", None) == 4  # the tenant's count stays global
        # A model named like a model@pod pair is another set still.
        assert (await store.acquire(check(model="llama@pod-a"))).allowed
        assert await store.model_in_flight("llama", "pod-a") == 2

    harness.run(body)


def test_a_pods_lease_is_released_and_renewed_from_another_replica(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        # Another replica: its own client of the same Redis (memory: one process, one store).
        other = store if harness.kind == "memory" else harness.make_store()
        try:
            pod_a = replace(check(model="llama"), model_pod="pod-a")
            held = [lease_of(pod_a, await store.acquire(pod_a)) for _ in range(3)]
            assert (await store.acquire(replace(pod_a, model_pod="pod-b"))).allowed
            # The lease travels as its token: what the other replica parses names the set.
            refs = [parse_lease(format_lease(lease)) for lease in held]
            assert refs == held and all(ref.model_pod == "pod-a" for ref in held)
            assert await other.renew("acme", held[:2], 60.0) == {held[0].lease_id, held[1].lease_id}
            assert await other.release(held[0])
            assert await store.model_in_flight("llama", "pod-a") == 2
            assert await store.model_in_flight("llama", "pod-b") == 1
            later = replace(pod_a, count_model_now=False)
            lease = lease_of(later, await store.acquire(later))
            await other.count_for_model(lease, 60.0)
            assert await store.model_in_flight("llama", "pod-a") == 3
            for ref in (*held[1:], lease):
                assert await other.release(ref)
            assert await store.model_in_flight("llama", "pod-a") == 0
            assert await store.model_in_flight("llama", "pod-b") == 1
        finally:
            if other is not store:
                await other.close()

    harness.run(body)


def test_an_empty_pod_is_refused(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        with pytest.raises(ValueError, match="pod"):
            await store.acquire(replace(check(model="llama"), model_pod=""))
        with pytest.raises(ValueError, match="pod"):
            await store.model_in_flight("llama", "")

    harness.run(body)


# -- names ----------------------------------------------------------------------------------

AWKWARD_TENANTS = ["a", "a}{b:c", "a:b", "{a}", "a b", "a%7Db", "テナント", "🚀", "qos:{a}"]


def test_awkward_tenant_names_are_separate_tenants(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        for tenant in AWKWARD_TENANTS:
            c = check(bucket(burst=1), tenant=tenant, max_concurrency=1)
            result = await store.acquire(c)
            assert result.allowed, tenant
            assert result.in_flight == 1, tenant
            assert not (await store.acquire(c)).allowed
        for tenant in AWKWARD_TENANTS:
            assert await store.in_flight(tenant, None) == 1
            assert await store.in_flight(tenant, "standard") == 1

    harness.run(body)


def test_awkward_class_and_bucket_names_are_separate(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        for name in ["x", "x:y", "x}", "{x", "ü"]:
            c = check(bucket(name, burst=1), klass=name, max_class_concurrency=1)
            assert (await store.acquire(c)).allowed, name
            second = await store.acquire(c)
            assert second.denied_by is LimitKind.CLASS_CONCURRENCY, name
            unlimited = check(bucket(name, burst=1), klass=name)
            assert (await store.acquire(unlimited)).denied_bucket == name
        assert await store.in_flight("acme", None) == 5

    harness.run(body)


def test_checks_no_policy_can_produce_are_refused(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        for bad in [
            check(bucket(rate=0)),
            check(bucket(burst=0)),
            check(bucket(cost=-1)),
            check(bucket(cost=float("nan"))),
            check(bucket("same"), bucket("same")),
            check(tenant=""),
            check(lease_ttl_s=0),
            check(max_concurrency=-1),
            check(model=""),
        ]:
            with pytest.raises(ValueError):
                await store.acquire(bad)
        with pytest.raises(ValueError):
            await store.charge("acme", [bucket(rate=-1)])
        with pytest.raises(ValueError):
            await store.charge("", [bucket()])
        with pytest.raises(ValueError):
            await store.release(LeaseRef("", "standard", "x"))
        with pytest.raises(ValueError):
            await store.in_flight("", None)
        with pytest.raises(ValueError):
            await store.model_in_flight("")
        with pytest.raises(ValueError):
            await store.release(LeaseRef("acme", "standard", "x", model=""))

    harness.run(body)


@pytest.mark.parametrize(
    ("rate", "burst"), [(1 / 3, 3), (0.3, 7), (0.7, 10), (0.15, 100), (0.9, 250)]
)
def test_exactly_burst_passes_when_the_emission_interval_is_inexact(
    harness: Harness, rate: float, burst: int
) -> None:
    # 1 / rate has no exact binary form here, so each charge rounds; an exact fit must still
    # fit and one more must not.
    async def body(store: QuotaStore) -> None:
        c = check(bucket(rate=rate, burst=burst))
        results = [await store.acquire(c) for _ in range(burst + 1)]
        assert [r.allowed for r in results] == [True] * burst + [False]

    harness.run(body)


# -- memory only: refill needs a clock we control -------------------------------------------


def test_memory_bucket_refills_at_its_rate() -> None:
    clock = FakeClock()
    store = MemoryQuotaStore(clock=clock)

    async def body() -> None:
        c = check(bucket(rate=2, burst=4))
        assert all([(await store.acquire(c)).allowed for _ in range(4)])
        denied = await store.acquire(c)
        assert denied.retry_after_s == pytest.approx(0.5)
        clock.advance(0.25)
        assert (await store.peek(c)).retry_after_s == pytest.approx(0.25)
        clock.advance(0.25)
        assert (await store.acquire(c)).allowed
        assert not (await store.acquire(c)).allowed
        clock.advance(10)  # long idle: full again, and not more than full
        results = [await store.acquire(c) for _ in range(5)]
        assert [r.allowed for r in results] == [True] * 4 + [False]

    asyncio.run(body())


def test_memory_forgets_full_buckets_and_empty_lease_tables() -> None:
    clock = FakeClock()
    store = MemoryQuotaStore(clock=clock)

    async def body() -> None:
        c = check(bucket(rate=1, burst=2), lease_ttl_s=5, model="llama")
        result = await store.acquire(c)
        await store.acquire(c)
        await store.acquire(check(lease_ttl_s=5, model="mistral"))
        await store.release(lease_of(c, result))
        clock.advance(5)
        assert await store.in_flight("acme", None) == 0
        assert await store.model_in_flight("llama") == 0
        await store.charge("acme", [bucket(rate=1, cost=-10)])
        assert store._tats == {}
        assert store._leases == {}
        # A model nobody asks about lingers until asked (as a tenant's table does)...
        assert set(store._model_leases) == {("mistral", None)}
        assert await store.model_in_flight("mistral") == 0
        assert store._model_leases == {}  # ...then it goes

    asyncio.run(body())


# -- Redis only: what only a real server can do ---------------------------------------------


def run_redis(
    url: str,
    body: Callable[[RedisQuotaStore], Awaitable[None]],
    timeout_s: float = 2.0,
    metrics: Metrics | None = None,
) -> None:
    """Run `body` with a Redis store wired as the app wires it (its failures counted in
    `metrics`, a throwaway registry's unless given). The call timeout is generous unless the
    test is about it: under the full suite a first acquire took over the app's 50 ms."""

    async def main() -> None:
        wiring = Settings(redis_url=url, redis_timeout_ms=round(timeout_s * 1000))
        guarded = make_store(wiring, metrics or Metrics(CollectorRegistry()))
        # The app puts a circuit breaker in front (tested in test_state_breaker.py); these
        # tests are about the Redis store itself, every call reaching the server.
        assert isinstance(guarded, GuardedStore)
        store = guarded.inner
        assert isinstance(store, RedisQuotaStore)
        try:
            await body(store)
        finally:
            await store.close()

    asyncio.run(main())


@settings(max_examples=40, deadline=None)
@given(
    rates=st.lists(st.sampled_from([0.1, 1 / 3, 0.5, 0.7, 1.0]), min_size=1, max_size=3),
    bursts=st.lists(st.integers(min_value=1, max_value=20), min_size=3, max_size=3),
    steps=st.lists(
        st.tuples(st.integers(min_value=0, max_value=2), st.integers(min_value=-3, max_value=8)),
        max_size=25,
    ),
)
@pytest.mark.stack
def test_redis_decides_like_memory(
    valkey: ValkeyServer, rates: list[float], bursts: list[int], steps: list[tuple[int, int]]
) -> None:
    """The Lua arithmetic against the Python one: the same acquires and charges, in the same
    order, get the same answers. Whole costs and slow rates keep the few milliseconds Redis's
    clock moves during an example far from flipping a decision."""
    tenant = f"diff-{uuid.uuid4()}"  # the server is shared by the examples
    buckets = [bucket(f"b{i}", rate=r, burst=bursts[i]) for i, r in enumerate(rates)]

    async def answers(store: QuotaStore) -> list[tuple[bool, str | None, float, set[str]]]:
        """Each acquire's answer, and the buckets whose own Retry-After was within the
        slack of the worst one just before it (any of them may be named)."""
        seen = []
        for index, cost in steps:
            b = buckets[index % len(buckets)]
            if cost < 0:  # a refund
                await store.charge(tenant, [replace(b, cost=cost)])
                continue
            charged = [replace(x, cost=cost if x is b else 1) for x in buckets]
            alone = [await store.peek(check(x, tenant=tenant)) for x in charged]
            worst = max((r.retry_after_s for r in alone if not r.allowed), default=0.0)
            near = {x.name for x, r in zip(charged, alone, strict=True)
                    if not r.allowed and r.retry_after_s > worst - SLACK_S}  # fmt: skip
            r = await store.acquire(check(*charged, tenant=tenant))
            seen.append((r.allowed, r.denied_bucket, r.retry_after_s, near))
        return seen

    async def main() -> None:
        memory = MemoryQuotaStore(clock=FakeClock())
        redis_store = RedisQuotaStore(valkey.url, timeout_s=2.0)
        try:
            expected, got = await answers(memory), await answers(redis_store)
        finally:
            await redis_store.close()
        assert [a[0] for a in got] == [a[0] for a in expected]
        for (_, bucket_want, want, near), (_, bucket_have, have, _) in zip(
            expected, got, strict=True
        ):
            # The same worst Retry-After. The bucket that has it may differ only where two
            # (whatever their bursts) were within the slack of each other: the milliseconds
            # Redis's clock moved may then lower one of them below the other.
            assert want - SLACK_S < have <= want + 1e-6
            if bucket_have != bucket_want:
                assert bucket_want in near and bucket_have in near, (bucket_want, bucket_have)

    asyncio.run(main())


@pytest.mark.stack
def test_redis_recovers_from_a_script_flush(valkey: ValkeyServer, redis_sync: redis.Redis) -> None:
    metrics = Metrics(CollectorRegistry())

    async def body(store: RedisQuotaStore) -> None:
        c = check(bucket(burst=5), max_concurrency=5)
        first = await store.acquire(c)
        assert first.allowed
        redis_sync.script_flush()
        assert (await store.acquire(c)).allowed
        redis_sync.script_flush()
        assert await store.release(lease_of(c, first))
        redis_sync.script_flush()
        await store.charge("acme", [bucket(cost=1)])
        redis_sync.script_flush()
        assert await store.in_flight("acme", None) == 1
        redis_sync.script_flush()
        assert (await store.peek(c)).allowed

        with_model = check(model="llama")
        redis_sync.script_flush()
        held = await store.acquire(with_model)
        assert await store.model_in_flight("llama") == 1
        redis_sync.script_flush()
        assert await store.release(lease_of(with_model, held))
        assert model_step_failures(metrics) == 0
        redis_sync.script_flush()
        assert await store.model_in_flight("llama") == 0

    run_redis(valkey.url, body, metrics=metrics)


@pytest.mark.stack
def test_redis_keys_expire_when_they_hold_nothing(
    valkey: ValkeyServer, redis_sync: redis.Redis
) -> None:
    async def body(store: RedisQuotaStore) -> None:
        c = check(bucket(rate=0.5, burst=5, cost=2), klass="gold", lease_ttl_s=30)
        result = await store.acquire(c)
        assert result.allowed
        keys = sorted(str(k) for k in redis_sync.keys("*"))
        assert keys == [
            "qos:{acme}:bucket:req",
            "qos:{acme}:class_leases:gold",
            "qos:{acme}:leases",
        ]
        # The bucket is full again 2 / 0.5 = 4 s after this charge; leases live 30 s.
        assert 3_000 < redis_sync.pttl("qos:{acme}:bucket:req") <= 4_000
        assert 29_000 < redis_sync.pttl("qos:{acme}:leases") <= 30_000
        assert 29_000 < redis_sync.pttl("qos:{acme}:class_leases:gold") <= 30_000

        # A shorter lease in another class must not shorten the tenant set's life.
        await store.acquire(check(klass="bronze", lease_ttl_s=1))
        assert 28_000 < redis_sync.pttl("qos:{acme}:leases") <= 30_000
        assert redis_sync.pttl("qos:{acme}:class_leases:bronze") <= 1_000

        assert await store.release(lease_of(c, result))
        assert not redis_sync.exists("qos:{acme}:class_leases:gold")  # empty sets vanish

    run_redis(valkey.url, body)


@pytest.mark.stack
def test_redis_model_lease_set_lives_as_long_as_its_longest_lease(
    valkey: ValkeyServer, redis_sync: redis.Redis
) -> None:
    async def body(store: RedisQuotaStore) -> None:
        c = check(model="llama", lease_ttl_s=30)
        result = await store.acquire(c)
        assert result.allowed
        key = "qos:{=llama}:model_leases"
        assert redis_sync.zcard(key) == 1
        assert 29_000 < redis_sync.pttl(key) <= 30_000
        short = check(klass="bronze", model="llama", lease_ttl_s=1)
        other = await store.acquire(short)
        assert 28_000 < redis_sync.pttl(key) <= 30_000

        assert await store.release(lease_of(c, result))
        assert await store.release(lease_of(short, other))
        assert not redis_sync.exists(key)  # empty sets vanish

    run_redis(valkey.url, body)


@pytest.mark.stack
def test_redis_a_failed_model_step_fails_neither_acquire_nor_release(
    valkey: ValkeyServer, redis_sync: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # A string where the model's sorted set belongs: every model step fails with WRONGTYPE,
    # while the tenant's keys work. It stands for a model shard that cannot be reached.
    redis_sync.set("qos:{=llama}:model_leases", "not a set")
    metrics = Metrics(CollectorRegistry())

    async def body(store: RedisQuotaStore) -> None:
        c = check(model="llama", max_concurrency=1)
        held = await store.acquire(c)
        assert held.allowed
        assert held.lease_id is not None
        assert model_step_failures(metrics) == 1
        assert await store.in_flight("acme", None) == 1
        with pytest.raises(StateUnavailable):
            await store.model_in_flight("llama")

        assert await store.release(lease_of(c, held)) is True
        assert model_step_failures(metrics) == 2
        assert await store.in_flight("acme", None) == 0
        assert (await store.acquire(check(model="mistral"))).allowed
        assert model_step_failures(metrics) == 2

    with caplog.at_level("WARNING", logger="sidecar.state.redis_store"):
        run_redis(valkey.url, body, metrics=metrics)
    # Logged once, not once per failure: a broken shard would otherwise flood the log.
    assert len(caplog.records) == 1
    assert "llama" in caplog.records[0].getMessage()


@pytest.mark.stack
def test_redis_peek_writes_nothing(valkey: ValkeyServer, redis_sync: redis.Redis) -> None:
    async def body(store: RedisQuotaStore) -> None:
        assert (await store.peek(check(bucket(), max_concurrency=1))).allowed
        assert (await store.peek(check(bucket(), model="llama"))).allowed
        assert redis_sync.dbsize() == 0

    run_redis(valkey.url, body)


@pytest.mark.stack
def test_redis_each_call_is_one_script_whose_keys_share_one_hash_tag(
    valkey: ValkeyServer, redis_sync: redis.Redis
) -> None:
    """In Redis Cluster a script may only touch keys of one slot: every call's keys carry one
    hash tag, the tenant's (or, for the model step, the model's), and a charge of several
    buckets is one call, not one per bucket."""
    tenant = "a}{b:c"  # a name that would break an unencoded tag
    calls: list[list[str]] = []

    async def body(store: RedisQuotaStore) -> None:
        # Every single-server call goes through the store's pipe (redis_pipe.py).
        assert store._pipe is not None
        execute = store._pipe.execute

        async def spy(commands: Sequence[Sequence[Any]]) -> list[Any]:
            replies = await execute(commands)
            for command, reply in zip(commands, replies, strict=True):
                if isinstance(reply, redis.exceptions.NoScriptError):
                    continue  # its EVAL is the call: counted there
                if command[0] in ("EVALSHA", "EVAL"):
                    numkeys = int(command[2])
                    calls.append([str(k) for k in command[3 : 3 + numkeys]])
            return replies

        store._pipe.execute = spy  # type: ignore[method-assign]
        c = check(
            bucket("req"), bucket("tokens"), bucket("x:y"), tenant=tenant, klass="gold",
            model="llama", max_concurrency=5, max_class_concurrency=5,
        )  # fmt: skip
        held = await store.acquire(c)
        assert len(calls) == 2  # the tenant's limits and lease, then the model's set
        await store.charge(tenant, [replace(b, cost=-1) for b in c.buckets])
        assert len(calls) == 3
        assert sorted(calls[-1]) == sorted(calls[0][3:])  # the buckets acquire charged
        await store.peek(c)
        await store.in_flight(tenant, None)
        await store.in_flight(tenant, "gold")
        await store.release(lease_of(c, held))
        await store.model_in_flight("llama")

    run_redis(valkey.url, body, timeout_s=2.0)
    assert len(calls) == 9
    for keys in calls:
        assert len({cluster_hash_tag(key) for key in keys}) == 1, keys
        assert cluster_hash_tag(keys[0]) in {encode_name(tenant), "=llama"}


@pytest.mark.stack
def test_redis_unreachable_raises_state_unavailable_quickly() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there

    async def body(store: RedisQuotaStore) -> None:
        calls: list[Callable[[], Awaitable[object]]] = [
            store.ping,
            lambda: store.acquire(check(bucket())),
            lambda: store.release(LeaseRef("a", "b", "c")),
            lambda: store.release(LeaseRef("a", "b", "c", model="m")),
            lambda: store.model_in_flight("m"),
        ]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(StateUnavailable):
                await call()
            assert time.monotonic() - started < 1.0

    run_redis(url, body, timeout_s=0.05)


@pytest.mark.stack
def test_redis_stopped_mid_test_raises_state_unavailable_quickly() -> None:
    with ValkeyServer() as server:

        async def body(store: RedisQuotaStore) -> None:
            first = None
            for _ in range(3):  # set-up: the first call also connects and loads the script,
                with contextlib.suppress(StateUnavailable):  # which a busy host can stretch
                    first = await store.acquire(check(bucket()))  # past the 50 ms budget
                    break
            assert first is not None and first.allowed  # a pooled connection
            server.stop()
            started = time.monotonic()
            with pytest.raises(StateUnavailable):
                await store.acquire(check(bucket()))
            assert time.monotonic() - started < 1.0

        run_redis(server.url, body, timeout_s=0.05)


@pytest.mark.stack
def test_redis_stalled_server_hits_the_deadline_and_recovers() -> None:
    with ValkeyServer() as server:

        async def body(store: RedisQuotaStore) -> None:
            await store.ping()
            server.pause()  # accepts bytes, answers nothing
            try:
                started = time.monotonic()
                with pytest.raises(StateUnavailable):
                    await store.acquire(check(bucket()))
                elapsed = time.monotonic() - started
                assert 0.09 < elapsed < 1.0
                # Both scripts of a release of a model share the one deadline.
                started = time.monotonic()
                with pytest.raises(StateUnavailable):
                    await store.release(LeaseRef("acme", "standard", "x", model="llama"))
                assert time.monotonic() - started < 1.0
            finally:
                server.resume()
            # The timed-out connection was dropped, not handed back half-read.
            assert (await store.acquire(check(bucket()))).allowed
            await store.ping()

        run_redis(server.url, body, timeout_s=0.1)


# -- fleet_exchange (sidecar.core.fleet): what gateway replicas share ------------------------

A = encode_summary({"m": {0: {"team:a": 2}}})
B = encode_summary({"m": {2: {"b": 1}}})


def test_each_replica_sees_the_others_summaries_and_every_counter(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        first = await store.fleet_exchange("r1", 10.0, A, [("+", 0, "team:a", 3.0)])
        assert first.others == [] and first.counters == {(0, "team:a"): 3.0}
        second = await store.fleet_exchange("r2", 10.0, B, [("+", 0, "team:a", 1.5)])
        assert second.others == [("r1", A)]
        assert second.counters == {(0, "team:a"): 4.5}
        lifts = [("^", 2, "b", 7.0), ("^", 0, "team:a", 1.0)]
        again = await store.fleet_exchange("r1", 10.0, A, lifts)
        assert again.others == [("r2", B)]
        # "^" raises to a floor and never lowers: team:a stays at 4.5, b is lifted to 7.
        assert again.counters == {(0, "team:a"): 4.5, (2, "b"): 7.0}

    harness.run(body)


def test_a_replica_holding_nothing_and_a_silent_one_drop_out(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        await store.fleet_exchange("r1", 10.0, A, [])
        await store.fleet_exchange("r2", 0.2, B, [])
        assert (await store.fleet_exchange("r3", 10.0, "", [])).others == [("r1", A), ("r2", B)]
        await store.fleet_exchange("r1", 10.0, "", [])  # r1 holds nothing now
        if harness.clock is not None:
            harness.clock.advance(0.3)
        else:
            await asyncio.sleep(0.3)  # r2 stops exchanging: its summary dies with its ttl
        assert (await store.fleet_exchange("r3", 10.0, "", [])).others == []

    harness.run(body)
