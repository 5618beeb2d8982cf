"""The circuit breaker in front of the quota store: a scripted failing store, a frozen clock."""

from __future__ import annotations

import asyncio
import logging

import pytest

from sidecar.core.types import LeaseRef
from sidecar.errors import StateUnavailable
from sidecar.state.breaker import CircuitBreaker, GuardedStore
from sidecar.state.memory import MemoryQuotaStore


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FlakyStore(MemoryQuotaStore):
    """A memory store whose calls fail while `down`, counting the calls that reached it."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.calls = 0
        self.pings = 0

    async def in_flight(self, tenant: str, klass: str | None) -> int:
        self.calls += 1
        if self.down:
            raise StateUnavailable("redis in_flight: no answer within 50 ms")
        return await super().in_flight(tenant, klass)

    async def ping(self) -> None:
        self.pings += 1
        if self.down:
            raise StateUnavailable("redis ping: no answer within 50 ms")


def guarded() -> tuple[GuardedStore, FlakyStore, Clock, list[bool], list[float]]:
    clock, changes, degraded_s = Clock(), [], []
    inner = FlakyStore()
    breaker = CircuitBreaker(clock=clock, on_change=changes.append, on_degraded_s=degraded_s.append)
    return GuardedStore(inner, breaker), inner, clock, changes, degraded_s


async def fails(store: GuardedStore) -> None:
    with pytest.raises(StateUnavailable):
        await store.in_flight("acme", None)


def test_two_failures_open_the_circuit_and_later_calls_fail_fast() -> None:
    async def main() -> None:
        store, inner, _, changes, _ = guarded()
        inner.down = True
        await fails(store)
        assert not store.breaker.is_open  # one lost call is not an outage
        await fails(store)
        assert store.breaker.is_open and changes == [True]
        for _ in range(100):
            await fails(store)
        assert inner.calls == 2  # none of the hundred reached the store

    asyncio.run(main())


def test_one_probe_per_interval_and_a_successful_probe_closes() -> None:
    """Probes are the background loop's PINGs, never a request's call: no decision waits for
    the store while the circuit is open."""

    async def main() -> None:
        store, inner, clock, changes, degraded_s = guarded()
        inner.down = True
        await fails(store)
        await fails(store)
        clock.now += 0.4
        await store.probe()
        assert inner.pings == 0  # no probe before the interval
        clock.now += 0.2
        await store.probe()  # the probe, still failing
        await store.probe()  # not due again yet
        assert inner.pings == 1
        await fails(store)  # requests fail fast, due probe or not
        clock.now += 0.5
        await fails(store)
        assert inner.calls == 2
        inner.down = False
        await store.probe()  # the probe succeeds
        assert not store.breaker.is_open and changes == [True, False]
        assert sum(degraded_s) == pytest.approx(1.1)
        assert await store.in_flight("acme", None) == 0
        assert (inner.calls, inner.pings) == (3, 2)

    asyncio.run(main())


def test_only_one_probe_runs_at_a_time() -> None:
    breaker = CircuitBreaker(clock=Clock(), failures_to_open=1)
    breaker.failed(StateUnavailable("down"))
    breaker._next_probe_s = 0.0  # a probe is due
    assert not breaker.allow()  # never a request's call
    assert breaker.probe_due()
    assert not breaker.probe_due()  # while it runs
    breaker.abandoned()
    assert breaker.probe_due()


def test_degraded_time_accrues_while_open() -> None:
    clock, degraded_s = Clock(), []
    breaker = CircuitBreaker(clock=clock, failures_to_open=1, on_degraded_s=degraded_s.append)
    breaker.accrue()
    assert degraded_s == []  # closed: nothing to report
    breaker.failed(StateUnavailable("down"))
    clock.now += 2.0
    breaker.accrue()
    clock.now += 3.0
    breaker.succeeded()
    assert degraded_s == [2.0, 3.0]


def test_one_log_line_per_transition(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        store, inner, clock, _, _ = guarded()
        inner.down = True
        for _ in range(50):
            await fails(store)
            clock.now += 0.1
        inner.down = False
        clock.now += 1.0
        await store.probe()

    with caplog.at_level(logging.WARNING, logger="sidecar"):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "degraded mode" in lines[0] and "leaving degraded mode" in lines[1]


def test_value_errors_are_no_outage() -> None:
    async def main() -> None:
        store, _, _, changes, _ = guarded()
        for _ in range(3):
            with pytest.raises(ValueError):
                await store.release(LeaseRef("", "c", "id", None))
        assert changes == [] and not store.breaker.is_open

    asyncio.run(main())
