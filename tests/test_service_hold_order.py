"""Holds through the service (issue 12). Adaptive LIFO: once a held request of a class
expired, that class's queue serves each tenant's newest waiter first, until it is empty. And
each transport's longest hold (core/holds.py) cuts a class's max_wait_ms.

The Triton view is scripted (`test_service_overload.Backend`); the benchmark's step run shows
the effect on the real stack (`benchmarks/README.md`)."""

from __future__ import annotations

import asyncio
import json

from prometheus_client import CollectorRegistry

from sidecar.core.holds import HoldBounds
from sidecar.core.types import Decision, Reason
from sidecar.metrics import Metrics
from sidecar.service import AdmissionService
from sidecar.state.memory import MemoryQuotaStore
from tests.test_service_overload import Backend, make, policy_with_overload, queued, request


def test_after_an_expiry_the_newest_waiter_goes_before_the_older_ones() -> None:
    backend = Backend(depth=6, drain=20.0)  # 3 ahead at 20/s: 0.15 s, so every one is held
    service, _ = make(backend, max_wait_ms=1500)
    assert service.deferrer is not None
    deferrer = service.deferrer

    async def body() -> tuple[Decision, Decision, asyncio.Task[Decision]]:
        first = asyncio.create_task(service.check(request(), "test"))
        await queued(service, 1)
        await asyncio.sleep(1.0)
        older = asyncio.create_task(service.check(request(), "test"))
        await queued(service, 2)
        newest = asyncio.create_task(service.check(request(), "test"))
        await queued(service, 3)
        expired = await asyncio.wait_for(first, 3.0)  # its 1.5 s passed; the others' not
        assert not older.done() and not newest.done()
        backend.depth = 3  # room for exactly one
        deferrer.on_scrape()
        admitted = await asyncio.wait_for(newest, 1.0)
        return expired, admitted, older

    expired, admitted, older = asyncio.run(body())
    assert (expired.status, expired.reason) == (503, Reason.OVERLOADED)
    assert admitted.reason is Reason.ADMITTED_DEFERRED
    # asyncio.run cancelled the older one, still held: it was not let go before the newest.
    assert older.cancelled()


def test_once_a_band_stands_an_arrival_is_shed_at_its_bands_pace() -> None:
    """Nothing of the band was let go in the 1.5 s before an expiry, although the model
    drains 20/s (better work takes it all): an arrival's wait is at least that long, over
    its 1.5 s budget. Shed at once, Retry-After that wait, instead of held 1.5 s for nothing."""
    backend = Backend(depth=6, drain=20.0)  # on the drain alone: 0.15 s, it would be held
    service, _ = make(backend, max_wait_ms=1500)

    async def body() -> tuple[Decision, Decision, float]:
        first = asyncio.create_task(service.check(request(), "test"))
        await queued(service, 1)
        # Held too, 1.2 s later: it still stands when the first expires, even on a host that
        # answers the arrival below a second late.
        await asyncio.sleep(1.2)
        held = asyncio.create_task(service.check(request(), "test"))
        await queued(service, 2)
        expired = await asyncio.wait_for(first, 3.0)  # the band stands; nothing went
        started = asyncio.get_running_loop().time()
        arrival = await service.check(request(), "test")
        shed_in = asyncio.get_running_loop().time() - started
        assert (await held).reason is Reason.OVERLOADED
        return expired, arrival, shed_in

    expired, arrival, shed_in = asyncio.run(body())
    assert expired.reason is Reason.OVERLOADED
    assert (arrival.status, arrival.reason) == (503, Reason.OVERLOADED)
    assert shed_in < 0.5  # at once, not after its 1.5 s budget
    retry_after_ms = json.loads(arrival.body)["retry_after_ms"]
    assert retry_after_ms >= 1500, retry_after_ms  # at least the band's span, not 0.15 s
    assert any("its band's pace" in line for line in arrival.trace), arrival.trace


def test_without_an_expiry_the_oldest_goes_first() -> None:
    backend = Backend(depth=6, drain=20.0)
    service, _ = make(backend, max_wait_ms=1500)
    assert service.deferrer is not None
    deferrer = service.deferrer

    async def body() -> tuple[Decision, asyncio.Task[Decision]]:
        oldest = asyncio.create_task(service.check(request(), "test"))
        await queued(service, 1)
        newer = asyncio.create_task(service.check(request(), "test"))
        await queued(service, 2)
        backend.depth = 3
        deferrer.on_scrape()
        return await asyncio.wait_for(oldest, 1.0), newer

    admitted, newer = asyncio.run(body())
    assert admitted.reason is Reason.ADMITTED_DEFERRED
    assert newer.cancelled()


def test_a_transport_holds_no_longer_than_its_bound() -> None:
    """A class that may wait 5 s: a predicted wait of 2.07 s is held on ext_proc (bound 29.5
    s) and answered at once on ext_authz HTTP (bound 1 s), with that wait as Retry-After."""
    backend = Backend(depth=34, drain=15.0)  # (34 - 4 + 1) ahead at 15/s: 2.067 s
    service = AdmissionService(
        policy_with_overload(max_wait_ms=5000),
        MemoryQuotaStore(),
        Metrics(CollectorRegistry()),
        load=backend.view,
    )
    service.hold_bounds = HoldBounds({"http": 1000, "ext_proc": 29500})

    async def body() -> tuple[Decision, bool]:
        shed = await service.check(request(), "http")
        held = asyncio.create_task(service.check(request(), "ext_proc"))
        await queued(service, 1)
        return shed, not held.done()

    shed, held = asyncio.run(body())
    assert (shed.status, shed.reason) == (503, Reason.OVERLOADED)
    assert json.loads(shed.body)["retry_after_ms"] == 2067
    assert any("max_wait 1s" in step for step in shed.trace)
    assert held
