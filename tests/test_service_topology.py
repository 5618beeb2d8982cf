"""The topology through the service: whose in-flight count of a model `max_in_flight` caps.

Two services on one store are two replicas. In the pod topology each is its pod's sidecar
(its own Triton) and each reaches the cap; in the gateway topology they front one pool and
share it. The real-process version is in test_e2e_topology.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from types import MappingProxyType

from prometheus_client import CollectorRegistry

from sidecar.core.lease import parse_lease
from sidecar.core.types import Decision, Reason
from sidecar.metrics import Metrics
from sidecar.policy.model import Policy
from sidecar.service import AdmissionService
from sidecar.state.memory import MemoryQuotaStore
from tests.test_service_overload import Backend, policy_with_overload, request


def capped_policy(cap: int) -> Policy:
    policy = policy_with_overload(max_wait_ms=5000)
    standard = policy.classes["standard"]
    capped = replace(standard, overload=replace(standard.overload, max_in_flight=cap))
    return replace(policy, classes=MappingProxyType({**policy.classes, "standard": capped}))


def replicas(store: MemoryQuotaStore, *pods: str | None) -> list[AdmissionService]:
    """One service per pod (None: a gateway replica), each with an empty-queue Triton view:
    only the cap can hold a request."""
    backend = Backend(depth=0)
    return [
        AdmissionService(
            capped_policy(2),
            store,
            Metrics(CollectorRegistry()),
            load=backend.view,
            model_pod=pod,
        )
        for pod in pods
    ]


async def admit_all_at_once(services: list[AdmissionService]) -> list[list[Decision]]:
    """Each service's admits of three requests, one after the other (after a refresh of the
    counts, so every replica knows them), until one is still held after 0.2 s (cancelled)."""
    admitted: list[list[Decision]] = []
    for service in services:
        await service.refresh_model_in_flight(["simgpu"])
        mine: list[Decision] = []
        for _ in range(3):
            task = asyncio.create_task(service.check(request(), "test"))
            done, _pending = await asyncio.wait([task], timeout=0.2)
            if not done:
                task.cancel()  # held at the cap: this replica is full
                await asyncio.gather(task, return_exceptions=True)
                break
            if task.result().admitted:
                mine.append(task.result())
        admitted.append(mine)
    return admitted


def test_in_the_pod_topology_each_pod_reaches_its_own_cap() -> None:
    store = MemoryQuotaStore()
    services = replicas(store, "pod-a", "pod-b")

    async def body() -> None:
        admitted = await admit_all_at_once(services)
        assert [len(each) for each in admitted] == [2, 2]  # 4 at once: 2 per pod
        assert await store.model_in_flight("simgpu", "pod-a") == 2
        assert await store.model_in_flight("simgpu", "pod-b") == 2
        assert await store.model_in_flight("simgpu") == 0  # nobody counts the fleet's
        lease = parse_lease(dict(admitted[1][0].headers)["x-qos-lease"])
        assert lease is not None and lease.model_pod == "pod-b"
        # pod-a's sidecar completing pod-b's lease (a stray access-log entry) frees it there.
        assert await services[0].complete(dict(admitted[1][0].headers)["x-qos-lease"])
        assert await store.model_in_flight("simgpu", "pod-b") == 1
        assert await store.model_in_flight("simgpu", "pod-a") == 2
        for decision in admitted[0]:
            await services[0].complete(dict(decision.headers)["x-qos-lease"])
        assert await store.in_flight("search", None) == 1

    asyncio.run(body())


def test_in_the_gateway_topology_the_cap_is_the_pools() -> None:
    store = MemoryQuotaStore()
    services = replicas(store, None, None)

    async def body() -> None:
        admitted = await admit_all_at_once(services)
        assert [len(each) for each in admitted] == [2, 0]  # 2 in all: one pool, one cap
        assert await store.model_in_flight("simgpu") == 2
        decision = admitted[0][0]
        lease = parse_lease(dict(decision.headers)["x-qos-lease"])
        assert lease is not None and lease.model_pod is None
        assert decision.reason is Reason.ADMITTED

    asyncio.run(body())
