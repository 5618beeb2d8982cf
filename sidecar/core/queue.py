"""The deferral queue's order: priority bands, tenant fairness, then QoServe's hybrid key.

Rules:
- A waiter belongs to the band of its class rank; a better (lower) band is always served first.
- Within a band, tenants take turns by virtual token counters (VTC, OSDI'24): the backlogged
  tenant with the smallest counter goes next, and its counter grows by the work it was given.
  A tenant that was idle comes back at the smallest counter among the backlogged ones, so it
  cannot bank credit while idle, and a noisy tenant cannot starve the others.
- Within a tenant, the waiter with the smallest hybrid key goes first:
  `deadline_s + alpha_s_per_unit * work` (alpha = 0 is earliest-deadline-first).
- Each class has a bound on its waiters; a full class refuses new ones (the caller sheds).
- Pure and synchronous: the async holder around it owns the futures and the clock.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Waiter:
    waiter_id: int
    tenant: str
    klass: str
    rank: int  # the class's rank: its band
    deadline_s: float  # absolute time by which it must be admitted to still make its objective
    work: float  # estimated work units (e.g. tokens); also what VTC charges the tenant
    model: str = ""  # whose queue depth decides when it may go


@dataclass(slots=True)
class _Band:
    # tenant -> heap of (hybrid key, sequence, waiter)
    per_tenant: dict[str, list[tuple[float, int, Waiter]]] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)  # VTC per tenant (ever seen)


class DeferralQueue:
    def __init__(self, alpha_s_per_unit: float, max_waiters: Mapping[str, int]) -> None:
        self.alpha_s_per_unit = alpha_s_per_unit
        self.max_waiters = dict(max_waiters)
        self._bands: dict[int, _Band] = {}
        self._by_id: dict[int, Waiter] = {}
        self._per_class: dict[str, int] = {}
        self._per_rank: dict[int, int] = {}
        self._sequence = itertools.count()

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, waiter_id: object) -> bool:
        return waiter_id in self._by_id

    def waiting(self, klass: str) -> int:
        return self._per_class.get(klass, 0)

    def ahead_of(self, rank: int) -> int:
        """Waiters that would be served before a new arrival of band `rank` (same or better)."""
        return sum(n for band_rank, n in self._per_rank.items() if band_rank <= rank)

    def waiting_by_rank(self) -> dict[int, int]:
        """How many wait in each band (a copy: a value the admission core can keep)."""
        return {rank: n for rank, n in self._per_rank.items() if n}

    def push(self, waiter: Waiter) -> bool:
        """Queue `waiter`; False (and nothing queued) when its class is at its bound."""
        if self._per_class.get(waiter.klass, 0) >= self.max_waiters.get(waiter.klass, 0):
            return False
        band = self._bands.setdefault(waiter.rank, _Band())
        if waiter.tenant not in band.per_tenant:
            backlogged = [band.counters[t] for t in band.per_tenant]
            floor = min(backlogged) if backlogged else max(band.counters.values(), default=0.0)
            band.counters[waiter.tenant] = max(band.counters.get(waiter.tenant, 0.0), floor)
            band.per_tenant[waiter.tenant] = []
        key = waiter.deadline_s + self.alpha_s_per_unit * waiter.work
        heapq.heappush(band.per_tenant[waiter.tenant], (key, next(self._sequence), waiter))
        self._by_id[waiter.waiter_id] = waiter
        self._per_class[waiter.klass] = self._per_class.get(waiter.klass, 0) + 1
        self._per_rank[waiter.rank] = self._per_rank.get(waiter.rank, 0) + 1
        return True

    def peek(self) -> Waiter | None:
        """The waiter `pop` would return."""
        chosen = self._choose()
        return chosen[2] if chosen else None

    def pop(self) -> Waiter | None:
        """Remove and return the next waiter to admit, charging its tenant's counter."""
        chosen = self._choose()
        if chosen is None:
            return None
        band, tenant, waiter = chosen
        heapq.heappop(band.per_tenant[tenant])
        band.counters[tenant] += waiter.work
        self._forget(band, tenant, waiter)
        return waiter

    def remove(self, waiter_id: int) -> Waiter | None:
        """Take a waiter out (client gone, deadline passed); no counter is charged."""
        waiter = self._by_id.get(waiter_id)
        if waiter is None:
            return None
        band = self._bands[waiter.rank]
        heap = band.per_tenant[waiter.tenant]
        heap[:] = [entry for entry in heap if entry[2].waiter_id != waiter_id]
        heapq.heapify(heap)
        self._forget(band, waiter.tenant, waiter)
        return waiter

    def __iter__(self) -> Iterator[Waiter]:
        return iter(list(self._by_id.values()))

    def _choose(self) -> tuple[_Band, str, Waiter] | None:
        for rank in sorted(self._bands):
            band = self._bands[rank]
            if not band.per_tenant:
                continue
            tenant = min(
                band.per_tenant, key=lambda t: (band.counters[t], band.per_tenant[t][0][:2])
            )
            return band, tenant, band.per_tenant[tenant][0][2]
        return None

    def _forget(self, band: _Band, tenant: str, waiter: Waiter) -> None:
        del self._by_id[waiter.waiter_id]
        self._per_class[waiter.klass] -= 1
        self._per_rank[waiter.rank] -= 1
        if not band.per_tenant[tenant]:
            del band.per_tenant[tenant]
