"""The admin listener in process: liveness and readiness, against a scripted view of Triton.
The real-stack version (Triton stopped → /readyz 503) is in test_e2e_faults."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from sidecar.admin.http import build_admin_app
from sidecar.core.load import LoadView
from sidecar.errors import StateUnavailable
from sidecar.metrics import Metrics
from sidecar.policy.reload import FixedPolicy
from sidecar.service import AdmissionService
from sidecar.state.memory import MemoryQuotaStore
from tests.core_fixtures import make_policy


class DownStore(MemoryQuotaStore):
    async def ping(self) -> None:
        raise StateUnavailable("scripted outage")


def probe_of(view: list[LoadView], now: float) -> Any:
    async def probe() -> tuple[list[str], dict[str, Any]]:
        return view[0].not_ready(now, 1.0), {"triton": dict(view[0].ready)}

    return probe


def test_readyz_follows_triton_and_healthz_stays_liveness_only() -> None:
    policy = make_policy()
    service = AdmissionService(policy, DownStore(), Metrics(CollectorRegistry()))
    view = [LoadView(models={}, ready={})]

    async def body() -> None:
        app = build_admin_app(service, FixedPolicy(policy), probe_of(view, 10.0))  # type: ignore[arg-type]
        client: TestClient[Any, Any] = TestClient(TestServer(app))
        await client.start_server()
        try:

            async def get(path: str) -> tuple[int, dict[str, Any]]:
                response = await client.get(path)
                return response.status, await response.json()

            status, ready = await get("/readyz")  # never checked Triton yet
            assert status == 503 and ready["status"] == "not_ready"
            assert ready["reason"] == "triton_not_ready"
            assert ready["not_ready"] == ["triton: not checked yet"]
            assert await get("/healthz") == (200, {"status": "ok"})

            view[0] = LoadView(models={}, ready={"t0": False}, checked_at=10.0)
            status, ready = await get("/readyz")
            assert (status, ready["not_ready"]) == (503, ["triton t0: not ready"])
            assert await get("/healthz") == (200, {"status": "ok"})

            # Triton ready: ready, though the store is down (reported: classes decide).
            view[0] = LoadView(models={}, ready={"t0": True}, checked_at=10.0)
            status, ready = await get("/readyz")
            assert status == 200 and ready["status"] == "ready"
            assert ready["store"].startswith("unavailable") and ready["triton"] == {"t0": True}
        finally:
            await client.close()

    asyncio.run(body())


def test_readyz_without_triton_is_ready_once_the_policy_is_loaded() -> None:
    policy = make_policy()
    service = AdmissionService(policy, MemoryQuotaStore(), Metrics(CollectorRegistry()))

    async def body() -> None:
        client: TestClient[Any, Any] = TestClient(
            TestServer(build_admin_app(service, FixedPolicy(policy)))  # type: ignore[arg-type]
        )
        await client.start_server()
        try:
            response = await client.get("/readyz")
            assert response.status == 200
            assert (await response.json())["store"] == "ok"
        finally:
            await client.close()

    asyncio.run(body())


def test_an_unknown_admin_path_is_json() -> None:
    policy = make_policy()
    service = AdmissionService(policy, MemoryQuotaStore(), Metrics(CollectorRegistry()))

    async def body() -> None:
        client: TestClient[Any, Any] = TestClient(
            TestServer(build_admin_app(service, FixedPolicy(policy)))  # type: ignore[arg-type]
        )
        await client.start_server()
        try:
            response = await client.get("/nope")
            assert response.status == 404
            assert await response.json() == {"error": "not_found", "reason": "not_found"}
        finally:
            await client.close()

    asyncio.run(body())


class FlakyStore(MemoryQuotaStore):
    down = False

    async def in_flight(self, tenant: str, klass: str) -> int:
        if self.down:
            raise StateUnavailable("scripted outage")
        return await super().in_flight(tenant, klass)


def test_in_flight_gauges_say_how_old_they_are_while_the_store_is_down() -> None:
    from sidecar.admin.staleness import InFlightRefresher

    store, now = FlakyStore(), [100.0]
    service = AdmissionService(make_policy(), store, Metrics(CollectorRegistry()))
    refresher = InFlightRefresher(service, clock=lambda: now[0])

    def stale() -> float | None:
        return service.metrics.registry.get_sample_value("qos_state_stale_seconds")

    async def body() -> None:
        assert await refresher.once() and stale() == 0.0
        store.down = True
        now[0] += 3.0
        assert not await refresher.once() and stale() == 3.0
        now[0] += 2.0
        assert not await refresher.once() and stale() == 5.0  # ages while it lasts
        store.down = False
        assert await refresher.once() and stale() == 0.0

    asyncio.run(body())
