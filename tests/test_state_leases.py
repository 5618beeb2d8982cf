"""Leases keyed by the request: tombstones and renewal, on both stores (the contract of
`sidecar.state.base`, continued from tests/test_state_contract.py)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import redis

from sidecar.core.types import LeaseRef, LimitKind
from sidecar.state import QuotaStore, RedisQuotaStore
from tests import test_state_contract as contract
from tests.fixtures_valkey import ValkeyServer
from tests.test_state_contract import Harness, bucket, check, lease_of, run_redis

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


def test_redis_leaves_no_lease_key_behind(valkey: ValkeyServer, redis_sync: redis.Redis) -> None:
    """After release only the tombstone is left, and it expires on its own."""

    async def body(store: RedisQuotaStore) -> None:
        c = replace(check(bucket(), model="llama"), lease_id=REQUEST_ID)
        await store.release(lease_of(c, await store.acquire(c)), tombstone_s=5)

    run_redis(valkey.url, body, timeout_s=2.0)
    keys = set(redis_sync.scan_iter("qos:*"))
    assert keys == {"qos:{acme}:bucket:req", f"qos:{{acme}}:released:{REQUEST_ID}"}
    assert 0 < redis_sync.pttl(f"qos:{{acme}}:released:{REQUEST_ID}") <= 5000
