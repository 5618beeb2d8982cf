"""`LeaseKeeper`: the leases this replica took and still runs, and the releases it owes.

Rules:
- A lease counts in the store only while it is renewed: its TTL (`lease_ttl_s`, short) is
  the longest a slot stays taken after its owner forgot it (a sidecar restart loses every
  completion Envoy sent meanwhile, and the memory of what was running). So the replica that
  took a lease renews it every `lease_ttl_s / 3` while it knows the request is running
  (admitted, not yet released), one store call per tenant (plus one per model). A lease the
  store says is gone (released through another replica, or expired) is forgotten, never
  brought back. A lease is renewed for at most `max_renew_s` after it was taken: a
  completion lost while its owner stays up (a dropped access-log entry) costs a slot for at
  most that long plus one TTL.
- A release is owed for every request whose lease may exist: one whose release failed, and
  one whose acquire failed or timed out (the store may still run it late: the release leaves
  a tombstone that makes such a late acquire take nothing, see `sidecar.state.base`). Owed
  releases are retried by `run` with backoff until the store takes them, never dropped while
  there is room; the backlog is bounded (`max_backlog`), and a release that finds it full is
  counted in `qos_release_backlog_dropped_total` (its lease then lives one TTL).
- Nothing here decides: the service says what was admitted and what ended, and releases
  through the callable it gives (which keeps its metrics and wakes held requests).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sidecar.core.types import LeaseRef
from sidecar.errors import StateUnavailable
from sidecar.metrics import Metrics
from sidecar.state.base import QuotaStore

log = logging.getLogger(__name__)

DEFAULT_MAX_BACKLOG = 100_000
DEFAULT_MAX_RENEW_S = 900.0
# Retries of owed releases: the first soon, then doubling while the store stays down.
RETRY_FIRST_S = 0.1
RETRY_MAX_S = 2.0


@dataclass(slots=True)
class _Running:
    lease: LeaseRef
    taken_s: float


class LeaseKeeper:
    """`release(lease)` frees a lease in the store (raises StateUnavailable); `ttl_s()` is the
    current policy's lease TTL."""

    def __init__(
        self,
        store: QuotaStore,
        metrics: Metrics,
        release: Callable[[LeaseRef], Awaitable[bool]],
        ttl_s: Callable[[], float],
        *,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
        max_renew_s: float = DEFAULT_MAX_RENEW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._release = release
        self._ttl_s = ttl_s
        self._max_backlog = max_backlog
        self._max_renew_s = max_renew_s
        self._clock = clock
        self._running: dict[str, _Running] = {}
        self._owed: dict[str, LeaseRef] = {}  # by lease id: owing one twice is one release
        self._wake = asyncio.Event()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def backlog(self) -> int:
        return len(self._owed)

    def running_by_class(self) -> Counter[tuple[str, str]]:
        """The running leases this replica took, per (tenant, class)."""
        return Counter((r.lease.tenant, r.lease.klass) for r in self._running.values())

    def taken(self, lease: LeaseRef) -> None:
        """A lease this replica took: renew it until `ended`."""
        self._running[lease.lease_id] = _Running(lease, self._clock())

    def ended(self, lease: LeaseRef) -> None:
        """The lease's request ended (its release is under way): stop renewing it."""
        self._running.pop(lease.lease_id, None)

    def owe(self, lease: LeaseRef) -> None:
        """Release `lease` later, retrying until the store takes it."""
        self.ended(lease)
        if lease.lease_id not in self._owed and len(self._owed) >= self._max_backlog:
            self._metrics.release_backlog_dropped.inc()
            return
        self._owed[lease.lease_id] = lease
        self._metrics.release_backlog.set(len(self._owed))
        self._wake.set()

    async def drain(self) -> bool:
        """Try every owed release once, all together (they share store calls: see
        `sidecar.releases`). False if the store failed any (those wait for the next try)."""
        owed = list(self._owed.items())
        results = await asyncio.gather(
            *(self._release(lease) for _, lease in owed), return_exceptions=True
        )
        ok = True
        for (lease_id, _), result in zip(owed, results, strict=True):
            if isinstance(result, StateUnavailable):
                ok = False
            elif isinstance(result, BaseException):
                raise result
            else:
                self._owed.pop(lease_id, None)
        self._metrics.release_backlog.set(len(self._owed))
        return ok

    async def renew(self) -> None:
        """Renew every running lease, one store call per tenant; forget the gone ones."""
        ttl_s, now = self._ttl_s(), self._clock()
        by_tenant: dict[str, list[LeaseRef]] = {}
        for lease_id, running in list(self._running.items()):
            if now - running.taken_s > self._max_renew_s:
                del self._running[lease_id]  # its completion was lost: let the TTL end it
                continue
            by_tenant.setdefault(running.lease.tenant, []).append(running.lease)
        for tenant, leases in by_tenant.items():
            try:
                held = await self._store.renew(tenant, leases, ttl_s)
            except StateUnavailable:
                self._metrics.state_errors.labels("renew").inc()
                continue  # the next round tries again, within the TTL
            for lease in leases:
                if lease.lease_id not in held:
                    self._running.pop(lease.lease_id, None)
        self._metrics.leases_renewing.set(len(self._running))

    async def run(self) -> None:
        """Until cancelled: retry owed releases (with backoff while the store is down) and
        renew running leases every TTL / 3."""
        retry_s, failing = RETRY_FIRST_S, False
        next_renew = self._clock() + self._ttl_s() / 3
        while True:
            wait_s = max(0.0, min(next_renew - self._clock(), 1.0))
            if failing:
                # Backoff: new debts do not wake a retry against a store that is down.
                await asyncio.sleep(min(retry_s, wait_s) if wait_s else retry_s)
            else:
                try:
                    async with asyncio.timeout(wait_s):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            self._wake.clear()
            try:
                if self._owed:
                    failing = not await self.drain()
                    retry_s = min(retry_s * 2, RETRY_MAX_S) if failing else RETRY_FIRST_S
                if self._clock() >= next_renew:
                    next_renew = self._clock() + self._ttl_s() / 3
                    await self.renew()
            except Exception:  # never let one bad round end renewals for good
                log.exception("lease keeper round failed")
