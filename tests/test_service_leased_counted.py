"""Leased mode with a class that reads its model's count (`max_in_flight` or `protect`, as in
every shipped preset): the bucket is spent from slices and the request's lease is its model's
entry alone (`LeaseRef.model_only`), written after the answer. On a real Valkey: no acquire on
the decision's path, the model's count right while requests run, renewed past its TTL, and
freed exactly once when they end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from types import MappingProxyType
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from sidecar.core.decide import HEADER_LEASE
from sidecar.core.lease import parse_lease
from sidecar.core.load import LoadView, ModelLoad
from sidecar.core.types import Decision
from sidecar.metrics import Metrics
from sidecar.policy.model import OverloadPolicy, Policy
from sidecar.service import AdmissionService
from sidecar.state.memory import MemoryQuotaStore
from sidecar.state.redis_store import RedisQuotaStore
from tests.fixtures_valkey import ValkeyServer
from tests.test_service_leased import Counting, leased_policy, request


def counting_policy(lease_ttl_s: float = 30.0) -> Policy:
    """`leased_policy` (slices of 100) whose `batch` class reads the model's count: a cap that
    never binds, so every admit of the policy counts in `simgpu`'s set."""
    policy = leased_policy(1000.0, 200.0, 100)
    classes = dict(policy.classes)
    overload = OverloadPolicy(admit_below=100, max_in_flight=1000)
    classes["batch"] = replace(classes["batch"], overload=overload)
    return replace(policy, classes=MappingProxyType(classes), lease_ttl_s=lease_ttl_s)


def idle_triton() -> LoadView:
    load = ModelLoad("t0", "simgpu", 0, 20.0, 0.0, 0.0, time.monotonic())
    return LoadView(models={"simgpu": (load,)}, ready={"t0": True})


def token(decision: Decision) -> str:
    return next(value for name, value in decision.headers if name == HEADER_LEASE)


@pytest.fixture(scope="module")
def valkey() -> Iterator[ValkeyServer]:
    with ValkeyServer() as server:
        yield server


async def written(service: AdmissionService) -> None:
    """Until every admit's model entry has landed (they are written after the answer)."""
    for _ in range(200):
        if not service._model_writes:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("model writes still on their way after 2 s")


@pytest.mark.stack
def test_counted_requests_spend_slices_and_hold_only_their_model_entry(
    valkey: ValkeyServer,
) -> None:
    async def body() -> None:
        redis = RedisQuotaStore(valkey.url, timeout_s=2.0)
        await redis._client.flushall()
        store = Counting(redis)
        service = AdmissionService(
            counting_policy(), store, Metrics(CollectorRegistry()), load=idle_triton
        )
        try:
            decisions = [await service.check(request(), "test") for _ in range(30)]
            assert all(d.admitted for d in decisions)
            assert (store.takes, store.acquires) == (1, 0)  # one slice; no acquire
            leases = [d.lease for d in decisions]
            assert all(x is not None and x.model_only and x.model == "simgpu" for x in leases)
            assert all(token(d).startswith("v1m.") for d in decisions)
            await written(service)
            assert await redis.model_in_flight("simgpu") == 30
            assert await redis.in_flight("analytics", None) == 0  # no tenant lease
            ended = [await service.complete(token(d)) for d in decisions[:10]]
            assert ended == [True] * 10
            assert await redis.model_in_flight("simgpu") == 20
            assert await service.complete(token(decisions[0])) is False  # freed once only
            assert await redis.model_in_flight("simgpu") == 20
            # An answer Envoy never used: its entry and its unit go back.
            await service.release_undelivered(decisions[-1])
            assert await redis.model_in_flight("simgpu") == 19
        finally:
            await redis.close()

    asyncio.run(body())


@pytest.mark.stack
def test_a_running_model_only_lease_is_renewed_past_its_ttl_and_dropped_once_ended(
    valkey: ValkeyServer,
) -> None:
    """TTL 0.6 s. Renewed every 0.2 s, three running leases outlive it twice over; the one
    that ended is gone from the renewals. Left alone, the others expire within one TTL."""

    async def body() -> tuple[int, int, int]:
        redis = RedisQuotaStore(valkey.url, timeout_s=2.0)
        await redis._client.flushall()
        service = AdmissionService(
            counting_policy(lease_ttl_s=0.6), redis, Metrics(CollectorRegistry()), load=idle_triton
        )
        try:
            decisions = [await service.check(request(), "test") for _ in range(4)]
            await written(service)
            assert service.leases.running == 4  # renewed once written
            lease = parse_lease(token(decisions[0]))
            assert lease is not None and lease.model_only
            assert await service.complete(token(decisions[0]))
            for _ in range(6):  # 1.2 s: twice the TTL
                await asyncio.sleep(0.2)
                await service.leases.renew()
            renewed = await redis.model_in_flight("simgpu")
            running = service.leases.running
            await asyncio.sleep(0.8)  # no renewal: the TTL ends them
            return renewed, running, await redis.model_in_flight("simgpu")
        finally:
            await redis.close()

    assert asyncio.run(body()) == (3, 3, 0)


class SlowCounts(Counting):
    """Its model writes take 50 ms: a request's end comes before its entry is written."""

    async def count_for_model_many(self, leases: Any, ttl_s: float) -> None:
        await asyncio.sleep(0.05)
        await self.inner.count_for_model_many(leases, ttl_s)


def test_an_end_before_its_model_entry_is_written_is_released_after_the_write() -> None:
    """Envoy's completion of a request shorter than the model write's round trip: the
    release is queued once the write lands (`completions` rule 2), so that it does not run
    first and leave the entry to its TTL. The access log's path (`complete_queued`), which
    takes no coroutine, and a caller's (`complete`)."""

    async def body() -> list[int]:
        inner = MemoryQuotaStore()
        service = AdmissionService(
            counting_policy(), SlowCounts(inner), Metrics(CollectorRegistry()), load=idle_triton
        )
        counts = []
        for _ in range(2):
            decision = await service.check(request(), "test")
            assert decision.lease is not None and decision.lease.model_only
            assert service._model_writes  # on its way
            done = service.complete_queued(token(decision), None, None)
            assert not isinstance(done, bool)
            assert await done is True  # its entry was there to free
            assert service.leases.running == 0  # not renewed once it ended
            counts.append(await inner.model_in_flight("simgpu"))
            assert await service.complete(token(decision)) is False  # once only
        return counts

    assert asyncio.run(body()) == [0, 0]
