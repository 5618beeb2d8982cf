"""The Redis store's one retry on a connection error (a connection that died between its
checkout and its answer, as after a restart): safe scripts are retried on a fresh connection,
`charge` is not, and an acquire whose lost first attempt ran is reported, never doubled."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from sidecar.core.types import BucketCheck, LeaseRef, QuotaCheck
from sidecar.errors import StateUnavailable
from sidecar.state.redis_store import RedisQuotaStore
from tests.fixtures_valkey import ValkeyServer

pytestmark = pytest.mark.stack
BUCKET = BucketCheck("requests", rate_per_s=1.0, burst=10.0, cost=1.0)


@pytest.fixture(scope="module")
def valkey() -> Iterator[ValkeyServer]:
    with ValkeyServer() as server:
        yield server


def check(lease_id: str) -> QuotaCheck:
    return QuotaCheck("acme", "c", (BUCKET,), 4, None, 10.0, lease_id=lease_id)


def drop_first_answer(store: RedisQuotaStore, *, after_running: bool) -> list[int]:
    """Make the next script call fail with a connection error: before it reached the server,
    or (`after_running`) after the server ran it and before its answer came back."""
    pipe: Any = store._pipe  # every single-server call goes through it (redis_pipe.py)
    real, calls = pipe.execute, [0]

    async def flaky(*args: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            if after_running:
                await real(*args)
            raise RedisConnectionError("Connection closed by server.")
        return await real(*args)

    pipe.execute = flaky
    return calls


def run(valkey: ValkeyServer, body: Any) -> None:
    async def main() -> None:
        store = RedisQuotaStore(valkey.url, timeout_s=1.0)
        try:
            await body(store)
        finally:
            await store.close()

    asyncio.run(main())


def test_a_dead_connection_fails_no_acquire_or_release(valkey: ValkeyServer) -> None:
    async def body(store: RedisQuotaStore) -> None:
        calls = drop_first_answer(store, after_running=False)
        result = await store.acquire(check("retry-1"))
        assert result.allowed and result.lease_id == "retry-1" and calls[0] > 1
        calls = drop_first_answer(store, after_running=False)
        assert await store.release(LeaseRef("acme", "c", "retry-1", None))
        assert calls[0] > 1  # (a fresh server may answer NOSCRIPT first: one more)
        assert await store.in_flight("acme", None) == 0

    run(valkey, body)


def test_an_acquire_whose_lost_attempt_ran_is_an_error_not_a_double_charge(
    valkey: ValkeyServer,
) -> None:
    async def body(store: RedisQuotaStore) -> None:
        drop_first_answer(store, after_running=True)
        with pytest.raises(StateUnavailable, match="Connection closed by server"):
            await store.acquire(check("retry-2"))
        assert await store.in_flight("acme", None) == 1  # the first attempt's lease, once
        assert await store.release(LeaseRef("acme", "c", "retry-2", None))  # owed: released

    run(valkey, body)


def test_charge_is_never_retried(valkey: ValkeyServer) -> None:
    async def body(store: RedisQuotaStore) -> None:
        calls = drop_first_answer(store, after_running=False)
        with pytest.raises(StateUnavailable):
            await store.charge("acme", [BUCKET])
        assert calls == [1]

    run(valkey, body)
