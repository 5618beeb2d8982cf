"""Priority and fairness across gateway replicas, through the service (`core.fleet`).

Two services on one store are two replicas of a gateway tier in front of one pool capped at
one request in flight. Each exchange (`exchange_fleet`) tells a replica what the other holds.
The real-process version is in test_e2e_fleet.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from types import MappingProxyType

from prometheus_client import CollectorRegistry

from sidecar.core.types import Decision, RequestAttributes
from sidecar.errors import StateUnavailable
from sidecar.metrics import Metrics
from sidecar.policy.model import Policy
from sidecar.service import AdmissionService
from sidecar.state.memory import MemoryQuotaStore
from tests.test_service_overload import INFER, Backend, policy_with_overload


def pool_of_one() -> Policy:
    """standard (rank 2) and batch (rank 3) both capped at one request in flight."""
    policy = policy_with_overload(max_wait_ms=5000)
    classes = dict(policy.classes)
    for name in ("standard", "batch"):
        klass = classes[name]
        assert klass.overload is not None
        classes[name] = replace(klass, overload=replace(klass.overload, max_in_flight=1))
    return replace(policy, classes=MappingProxyType(classes))


def gateway(store: MemoryQuotaStore, n: int) -> list[AdmissionService]:
    backend = Backend(depth=0)
    return [
        AdmissionService(pool_of_one(), store, Metrics(CollectorRegistry()), load=backend.view)
        for _ in range(n)
    ]


def ask(key: str, klass: str) -> RequestAttributes:
    return RequestAttributes("POST", INFER, {"x-api-key": key, "x-qos-class": klass})


async def exchange(services: list[AdmissionService]) -> None:
    """Every replica reads the counts and exchanges, twice (so each has seen the others')."""
    for _ in range(2):
        for n, service in enumerate(services):
            assert service.deferrer is not None
            service.deferrer.on_scrape()  # Triton's queue: still empty (the backend's view)
            await service.refresh_model_in_flight(["simgpu"])
            assert await service.exchange_fleet(f"replica-{n}", 10.0)
            await asyncio.sleep(0.01)  # a request let go writes its count meanwhile


async def held(task: asyncio.Task[Decision]) -> bool:
    await asyncio.sleep(0.05)
    return not task.done()


def test_a_better_band_held_on_another_replica_gets_the_room_first() -> None:
    a, b = gateway(MemoryQuotaStore(), 2)

    async def body() -> None:
        first = await a.check(ask("k-analytics", "batch"), "test")
        assert first.admitted  # the pool's one slot
        await exchange([a, b])  # both know the pool is full
        batch = asyncio.create_task(a.check(ask("k-analytics", "batch"), "test"))
        standard = asyncio.create_task(b.check(ask("k-search", "standard"), "test"))
        assert await held(batch) and await held(standard)
        await exchange([a, b])
        # The slot frees on A. Alone, A would let its own batch waiter go at once.
        assert await a.complete(dict(first.headers)["x-qos-lease"])
        assert await held(batch)
        await exchange([a, b])  # B sees the room: its better band goes
        assert (await asyncio.wait_for(standard, 1.0)).admitted
        assert await held(batch)  # and the pool is full again
        batch.cancel()
        await asyncio.gather(batch, return_exceptions=True)

    asyncio.run(body())


def test_a_tenant_spread_over_replicas_gets_its_share_not_one_per_replica() -> None:
    """search waits on both replicas, analytics on one (A), same band. With the fleet's
    counters they alternate on the pool (1:1). Per replica, B would hand each slot that frees
    on it to its own search waiter, for ever: search 8, analytics 0."""
    policy = pool_of_one()
    search, analytics = policy.tenants["search"], policy.tenants["analytics"]
    policy = replace(
        policy,
        tenants=MappingProxyType(
            {
                **policy.tenants,
                "search": replace(search, buckets=(), max_concurrency=None,
                                  max_concurrency_per_class=MappingProxyType({})),
                "analytics": replace(analytics, buckets=()),
            }
        ),
    )  # fmt: skip
    store, backend = MemoryQuotaStore(), Backend(depth=0)
    a, b = (
        AdmissionService(policy, store, Metrics(CollectorRegistry()), load=backend.view)
        for _ in range(2)
    )
    services = [a, b]

    async def body() -> list[str]:
        first = await b.check(ask("k-search", "standard"), "test")
        assert first.admitted  # B holds the pool's one slot to begin with
        await exchange(services)
        waiting = [
            (name, service, asyncio.create_task(service.check(ask(key, "standard"), "test")))
            for _ in range(6)
            for name, key, service in (("search", "k-search", a), ("search", "k-search", b),
                                       ("analytics", "k-analytics", a))
        ]  # fmt: skip
        await asyncio.sleep(0.05)
        order: list[str] = []
        running, where = first, b
        for _ in range(8):
            await exchange(services)
            # The completion reaches the replica that admitted it (its Envoy's access log).
            await where.complete(dict(running.headers)["x-qos-lease"])
            await exchange(services)
            done = [w for w in waiting if w[2].done() and w[2].result().admitted]
            assert len(done) == 1, (order, [name for name, _, _ in done])  # the pool holds one
            waiting.remove(done[0])
            name, where, task = done[0]
            order.append(name)
            running = task.result()
        for _, _, task in waiting:
            task.cancel()
        await asyncio.gather(*(task for _, _, task in waiting), return_exceptions=True)
        return order

    order = asyncio.run(body())
    assert abs(order.count("search") - order.count("analytics")) <= 1, order


def test_a_store_outage_forgets_other_replicas_holds_instead_of_reserving_for_them() -> None:
    store = MemoryQuotaStore()
    a, b = gateway(store, 2)

    async def body() -> None:
        first = await a.check(ask("k-analytics", "batch"), "test")
        await exchange([a, b])
        standard = asyncio.create_task(b.check(ask("k-search", "standard"), "test"))
        assert await held(standard)
        await exchange([a, b])
        assert a.deferrer is not None
        assert a.deferrer.elsewhere("simgpu").ahead_of(3, "analytics") == 1

        async def down(*_: object) -> None:
            raise StateUnavailable("store down")

        a.store.fleet_exchange = down  # type: ignore[method-assign]
        assert not await a.exchange_fleet("replica-0", 10.0)
        assert a.deferrer.elsewhere("simgpu").ahead_of(3, "analytics") == 0
        assert first.admitted
        standard.cancel()
        await asyncio.gather(standard, return_exceptions=True)

    asyncio.run(body())


def test_an_exchange_gives_the_fleets_counters_the_policys_weights_for_unseen_tenants() -> None:
    """A replica that has never held a tenant's request counts that tenant's waiters on other
    replicas at one unit over its policy weight, as the replica holding them charges them."""
    policy = pool_of_one()
    heavy = replace(policy.tenants["search"], weight=4.0)
    policy = replace(policy, tenants=MappingProxyType({**policy.tenants, "search": heavy}))
    service = AdmissionService(
        policy, MemoryQuotaStore(), Metrics(CollectorRegistry()), load=Backend(depth=0).view
    )

    async def body() -> None:
        await exchange([service])

    asyncio.run(body())
    assert service.deferrer is not None
    fairness = service.deferrer.queue.fairness
    assert fairness.work_of(2, "search") == 0.25
    assert fairness.work_of(2, "analytics") == 1.0
