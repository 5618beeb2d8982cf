"""Leases keyed by the request: tombstones and renewal, on both stores (the contract of
`sidecar.state.base`, continued from tests/test_state_contract.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

import pytest
import redis
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf import struct_pb2
from prometheus_client import CollectorRegistry

from sidecar.core.lease import format_lease, sign_lease
from sidecar.core.types import LeaseRef, LimitKind, QuotaCheck, QuotaResult, RequestAttributes
from sidecar.envoy import access_log
from sidecar.envoy.access_log import AccessLogServicer
from sidecar.envoy.common import LEASE_KEY
from sidecar.errors import StateUnavailable
from sidecar.leases import LeaseKeeper
from sidecar.metrics import Metrics
from sidecar.service import AdmissionService
from sidecar.state import MemoryQuotaStore, QuotaStore, RedisQuotaStore
from tests import test_state_contract as contract
from tests.core_fixtures import make_policy
from tests.fixtures_valkey import ValkeyServer
from tests.test_state_contract import FakeClock, Harness, bucket, check, lease_of, run_redis

# The contract's fixtures, shared: each store (and the one Valkey server) is set up the same.
harness = contract.harness
valkey = contract.valkey
redis_sync = contract.redis_sync

REQUEST_ID = "4f1c2d3e-aaaa-4bbb-8ccc-123456789abc"


def test_a_lease_is_keyed_by_the_request_id(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        c = replace(check(bucket(), model="llama"), lease_id=REQUEST_ID)
        held = await store.acquire(c)
        assert held.allowed and held.lease_id == REQUEST_ID
        assert await store.release(lease_of(c, held))
        assert not await store.release(lease_of(c, held))  # idempotent
        assert await store.in_flight("acme", None) == 0
        assert await store.model_in_flight("llama") == 0

    harness.run(body)


def test_an_acquire_after_its_release_takes_nothing(harness: Harness) -> None:
    """The late acquire: Redis ran it after the caller gave up and queued its release."""

    async def body(store: QuotaStore) -> None:
        c = replace(
            check(bucket(rate=0.5, burst=1), max_concurrency=1, model="llama"),
            lease_id=REQUEST_ID,
        )
        lease = LeaseRef("acme", "standard", REQUEST_ID, "llama")
        assert not await store.release(lease, tombstone_s=30)  # nothing held yet
        late = await store.acquire(c)
        assert not late.allowed and late.lease_id is None
        assert late.denied_by is LimitKind.LEASE_ID_USED
        assert await store.in_flight("acme", None) == 0
        assert await store.model_in_flight("llama") == 0
        # No bucket charge either: another request still gets the one token and the slot.
        other = await store.acquire(replace(c, lease_id="another-request"))
        assert other.allowed and other.in_flight == 1

    harness.run(body)


def test_a_tombstone_expires_with_its_ttl(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        c = replace(check(), lease_id=REQUEST_ID)
        await store.release(LeaseRef("acme", "standard", REQUEST_ID), tombstone_s=0.05)
        if harness.clock is not None:
            harness.clock.advance(0.05)
        else:
            await asyncio.sleep(0.1)
        assert (await store.acquire(c)).allowed

    harness.run(body)


def test_a_tombstone_is_per_tenant(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        await store.release(LeaseRef("acme", "standard", REQUEST_ID), tombstone_s=30)
        assert (await store.acquire(replace(check(tenant="beta"), lease_id=REQUEST_ID))).allowed

    harness.run(body)


def test_a_tombstone_names_one_tenant_and_id_whatever_their_characters(harness: Harness) -> None:
    """Tenant "a" with id "b:c" is not tenant "a:b" with id "c" (nor "a:" with "b:c")."""

    async def body(store: QuotaStore) -> None:
        await store.release(LeaseRef("a", "standard", "1:b:c"), tombstone_s=30)
        for tenant, lease_id in (("a:1", "b:c"), ("a:1:b", ":c"), ("1:a", "b:c")):
            took = await store.acquire(replace(check(tenant=tenant), lease_id=lease_id))
            assert took.allowed, (tenant, lease_id)
        refused = await store.acquire(replace(check(tenant="a"), lease_id="1:b:c"))
        assert refused.denied_by is LimitKind.LEASE_ID_USED

    harness.run(body)


def test_an_id_released_again_keeps_its_newest_tombstone(harness: Harness) -> None:
    """Released at t=0 for 0.05 s, again at t=0.03 for 0.05 s: still refused at t=0.06
    (the first has expired, the second has not), taken once the second has expired."""

    async def body(store: QuotaStore) -> None:
        lease = LeaseRef("acme", "standard", REQUEST_ID)
        c = replace(check(), lease_id=REQUEST_ID)

        async def advance(seconds: float) -> None:
            if harness.clock is not None:
                harness.clock.advance(seconds)
            else:
                await asyncio.sleep(seconds)

        await store.release(lease, tombstone_s=0.05)
        await advance(0.03)
        await store.release(lease, tombstone_s=0.05)
        await store.release(LeaseRef("acme", "standard", "other"), tombstone_s=0.01)
        await advance(0.03)
        assert (await store.acquire(c)).denied_by is LimitKind.LEASE_ID_USED
        await advance(0.05)
        assert (await store.acquire(c)).allowed

    harness.run(body)


def test_the_memory_stores_tombstones_are_not_walked_by_the_garbage_collector() -> None:
    """Every released id is kept for a lease TTL: tens of thousands at a few thousand
    releases a second. Kept in containers of strings and floats, the collector does not
    track them, so a full collection does not walk them (with tuples it did: pauses of
    2-11 ms that grew with the table)."""
    import gc

    store = MemoryQuotaStore()

    async def release(n: int) -> None:
        await store.release(LeaseRef("acme", "standard", f"id-{n}"), tombstone_s=30)

    async def body() -> None:
        for n in range(1000):
            await release(n)
        gc.collect()  # a full collection may untrack what it finds untrackable by then
        await release(1000)  # what a release adds between two collections

    asyncio.run(body())
    assert len(store._tombstones) == 1001
    assert not gc.is_tracked(store._tombstones)
    assert not any(gc.is_tracked(key) for key in store._tombstone_order)


def test_a_request_id_in_use_gets_no_second_lease(harness: Harness) -> None:
    """A client reusing a running request's id must not share (and so escape) its slot."""

    async def body(store: QuotaStore) -> None:
        c = replace(check(max_concurrency=5), lease_id=REQUEST_ID)
        assert (await store.acquire(c)).allowed
        again = await store.acquire(c)
        assert not again.allowed and again.denied_by is LimitKind.LEASE_ID_USED
        assert await store.in_flight("acme", None) == 1
        assert (await store.peek(c)).allowed  # a peek reads no lease id

    harness.run(body)


def test_renew_extends_live_leases_and_reports_gone_ones(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        short = check(model="llama", lease_ttl_s=0.3)
        gold = replace(short, klass="gold")
        a = lease_of(short, await store.acquire(short))
        b = lease_of(gold, await store.acquire(gold))
        c = lease_of(short, await store.acquire(short))
        await store.release(c)
        renewed = await store.renew("acme", [a, b, c], 60.0)
        assert renewed == {a.lease_id, b.lease_id}  # c was released: it stays gone
        if harness.clock is not None:
            harness.clock.advance(0.5)
        else:
            await asyncio.sleep(0.5)  # past the first TTL, on the server's clock
        assert await store.in_flight("acme", None) == 2
        assert await store.in_flight("acme", "gold") == 1
        assert await store.model_in_flight("llama") == 2

    harness.run(body)


def test_renew_never_brings_back_an_expired_lease(harness: Harness) -> None:
    async def body(store: QuotaStore) -> None:
        c = check(model="llama", lease_ttl_s=0.05)
        lease = lease_of(c, await store.acquire(c))
        await harness.let_leases_expire(store, 0.05, "acme", "llama")
        assert await store.renew("acme", [lease], 60.0) == set()
        assert await store.in_flight("acme", None) == 0
        assert await store.model_in_flight("llama") == 0

    harness.run(body)


@pytest.mark.stack
def test_redis_leaves_no_lease_key_behind(valkey: ValkeyServer, redis_sync: redis.Redis) -> None:
    """After release only the tombstones are left, in the tenant's set of them and the
    model's, each of which expires with its last tombstone."""

    async def body(store: RedisQuotaStore) -> None:
        c = replace(check(bucket(), model="llama"), lease_id=REQUEST_ID)
        await store.release(lease_of(c, await store.acquire(c)), tombstone_s=5)

    run_redis(valkey.url, body, timeout_s=2.0)
    keys = set(redis_sync.scan_iter("qos:*"))
    released = {"qos:{acme}:released", "qos:{=llama}:model_released"}
    assert keys == {"qos:{acme}:bucket:req", *released}
    for key in released:
        assert redis_sync.zrange(key, 0, -1) == [REQUEST_ID]
        assert 0 < redis_sync.pttl(key) <= 5000


@pytest.mark.stack
def test_redis_tombstones_that_ended_are_removed_by_the_next_release(
    valkey: ValkeyServer, redis_sync: redis.Redis
) -> None:
    """Tombstones are not keys that Redis expires in bursts: each release removes those that
    ended, and the set's TTL follows its longest one, whatever the TTL of the last call."""

    async def body(store: RedisQuotaStore) -> None:
        keep = replace(check(bucket(burst=100)), lease_id="keep")  # keeps the set alive
        await store.release(lease_of(keep, await store.acquire(keep)), tombstone_s=30)
        short = [replace(check(bucket(burst=100)), lease_id=f"short-{i}") for i in range(50)]
        leases = [lease_of(c, await store.acquire(c)) for c in short]
        assert all(await store.release_many(leases, tombstone_s=0.05))
        assert redis_sync.zcard("qos:{acme}:released") == 51
        refused = await store.acquire(short[0])  # a released id takes nothing while its
        assert refused.denied_by is LimitKind.LEASE_ID_USED  # tombstone lasts
        await asyncio.sleep(0.1)  # and once it ended, takes a lease again
        assert (await store.acquire(short[1])).allowed
        long = replace(check(bucket(burst=100)), lease_id="long")
        await store.release(lease_of(long, await store.acquire(long)), tombstone_s=30)
        assert redis_sync.zrange("qos:{acme}:released", 0, -1) == ["keep", "long"]  # 50 ended
        last = replace(check(bucket(burst=100)), lease_id="last")
        await store.release(lease_of(last, await store.acquire(last)), tombstone_s=1)
        assert redis_sync.pttl("qos:{acme}:released") > 20_000  # the 30 s ones hold it
        again = await store.acquire(long)
        assert not again.allowed and again.denied_by is LimitKind.LEASE_ID_USED

    run_redis(valkey.url, body, timeout_s=5.0)


# -- the service's side: releases owed and retried, leases renewed (sidecar/leases.py) -------


class FlakyStore(MemoryQuotaStore):
    """The memory store, failing every call while `down` (a stalled or dead Redis). With
    `run_late`, an acquire that fails still runs, as a stalled Redis runs it once it wakes."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.down = False
        self.run_late = False
        self.late: list[QuotaCheck] = []

    async def acquire(self, check: QuotaCheck) -> QuotaResult:
        if self.down:
            if self.run_late:
                self.late.append(check)
            raise StateUnavailable("down")
        return await super().acquire(check)

    async def release(self, lease: LeaseRef, *, tombstone_s: float = 10.0) -> bool:
        if self.down:
            raise StateUnavailable("down")
        return await super().release(lease, tombstone_s=tombstone_s)

    async def renew(self, tenant: str, leases: Sequence[LeaseRef], ttl_s: float) -> set[str]:
        if self.down:
            raise StateUnavailable("down")
        return await super().renew(tenant, leases, ttl_s)


def service_on(store: QuotaStore, clock: FakeClock) -> AdmissionService:
    return AdmissionService(make_policy(), store, Metrics(CollectorRegistry()), clock=clock)


SEARCH = RequestAttributes("POST", "/v2/models/simgpu/infer", {"x-api-key": "k-search"})


def test_an_acquire_run_late_is_undone_by_the_release_the_service_owes() -> None:
    clock = FakeClock()
    store = FlakyStore(clock)
    service = service_on(store, clock)

    async def body() -> None:
        store.down = store.run_late = True
        attrs = replace(SEARCH, request_id=REQUEST_ID)
        decision = await service.check(attrs, "test")  # fails open: no lease
        assert decision.admitted and decision.lease is None
        assert service.leases.backlog == 1
        assert not await service.leases.drain()  # still down: kept, not dropped
        store.down = False
        assert await service.leases.drain()
        assert service.leases.backlog == 0
        for late in store.late:  # Redis wakes and runs the acquire it had queued
            assert not (await store.acquire(late)).allowed
        assert await store.in_flight("search", None) == 0

    asyncio.run(body())


def test_a_release_that_fails_is_retried_not_dropped() -> None:
    clock = FakeClock()
    store = FlakyStore(clock)
    service = service_on(store, clock)

    async def body() -> None:
        decision = await service.check(SEARCH, "test")
        assert decision.lease is not None
        store.down = True
        assert not await service.release(decision.lease)
        assert service.leases.backlog == 1
        metrics = service.metrics.registry
        assert metrics.get_sample_value("qos_release_backlog") == 1
        store.down = False
        assert await service.leases.drain()
        assert await store.in_flight("search", None) == 0
        assert metrics.get_sample_value("qos_release_backlog") == 0

    asyncio.run(body())


def test_a_queued_release_needs_no_task_and_a_failed_one_is_owed() -> None:
    """The access log's path (sidecar/completions.py rule 2): the batch's own future, no
    coroutine or task per lease; a store failure is owed without anyone awaiting it."""
    clock = FakeClock()
    store = FlakyStore(clock)
    service = service_on(store, clock)

    async def body() -> None:
        first = await service.check(SEARCH, "test")
        second = await service.check(SEARCH, "test")
        assert first.lease is not None and second.lease is not None
        done = service.release_queued(first.lease)
        assert not isinstance(done, asyncio.Task)
        assert await done
        assert await store.in_flight("search", None) == 1
        store.down = True
        failed = service.release_queued(second.lease)
        with pytest.raises(StateUnavailable):
            await failed
        assert service.leases.backlog == 1
        store.down = False
        assert await service.leases.drain()
        assert await store.in_flight("search", None) == 0

    asyncio.run(body())


def test_running_leases_are_renewed_until_released() -> None:
    clock = FakeClock()
    store = FlakyStore(clock)
    service = service_on(store, clock)  # lease_ttl_s 120

    async def body() -> None:
        running = await service.check(SEARCH, "test")
        ended = await service.check(SEARCH, "test")
        assert running.lease is not None and ended.lease is not None
        await service.release(ended.lease)
        clock.advance(100)
        await service.leases.renew()
        clock.advance(100)  # past the first TTL, within the renewed one
        assert await store.in_flight("search", None) == 1
        assert service.leases.running == 1
        await service.release(running.lease)
        assert service.leases.running == 0

    asyncio.run(body())


def test_a_lease_released_elsewhere_is_forgotten() -> None:
    clock = FakeClock()
    store = FlakyStore(clock)
    service = service_on(store, clock)

    async def body() -> None:
        decision = await service.check(SEARCH, "test")
        assert decision.lease is not None
        await store.release(decision.lease)  # through another replica
        await service.leases.renew()
        assert service.leases.running == 0
        assert await store.in_flight("search", None) == 0

    asyncio.run(body())


def test_a_full_backlog_counts_what_it_drops() -> None:
    clock = FakeClock()
    store = FlakyStore(clock)
    metrics = Metrics(CollectorRegistry())
    keeper = LeaseKeeper(store, metrics, store.release, lambda: 10.0, max_backlog=1)
    keeper.owe(LeaseRef("a", "b", "one"))
    keeper.owe(LeaseRef("a", "b", "one"))  # the same lease once
    keeper.owe(LeaseRef("a", "b", "two"))
    assert keeper.backlog == 1
    assert metrics.registry.get_sample_value("qos_release_backlog_dropped_total") == 1


class GatedStore(MemoryQuotaStore):
    """The memory store whose releases wait until `opened` (a slow Redis answering late)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.opened: asyncio.Event | None = None

    async def release_many(
        self, leases: Sequence[LeaseRef], *, tombstone_s: float = 10.0
    ) -> list[bool | None]:
        assert self.opened is not None
        await self.opened.wait()
        return await super().release_many(leases, tombstone_s=tombstone_s)


def signed_entry(lease: LeaseRef, key: bytes) -> Any:
    """An access-log entry as Envoy sends it: the signed lease in ext_authz's metadata."""
    fields = struct_pb2.Struct()
    fields.update({LEASE_KEY: sign_lease(format_lease(lease), key)})
    metadata = base_pb2.Metadata()
    metadata.filter_metadata["envoy.filters.http.ext_authz"].CopyFrom(fields)
    return accesslog_pb2.HTTPAccessLogEntry(
        common_properties=accesslog_pb2.AccessLogCommon(metadata=metadata)
    )


@pytest.mark.parametrize("caller", ["release", "complete", "access_log_stream"])
def test_a_completion_cancelled_while_its_release_is_out_is_still_counted(caller: str) -> None:
    """completions.py rule 1, every way in: the bookkeeping runs when the store answers, not
    in the caller (`complete` awaits the release shielded, and the access-log stream waits
    for its releases without cancelling them when Envoy resets it): a waiter for the
    tenant's slot wakes, and the completion is counted."""
    clock = FakeClock()
    store = GatedStore(clock)
    service = service_on(store, clock)
    key = b"test-key-of-thirty-two-bytes-abc"

    async def body() -> None:
        store.opened = asyncio.Event()
        decision = await service.check(SEARCH, "test")
        assert decision.lease is not None
        waiter = asyncio.ensure_future(service._a_release_of("search", 60.0))
        if caller == "release":
            ending = asyncio.ensure_future(service.release(decision.lease))
        elif caller == "complete":
            ending = asyncio.ensure_future(service.complete(format_lease(decision.lease)))
        else:
            message = als_pb2.StreamAccessLogsMessage(
                http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(
                    log_entry=[signed_entry(decision.lease, key)]
                )
            )

            async def stream() -> AsyncIterator[Any]:
                yield message

            servicer = AccessLogServicer(service, lease_key=key)
            ending = asyncio.ensure_future(servicer.StreamAccessLogs(stream(), None))
        for _ in range(5):
            await asyncio.sleep(0)  # the release is queued and its store call waits
        ending.cancel()
        store.opened.set()
        await asyncio.wait_for(waiter, 5.0)  # woken by the release, not by its timeout
        registry = service.metrics.registry
        assert registry.get_sample_value("qos_completions_total", {"result": "released"}) == 1
        assert await store.in_flight("search", None) == 0

    asyncio.run(body())


def test_an_entry_the_adapter_fails_on_leaves_the_others_completed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug on one access-log entry is counted and logged; the message's other entries are
    still released and the stream is answered (a scripted failure: no real entry trips one)."""
    clock = FakeClock()
    store = FlakyStore(clock)
    service = service_on(store, clock)
    key = b"test-key-of-thirty-two-bytes-abc"
    real_timings = access_log.timings_of

    def timings_of(entry: Any) -> Any:
        if entry.request.path == "/broken":
            raise RuntimeError("a bug")
        return real_timings(entry)

    monkeypatch.setattr(access_log, "timings_of", timings_of)

    async def body() -> None:
        first = await service.check(SEARCH, "test")
        second = await service.check(SEARCH, "test")
        assert first.lease is not None and second.lease is not None
        broken = signed_entry(first.lease, key)
        broken.request.path = "/broken"
        message = als_pb2.StreamAccessLogsMessage(
            http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(
                log_entry=[broken, signed_entry(second.lease, key)]
            )
        )

        async def stream() -> AsyncIterator[Any]:
            yield message

        servicer = AccessLogServicer(service, lease_key=key)
        assert await servicer.StreamAccessLogs(stream(), None) is not None
        registry = service.metrics.registry
        assert registry.get_sample_value("qos_completions_total", {"result": "released"}) == 1
        errors = registry.get_sample_value("qos_adapter_errors_total", {"api": "access_log"})
        assert errors == 1
        assert await store.in_flight("search", None) == 1  # the broken entry's, to its TTL

    asyncio.run(body())
