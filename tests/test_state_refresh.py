"""Reading many in-flight counts at once (`in_flight_many`, `model_in_flight_many`): the same
answers as one read per key, from both stores, in one round trip to Redis.

Runs against both stores through the contract's `Harness`. The round trips are counted
where redis-py writes to the socket (`send_packed_command`: a whole pipeline is one write).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from types import MappingProxyType
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry
from redis.asyncio.connection import AbstractConnection

from sidecar.core.types import LimitKind, QuotaCheck, QuotaResult, RequestAttributes
from sidecar.metrics import Metrics
from sidecar.service import AdmissionService
from sidecar.state import MemoryQuotaStore, QuotaStore, RedisQuotaStore
from sidecar.state.redis_pipe import _Replies
from sidecar.state.redis_pipelines import LEASES_PER_CALL
from tests.core_fixtures import make_policy
from tests.fixtures_valkey import ValkeyServer
from tests.test_state_contract import FakeClock, Harness, bucket, check, lease_of, run_redis

CLASSES = ("interactive", "standard", "batch")


@pytest.fixture(scope="module")
def valkey() -> Iterator[ValkeyServer]:
    with ValkeyServer() as server:
        yield server


@pytest.fixture
def redis_sync(valkey: ValkeyServer) -> Iterator[redis.Redis]:
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
    return Harness("redis", lambda: RedisQuotaStore(server.url, timeout_s=2.0), None)


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many writes every Redis connection made (one per command, one per pipeline), the
    store's pipe (redis_pipe.py) included."""
    sent = [0]
    original = AbstractConnection.send_packed_command

    async def counted(self: AbstractConnection, *args: Any, **kwargs: Any) -> None:
        sent[0] += 1
        await original(self, *args, **kwargs)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counted)
    sends = _Replies.send  # the single-server store's own connection: one write per call

    def counted_send(self: _Replies, *args: Any) -> None:
        sent[0] += 1
        sends(self, *args)

    monkeypatch.setattr(_Replies, "send", counted_send)
    return sent


def test_many_counts_answer_like_one_read_each(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        taken = []
        for tenant, klass, model, n in [
            ("acme", "standard", "llama", 3),
            ("acme", "batch", "mistral", 2),
            ("beta", "standard", "llama", 1),
        ]:
            for _ in range(n):
                c = check(tenant=tenant, klass=klass, model=model)
                taken.append(lease_of(c, await store.acquire(c)))
        await store.release(taken[0])  # acme/standard/llama: 2 left
        pairs = [
            ("acme", None),
            ("acme", "standard"),
            ("acme", "batch"),
            ("acme", "interactive"),
            ("beta", "standard"),
            ("nobody", None),
            ("acme", "standard"),  # asked twice: one answer
        ]
        many = await store.in_flight_many(pairs)
        assert many == {pair: await store.in_flight(*pair) for pair in pairs}
        assert many == {
            ("acme", None): 4,
            ("acme", "standard"): 2,
            ("acme", "batch"): 2,
            ("acme", "interactive"): 0,
            ("beta", "standard"): 1,
            ("nobody", None): 0,
        }
        models = await store.model_in_flight_many(["llama", "mistral", "unseen"])
        assert models == {"llama": 3, "mistral": 2, "unseen": 0}
        assert await store.in_flight_many([]) == {}
        assert await store.model_in_flight_many([]) == {}

    harness.run(body)


def test_many_counts_leave_out_expired_leases(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        c = check(tenant="acme", model="llama", lease_ttl_s=0.05)
        await store.acquire(c)
        assert await store.in_flight_many([("acme", "standard")]) == {("acme", "standard"): 1}
        await harness.let_leases_expire(store, 0.05, "acme", "llama")
        assert await store.in_flight_many([("acme", "standard")]) == {("acme", "standard"): 0}
        assert await store.model_in_flight_many(["llama"]) == {"llama": 0}

    harness.run(body)


def test_many_counts_refuse_what_one_read_refuses(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        with pytest.raises(ValueError):
            await store.in_flight_many([("acme", None), ("", "standard")])
        with pytest.raises(ValueError):
            await store.model_in_flight_many(["llama", ""])

    harness.run(body)


@pytest.mark.stack
def test_redis_reads_hundreds_of_counts_in_one_round_trip(
    valkey: ValkeyServer, redis_sync: redis.Redis, round_trips: list[int]
) -> None:
    pairs: list[tuple[str, str | None]] = [
        (f"t{i}", klass) for i in range(300) for klass in CLASSES
    ]

    async def body(store: RedisQuotaStore) -> None:
        for i in range(0, 300, 7):  # some tenants hold leases
            c = check(tenant=f"t{i}", klass="batch", model=f"m{i % 5}")
            await store.acquire(c)
        await store.in_flight_many(pairs[:1])  # connected, script loaded
        before = round_trips[0]
        counts = await store.in_flight_many(pairs)
        assert round_trips[0] - before == 1  # 900 reads, one pipeline
        assert len(counts) == 900
        assert sum(counts.values()) == len(range(0, 300, 7))
        assert counts[("t7", "batch")] == 1 and counts[("t7", "standard")] == 0
        before = round_trips[0]
        models = await store.model_in_flight_many([f"m{i}" for i in range(5)])
        assert round_trips[0] - before == 1
        assert sum(models.values()) == len(range(0, 300, 7))

    run_redis(valkey.url, body, timeout_s=2.0)


@pytest.mark.stack
def test_redis_many_counts_recover_from_a_script_flush(
    valkey: ValkeyServer, redis_sync: redis.Redis
) -> None:
    async def body(store: RedisQuotaStore) -> None:
        c = check(tenant="acme", model="llama")
        await store.acquire(c)
        redis_sync.script_flush()
        assert await store.in_flight_many([("acme", None)]) == {("acme", None): 1}
        redis_sync.script_flush()
        assert await store.model_in_flight_many(["llama"]) == {"llama": 1}

    run_redis(valkey.url, body, timeout_s=2.0)


def policy_with_tenants(n: int) -> Any:
    policy = make_policy()
    search = policy.tenants["search"]
    tenants = {
        f"t{i}": replace(search, name=f"t{i}", allowed_classes=frozenset(CLASSES)) for i in range(n)
    }
    return replace(policy, tenants=MappingProxyType(tenants))


@pytest.mark.stack
def test_service_refreshes_300_tenants_in_one_round_trip(
    valkey: ValkeyServer, redis_sync: redis.Redis, round_trips: list[int]
) -> None:
    async def body() -> None:
        store = RedisQuotaStore(valkey.url, timeout_s=2.0)
        service = AdmissionService(policy_with_tenants(300), store, Metrics(CollectorRegistry()))
        try:
            await store.acquire(check(tenant="t42", klass="interactive", model="simgpu"))
            assert await service.refresh_in_flight()  # connects and loads the script
            before = round_trips[0]
            assert await service.refresh_in_flight()
            assert round_trips[0] - before == 1  # 300 tenants x 3 classes
            before = round_trips[0]
            await service.refresh_model_in_flight(["simgpu", "other"])
            assert round_trips[0] - before == 1
        finally:
            await store.close()
        sample = service.metrics.registry.get_sample_value
        assert sample("qos_in_flight_requests", {"tenant": "t42", "class": "interactive"}) == 1
        assert sample("qos_in_flight_requests", {"tenant": "t299", "class": "batch"}) == 0
        assert sample("qos_model_in_flight_requests", {"model": "simgpu"}) == 1

    asyncio.run(body())


def test_release_many_answers_like_one_release_each(harness: Harness) -> None:
    """Held, not held (released already) and unknown leases, with and without a model: the
    answers, the tombstones (a late acquire of a released id takes nothing) and the model's
    set all as `release` leaves them."""

    async def body(store: QuotaStore) -> None:
        held = [await store.acquire(check(model="llama", max_concurrency=10)) for _ in range(3)]
        leases = [lease_of(check(model="llama"), result) for result in held]
        assert await store.release(leases[0])  # released already
        unknown = replace(leases[1], lease_id="never-acquired")
        answers = await store.release_many([leases[0], leases[1], leases[2], unknown])
        assert answers == [False, True, True, False]
        assert await store.in_flight("acme", None) == 0
        assert await store.model_in_flight("llama") == 0
        late = await store.acquire(replace(check(model="llama"), lease_id="never-acquired"))
        assert not late.allowed  # its release left a tombstone

    harness.run(body)


def test_release_many_frees_more_leases_than_one_call_carries(harness: Harness) -> None:
    """Two tenants, three classes, more leases than LEASES_PER_CALL, some released already:
    each lease answered as `release` alone would, every set left empty, every id
    tombstoned."""

    async def body(store: QuotaStore) -> None:
        leases = []
        for n in range(LEASES_PER_CALL + 10):
            c = check(tenant=f"t{n % 2}", klass=CLASSES[n % 3], model="llama")
            leases.append(lease_of(c, await store.acquire(c)))
        gone = leases[::7]
        for lease in gone:
            assert await store.release(lease)
        answers = await store.release_many(leases)
        assert answers == [lease not in gone for lease in leases]
        for tenant in ("t0", "t1"):
            assert await store.in_flight(tenant, None) == 0
            for klass in CLASSES:
                assert await store.in_flight(tenant, klass) == 0
        assert await store.model_in_flight("llama") == 0
        for lease in leases[:3]:
            again = check(tenant=lease.tenant, klass=lease.klass)
            late = await store.acquire(replace(again, lease_id=lease.lease_id))
            assert not late.allowed and late.denied_by is LimitKind.LEASE_ID_USED

    harness.run(body)


SCRIPTS = ("evalsha", "eval")


def _script_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in SCRIPTS)


@pytest.mark.stack
def test_a_burst_of_completions_is_released_in_one_round_trip(
    valkey: ValkeyServer, redis_sync: redis.Redis, round_trips: list[int]
) -> None:
    """200 completions of two tenants arriving together (one access-log message's worth): one
    pipeline, and one script call per tenant and per model set for each LEASES_PER_CALL
    leases, not 400 (a release and a model-set removal each)."""

    async def body() -> None:
        store = RedisQuotaStore(valkey.url, timeout_s=2.0)
        service = AdmissionService(make_policy(), store, Metrics(CollectorRegistry()))
        try:
            leases = []
            for n in range(200):
                c = replace(check(tenant=f"t{n % 2}", model="llama"), max_concurrency=500)
                leases.append(lease_of(c, await store.acquire(c)))
            await store.release(leases.pop())  # loads the scripts
            before, scripts = round_trips[0], _script_calls(redis_sync)
            assert all(await asyncio.gather(*(service.release(lease) for lease in leases)))
            assert round_trips[0] - before == 1
            # t0: 100 leases, t1: 99, 64 a call; the model's set: 199
            assert _script_calls(redis_sync) - scripts == 2 + 2 + 4
            assert await store.in_flight("t0", None) == await store.in_flight("t1", None) == 0
            assert await store.model_in_flight("llama") == 0
        finally:
            await store.close()

    asyncio.run(body())


def test_count_for_model_many_counts_every_lease_in_its_own_models_set(harness: Harness) -> None:
    """More leases than one call carries, over two models and two pods of one: each counted
    where `count_for_model` alone would count it, and a release takes each out again."""

    async def body(store: QuotaStore) -> None:
        leases = []
        for n in range(LEASES_PER_CALL + 10):
            c = check(tenant=f"t{n % 2}")  # held without a model, then let go to one
            lease = lease_of(c, await store.acquire(c))
            model, pod = ("llama", None) if n % 3 else ("phi", f"pod-{n % 2}")
            leases.append(replace(lease, model=model, model_pod=pod))
        await store.count_for_model_many(leases, 60.0)
        on = {"llama": None, "phi": "pod-0"}
        counts = {m: sum(1 for x in leases if (x.model, x.model_pod) == (m, on[m])) for m in on}
        assert await store.model_in_flight("llama") == counts["llama"]
        assert await store.model_in_flight("phi", "pod-0") == counts["phi"]
        assert await store.model_in_flight("phi", "pod-1") == len(leases) - sum(counts.values())
        assert all(await store.release_many(leases))
        assert await store.model_in_flight("llama") == 0
        assert await store.model_in_flight("phi", "pod-1") == 0

    harness.run(body)


@pytest.mark.stack
def test_a_ticks_admits_are_counted_for_their_model_in_one_call_per_lease_batch(
    valkey: ValkeyServer, redis_sync: redis.Redis
) -> None:
    """200 admits let go to one model together: one script call per LEASES_PER_CALL, not one
    per lease."""

    async def body() -> None:
        store = RedisQuotaStore(valkey.url, timeout_s=2.0)
        try:
            leases = []
            for _ in range(200):
                c = check()
                leases.append(replace(lease_of(c, await store.acquire(c)), model="llama"))
            await store.count_for_model(leases.pop(), 60.0)  # loads the script
            scripts = _script_calls(redis_sync)
            await store.count_for_model_many(leases, 60.0)
            assert _script_calls(redis_sync) - scripts == 4  # 199 leases, 64 a call
            assert await store.model_in_flight("llama") == 200
        finally:
            await store.close()

    asyncio.run(body())


def test_acquire_many_answers_like_one_acquire_each(harness: Harness) -> None:
    """Admitted, over concurrency, over a bucket and a reused id, sent together: each check
    gets what `acquire` alone would have given it, in order."""

    async def body(store: QuotaStore) -> None:
        limited = replace(check(model="llama"), max_concurrency=2)
        checks = [replace(limited, lease_id=f"id-{n}") for n in range(3)]
        checks.append(replace(limited, lease_id="id-0"))  # held already
        results = await store.acquire_many(checks)
        assert [r is not None and r.allowed for r in results] == [True, True, False, False]
        assert results[2] is not None and results[2].denied_by is LimitKind.CONCURRENCY
        assert results[3] is not None and results[3].denied_by is LimitKind.LEASE_ID_USED
        assert await store.in_flight("acme", None) == 2
        assert await store.model_in_flight("llama") == 2  # count_model_now, as acquire does

    harness.run(body)


def _mixed_batch(run: str) -> list[QuotaCheck]:
    """Two tenants (named for the `run`) and two classes sharing buckets and limits: a batch
    whose checks decide each other (a bucket two take from, a class limit, a tenant limit, a
    reused id)."""
    req = bucket("req", rate=0.5, burst=3)
    a = check(req, tenant=f"acme-{run}", max_concurrency=4, max_class_concurrency=2)
    b = check(req, tenant=f"beta-{run}", max_concurrency=1)
    heavy = replace(a, klass="batch", buckets=(req, bucket("tok", rate=10.0, burst=40, cost=30)))
    return [
        replace(a, lease_id="a0", buckets=(req, bucket("tok", rate=10.0, burst=40, cost=15))),
        replace(a, lease_id="a1"),
        replace(a, lease_id="a2"),  # its class's third: over the class limit
        replace(b, lease_id="b0"),  # another tenant: its own bucket and counts
        replace(heavy, lease_id="a3"),  # "tok": 15 + 30 > 40, and "req" not charged
        replace(b, lease_id="b1"),  # beta's second: over its tenant limit
        replace(a, lease_id="a1", klass="batch"),  # held by the second
        replace(a, lease_id="a4", klass="batch"),  # "req"'s third
        replace(a, lease_id="a5", klass="batch"),  # "req": none left
    ]


def _answer(result: QuotaResult | None) -> tuple[Any, ...]:
    assert result is not None
    return (
        result.allowed,
        result.denied_by,
        result.denied_bucket,
        result.in_flight,
        result.class_in_flight,
        round(result.retry_after_s),
    )


async def _state(store: QuotaStore, run: str) -> tuple[Any, ...]:
    """What a batch leaves: in-flight counts, and what one more check of each bucket hears."""
    pairs = [(f"acme-{run}", k) for k in (None, "standard", "batch")] + [(f"beta-{run}", None)]
    counts = await store.in_flight_many(pairs)
    probe = check(bucket("req", rate=0.5, burst=3), bucket("tok", rate=10.0, burst=40))
    peeked = await store.peek(replace(probe, tenant=f"acme-{run}"))
    return [counts[p] for p in pairs], peeked.allowed, round(peeked.retry_after_s)


def test_a_batch_of_two_tenants_answers_as_its_checks_one_after_the_other(
    harness: Harness,
) -> None:
    """acquire_many of the mixed batch answers each check as `acquire` would, one after the
    other, and leaves the same state: counts and buckets."""

    async def body(store: QuotaStore) -> None:
        answers = [[_answer(await store.acquire(c)) for c in _mixed_batch("one")]]
        answers.append([_answer(r) for r in await store.acquire_many(_mixed_batch("many"))])
        assert answers[0] == answers[1]
        allowed = [True, True, False, True, False, False, False, True, False]
        assert [a[0] for a in answers[1]] == allowed
        assert [a[1] for a in answers[1]][2:] == [
            LimitKind.CLASS_CONCURRENCY,
            None,
            LimitKind.BUCKET,
            LimitKind.CONCURRENCY,
            LimitKind.LEASE_ID_USED,
            None,
            LimitKind.BUCKET,
        ]
        assert [a[2] for a in answers[1]][4::4] == ["tok", "req"]
        assert await _state(store, "one") == await _state(store, "many")
        assert await _state(store, "many") == ([3, 2, 1, 1], False, 2)

    harness.run(body)


@pytest.mark.stack
def test_a_ticks_acquires_cost_one_script_call_per_tenant(
    valkey: ValkeyServer, redis_sync: redis.Redis
) -> None:
    """150 acquires of one tenant and 10 of another, sent together: three calls for the first
    (64 a call at most) and one for the second, not 160."""

    async def body() -> None:
        store = RedisQuotaStore(valkey.url, timeout_s=2.0)
        try:
            await store.acquire(check(tenant="warm"))  # loads the script
            scripts = _script_calls(redis_sync)
            checks = [replace(check(), lease_id=f"a{n}") for n in range(150)]
            checks += [replace(check(tenant="beta"), lease_id=f"b{n}") for n in range(10)]
            results = await store.acquire_many(checks)
            assert all(r is not None and r.allowed for r in results)
            assert _script_calls(redis_sync) - scripts == 4
            assert await store.in_flight("acme", None) == 150
            assert [r.in_flight for r in results[:150] if r is not None] == list(range(1, 151))
        finally:
            await store.close()

    asyncio.run(body())


@pytest.mark.stack
def test_concurrent_decisions_share_acquire_pipelines(
    valkey: ValkeyServer, redis_sync: redis.Redis, round_trips: list[int]
) -> None:
    """100 decisions at once: a handful of pipelines (at most 4 on their way at a time), not
    100 calls; and every one of them decided as alone."""

    async def body() -> None:
        store = RedisQuotaStore(valkey.url, timeout_s=2.0)
        policy = make_policy()
        unlimited = replace(
            policy.tenants["search"],
            buckets=(),
            max_concurrency=None,
            max_concurrency_per_class=MappingProxyType({}),
        )
        policy = replace(policy, tenants=MappingProxyType({"search": unlimited}))
        service = AdmissionService(policy, store, Metrics(CollectorRegistry()))
        try:
            attrs = RequestAttributes("POST", "/v2/models/m/infer", {"x-api-key": "k-search"})
            await service.check(attrs, "test")  # connects and loads the script
            before = round_trips[0]
            decisions = await asyncio.gather(*(service.check(attrs, "test") for _ in range(100)))
            assert round_trips[0] - before <= 10
            assert sum(d.admitted for d in decisions) == 100
        finally:
            await store.close()

    asyncio.run(body())
