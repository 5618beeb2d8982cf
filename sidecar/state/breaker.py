"""`CircuitBreaker` and `GuardedStore`: fail fast while the quota store is down.

Rules:
- Closed (normal): every call goes to the store. `failures_to_open` consecutive failed calls
  (StateUnavailable: a timeout, a refused connection, a server error) open the circuit. Two,
  not one: a single lost connection (a restart the pool has not seen yet) is not an outage.
- Open (degraded): calls raise StateUnavailable at once, without waiting the store's timeout,
  so a dead Redis costs a decision microseconds instead of `--redis-timeout-ms` each. No
  request's call is ever the probe (a probe that waited the timeout would be a decision that
  took it): every `probe_interval_s` the app's background loop calls `GuardedStore.probe()`,
  a PING (half-open). A probe that succeeds closes the circuit; one that fails keeps it open
  until the next. Once closed, the next failing calls open it again (on a cluster, slots
  whose primary is not promoted yet).
- Each transition is logged once (one line when it opens, one when it closes, with how long
  it was open), never once per failed call, and reported through `on_change(degraded)`; the
  time spent open is reported through `on_degraded_s(seconds)`, as it passes (`accrue()`,
  called by the background loop) and at the close.
- `GuardedStore` puts one breaker in front of any `QuotaStore`. A call that never raises
  StateUnavailable (`count_for_model`) and `close` go straight through. ValueError (a bad
  argument, not an outage) counts as neither success nor failure.
- The clock is injected: tests move time instead of sleeping.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from sidecar.core.fleet import CounterOp
from sidecar.core.types import BucketCheck, LeaseRef, QuotaCheck, QuotaResult
from sidecar.errors import StateUnavailable
from sidecar.state.base import DEFAULT_TOMBSTONE_S, FleetState, QuotaStore

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_FAILURES_TO_OPEN = 2


class CircuitOpen(StateUnavailable):
    """Refused without calling the store: nothing was sent, so nothing needs undoing."""


DEFAULT_PROBE_INTERVAL_S = 0.5


class CircuitBreaker:
    def __init__(
        self,
        *,
        failures_to_open: int = DEFAULT_FAILURES_TO_OPEN,
        probe_interval_s: float = DEFAULT_PROBE_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[bool], None] | None = None,
        on_degraded_s: Callable[[float], None] | None = None,
    ) -> None:
        if failures_to_open < 1:
            raise ValueError(f"failures_to_open must be >= 1, not {failures_to_open}")
        self.failures_to_open = failures_to_open
        self.probe_interval_s = probe_interval_s
        self._clock = clock
        self._on_change = on_change
        self._on_degraded_s = on_degraded_s
        self._failures = 0
        self._opened_s: float | None = None  # when it opened; None: closed
        self._accrued_s = 0.0  # when degraded time was last reported
        self._next_probe_s = 0.0
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._opened_s is not None

    def allow(self) -> bool:
        """May a request's call go to the store now? Only while closed; the caller then
        reports `succeeded()` or `failed()`."""
        return self._opened_s is None

    def probe_due(self) -> bool:
        """Is a probe due now (open, the interval passed, none running)? True claims it: the
        caller probes and reports `succeeded()`, `failed()` or `abandoned()`."""
        if self._opened_s is None or self._probing or self._clock() < self._next_probe_s:
            return False
        self._probing = True
        return True

    def succeeded(self) -> None:
        self._failures = 0
        self._probing = False
        if self._opened_s is not None:
            now = self._clock()
            self.accrue()
            log.warning(
                "quota store answers again: leaving degraded mode after %.1f s",
                now - self._opened_s,
            )
            self._opened_s = None
            if self._on_change is not None:
                self._on_change(False)

    def failed(self, error: BaseException) -> None:
        self._probing = False
        self._failures += 1
        now = self._clock()
        if self._opened_s is not None:
            self._next_probe_s = now + self.probe_interval_s
            return
        if self._failures >= self.failures_to_open:
            self._opened_s = self._accrued_s = now
            self._next_probe_s = now + self.probe_interval_s
            log.warning(
                "quota store unavailable (%d failed calls, latest: %s): degraded mode, calls "
                "fail fast, one probe every %.1f s",
                self._failures,
                error,
                self.probe_interval_s,
            )
            if self._on_change is not None:
                self._on_change(True)

    def abandoned(self) -> None:
        """A let-through call ended without an answer either way (cancelled)."""
        self._probing = False

    def accrue(self) -> None:
        """Report the degraded time since the last report (nothing when closed)."""
        if self._opened_s is None:
            return
        now = self._clock()
        if self._on_degraded_s is not None and now > self._accrued_s:
            self._on_degraded_s(now - self._accrued_s)
        self._accrued_s = now

    async def call(self, operation: str, run: Callable[[], Awaitable[T]]) -> T:
        """Run `run()` through the breaker. Raises StateUnavailable at once while open."""
        if not self.allow():
            raise CircuitOpen(f"redis {operation}: circuit open (store unavailable)")
        try:
            result = await run()
        except StateUnavailable as exc:
            self.failed(exc)
            raise
        except BaseException:  # ValueError (a bad argument) or cancelled: no answer either way
            self.abandoned()
            raise
        self.succeeded()
        return result


class GuardedStore:
    """`inner`, behind `breaker` (see module rules)."""

    def __init__(self, inner: QuotaStore, breaker: CircuitBreaker) -> None:
        self.inner = inner
        self.breaker = breaker

    async def probe(self) -> None:
        """If a probe is due, PING the store and close the circuit if it answers."""
        if not self.breaker.probe_due():
            return
        try:
            await self.inner.ping()
        except StateUnavailable as exc:
            self.breaker.failed(exc)
        except BaseException:
            self.breaker.abandoned()
            raise
        else:
            self.breaker.succeeded()

    async def acquire(self, check: QuotaCheck) -> QuotaResult:
        return await self.breaker.call("acquire", lambda: self.inner.acquire(check))

    async def peek(self, check: QuotaCheck) -> QuotaResult:
        return await self.breaker.call("peek", lambda: self.inner.peek(check))

    async def take_buckets(self, check: QuotaCheck) -> QuotaResult:
        return await self.breaker.call("take_buckets", lambda: self.inner.take_buckets(check))

    async def release(self, lease: LeaseRef, *, tombstone_s: float = DEFAULT_TOMBSTONE_S) -> bool:
        return await self.breaker.call(
            "release", lambda: self.inner.release(lease, tombstone_s=tombstone_s)
        )

    async def renew(self, tenant: str, leases: Sequence[LeaseRef], ttl_s: float) -> set[str]:
        return await self.breaker.call("renew", lambda: self.inner.renew(tenant, leases, ttl_s))

    async def charge(self, tenant: str, buckets: Sequence[BucketCheck]) -> None:
        await self.breaker.call("charge", lambda: self.inner.charge(tenant, buckets))

    async def count_for_model(self, lease: LeaseRef, ttl_s: float) -> None:
        await self.inner.count_for_model(lease, ttl_s)

    async def count_for_model_many(self, leases: Sequence[LeaseRef], ttl_s: float) -> None:
        await self.inner.count_for_model_many(leases, ttl_s)

    async def in_flight(self, tenant: str, klass: str | None) -> int:
        return await self.breaker.call("in_flight", lambda: self.inner.in_flight(tenant, klass))

    async def model_in_flight(self, model: str, pod: str | None = None) -> int:
        return await self.breaker.call(
            "model_in_flight", lambda: self.inner.model_in_flight(model, pod)
        )

    async def in_flight_many(
        self, pairs: Sequence[tuple[str, str | None]]
    ) -> dict[tuple[str, str | None], int]:
        return await self.breaker.call("in_flight", lambda: self.inner.in_flight_many(pairs))

    async def model_in_flight_many(
        self, models: Sequence[str], pod: str | None = None
    ) -> dict[str, int]:
        return await self.breaker.call(
            "model_in_flight", lambda: self.inner.model_in_flight_many(models, pod)
        )

    async def heartbeat(self, replica: str, ttl_s: float) -> int:
        return await self.breaker.call("heartbeat", lambda: self.inner.heartbeat(replica, ttl_s))

    async def acquire_many(self, checks: Sequence[QuotaCheck]) -> list[QuotaResult | None]:
        return await self.breaker.call("acquire_many", lambda: self.inner.acquire_many(checks))

    async def release_many(
        self, leases: Sequence[LeaseRef], *, tombstone_s: float = DEFAULT_TOMBSTONE_S
    ) -> list[bool | None]:
        return await self.breaker.call(
            "release_many", lambda: self.inner.release_many(leases, tombstone_s=tombstone_s)
        )

    async def fleet_exchange(
        self, replica: str, ttl_s: float, summary: str, ops: Sequence[CounterOp]
    ) -> FleetState:
        return await self.breaker.call(
            "fleet", lambda: self.inner.fleet_exchange(replica, ttl_s, summary, ops)
        )

    async def ping(self) -> None:
        await self.breaker.call("ping", self.inner.ping)

    async def close(self) -> None:
        await self.inner.close()
