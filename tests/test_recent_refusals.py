"""The last refusals and their steps (sidecar/recent_refusals.py), and `/v1/refusals`.
The real-stack version (a 429 through Envoy, then the admin listener) is in test_e2e_stack."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from sidecar.admin.http import build_admin_app
from sidecar.core.decide import malformed, shed
from sidecar.core.types import Decision, Outcome, Reason, RequestAttributes
from sidecar.metrics import Metrics
from sidecar.policy.reload import FixedPolicy
from sidecar.recent_refusals import RecentRefusals
from sidecar.service import AdmissionService
from sidecar.state.memory import MemoryQuotaStore
from tests.core_fixtures import make_policy

INFER = "/v2/models/simgpu/infer"


def refusal(tenant: str, n: int) -> Decision:
    return shed(Reason.OVERLOADED, tenant, "batch", "batch", [f"step {n}"], retry_after_s=1.0)


def test_only_refusals_are_kept_newest_first_in_a_bounded_ring() -> None:
    clock = iter(range(100)).__next__
    ring = RecentRefusals(kept=3, clock=lambda: float(clock()))
    admit = Decision(Outcome.ADMIT, 200, Reason.ADMITTED, "a", "batch", "batch")
    ring.note(admit, RequestAttributes("POST", INFER, {}))
    for n in range(5):
        ring.note(
            refusal("a" if n % 2 else "b", n), RequestAttributes("POST", INFER, {}, None, f"r{n}")
        )
    kept = ring.read()
    assert [r["request_id"] for r in kept] == ["r4", "r3", "r2"]  # the oldest two pushed out
    assert [r["trace"] for r in kept] == [
        ["step 4", "shed 503 overloaded"],
        *[[f"step {n}", "shed 503 overloaded"] for n in (3, 2)],
    ]
    assert kept[0]["at"] > kept[1]["at"] and kept[0]["path"] == INFER
    assert kept[0]["status"] == 503 and kept[0]["reason"] == "overloaded"
    assert [r["request_id"] for r in ring.read(tenant="a")] == ["r3"]
    assert [r["request_id"] for r in ring.read(limit=1)] == ["r4"]
    assert ring.read(tenant="nobody") == [] and ring.read(limit=0) == []
    ring.note(refusal("a", 9), RequestAttributes("POST", INFER + "?api_key=secret", {}))
    assert ring.read(limit=1)[0]["path"] == INFER  # a query may carry a credential
    ring.note(malformed("no path"))  # refused before anything was known: kept, no request id
    assert ring.read(limit=1)[0]["request_id"] is None
    assert ring.read(limit=1)[0]["status"] == 400


def test_the_admin_listener_shows_a_tenants_last_refusals_with_their_steps() -> None:
    policy = make_policy()
    service = AdmissionService(policy, MemoryQuotaStore(), Metrics(CollectorRegistry()))

    def attrs(n: int) -> RequestAttributes:  # each its own request id (its lease's id)
        return RequestAttributes("POST", INFER, {"x-api-key": "k-analytics"}, None, f"req-{n}")

    async def body() -> None:
        for n in range(5):  # analytics: burst 5
            assert (await service.check(attrs(n), "test")).admitted
        assert (await service.check(attrs(6), "test")).reason is Reason.OVER_RATE
        client: TestClient[Any, Any] = TestClient(
            TestServer(build_admin_app(service, FixedPolicy(policy)))  # type: ignore[arg-type]
        )
        await client.start_server()
        try:
            answer = await (await client.get("/v1/refusals?tenant=analytics")).json()
            (only,) = answer["refusals"]
            assert only["request_id"] == "req-6" and only["reason"] == "over_rate"
            assert "tenant 'analytics'" in only["trace"][0]
            assert only["trace"][-1] == "shed 429 over_rate"
            assert (await (await client.get("/v1/refusals?tenant=search")).json()) == {
                "refusals": []
            }
            for bad in ("x", "-1"):
                response = await client.get(f"/v1/refusals?limit={bad}")
                assert response.status == 400
                assert (await response.json())["error"] == "bad_request"
        finally:
            await client.close()

    asyncio.run(body())


def test_the_refusals_command_says_which_replica_it_could_not_read(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sidecar.cli import main

    assert main(["refusals", "--admin", "http://127.0.0.1:9"]) == 2  # nothing listens there
    assert "cannot read http://127.0.0.1:9" in capsys.readouterr().err
