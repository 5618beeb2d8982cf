"""The deferral queues' order: one queue per model; in each, priority bands, tenant fairness,
then QoServe's hybrid key.

Rules:
- Each model has its own queue (`HoldQueues`): whether a waiter may go depends on its model's
  room only, so a saturated model's waiters never stand in front of another model's.
- A waiter belongs to the band of its class rank; a better (lower) band is always served first.
- Within a band, tenants take turns by virtual token counters (VTC, OSDI'24): the backlogged
  tenant with the smallest counter goes next, and its counter grows by the work it was given
  divided by the tenant's `weight` (weighted VTC: while backlogged, tenants are given work in
  proportion to their weights; equal weights, the default, share equally).
  A tenant that was idle comes back at the smallest counter among the backlogged ones, so it
  cannot bank credit while idle, and a noisy tenant cannot starve the others.
- A tenant's counter in a band is ONE number across every model (`Fairness`, shared by the
  model queues): work given to a tenant on one model counts against its turns on the others,
  so spreading requests over models buys no extra share. "Backlogged" and "idle" are across
  models too: a tenant waiting on any model is not lifted when it queues for another.
- Within a tenant, the waiter with the smallest hybrid key goes first:
  `deadline_s + alpha_s_per_unit * work` (alpha = 0 is earliest-deadline-first)...
- ...until a waiter of the band EXPIRES (held its whole budget and was not let go). From then
  until the band is next empty, the band serves each tenant's NEWEST waiter first (adaptive
  LIFO, as in Facebook's "Fail at Scale"). An expiry proves the band's queue is standing:
  the model drains its class more slowly than it arrives, and oldest-first then makes every
  waiter wait nearly its whole budget, so that the ones admitted are late and a new arrival
  after the overload waits behind a backlog that only expiries clear (issue 12: batch shed
  for 6 s, and for over 90 s after a 45 s step, after the load fell back to 1x). Newest
  first, the ones admitted have most of their budget left and the old ones expire, which
  they would have done anyway. Tenants still take turns by their counters; only the order
  within a tenant changes. An empty band has nothing standing, so it starts oldest-first
  again. Nothing here is a threshold: the class's own `max_wait_ms` decides when a waiter
  expires. A hold its client's own wait cut short (core/client_wait.py) proves no such thing
  when it ends unserved, and leaves the band as a cancellation does: standard requests
  relegated into batch, held no longer than their 1.8 s clients wait, turned batch's band
  newest-first and pace-bound at once, and batch 503s at 3x went from none to 1,069 of 1,209.
- Each band keeps its PACE: when its waiters were let go since it was last empty (the last
  PACE_KEPT of them). Once the band stands (a waiter expired, as above), an arrival's
  predicted wait is never shorter than its band's pace gives for the waiters ahead of it
  there (`core.signals.BandPace`): the model may drain fast while better bands take all of
  it, and a lower band's arrival, judged on the model's drain alone, is held its whole budget
  and then shed (issue 12: batch held 5.5 s, then a 503 with Retry-After 1 s). At its band's
  pace it is shed at once, with that wait as its Retry-After. Before an expiry the pace is
  not used: a band busy for less than one budget has seen too little (a batch on the GPU
  lets nobody go for its whole run, then several at once).
- Each class has a bound on its waiters, counted over every model (the bound is on the
  sidecar's memory and on what it holds, not per model). An arrival at a full class
  DISPLACES one waiter of its class, which ends its hold as if its budget had passed (the
  caller relegates or sheds it): the earliest-deadline waiter of the tenant holding the most
  of the class in the arrival's model's queue (or, with none of the class there, in the
  model's queue holding the most of it). A tenant flooding the queue loses its own oldest,
  never another tenant's. Refusing the arrival instead kept a full queue's oldest waiters
  ahead of every new one: after a surge the class was shed for as long as the backlog took
  to drain, though each new arrival could still make its deadline (issue 12: batch 503s at
  1x for 9 s after the 3x step, every one "no room" with 256 held from the surge). The
  band's order stays as it was: a full queue bounds memory, it does not show that waiters
  miss (turning the band newest-first here, as an expiry does, let its pace shed batch
  arrivals at once in steady overload: a third less batch served at 3x in a paired run).
  With nothing of its class held anywhere (a bound of 0), the arrival is refused (the
  caller sheds it). So is a request RELEGATED into the class: it has already lost its own
  class, and its client waits by that class's deadline, not this one's; displacing the
  class's own work for it lost both (issue 12, ext_proc at 3x: standard requests relegated
  into a full batch queue timed out at their 1.8 s, 548 against 249, while the batch
  waiters they displaced could have made 18 s).
- Pure and synchronous: the async holder around it owns the futures and the clock.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from sidecar.core.fleet import CounterOp, Elsewhere
from sidecar.core.record import record
from sidecar.core.signals import BandPace

PACE_KEPT = 32  # a band's pace is read over its last let-gos, at most this many


@record
class Waiter:
    waiter_id: int
    tenant: str
    klass: str
    rank: int  # the class's rank: its band
    deadline_s: float  # absolute time by which it must be admitted to still make its objective
    work: float  # estimated work units (e.g. tokens); also what VTC charges the tenant
    model: str = ""  # whose queue it waits in, and whose room decides when it may go
    counted: bool = True  # its lease is written to the model's count once it goes
    client_cut: bool = False  # its deadline is its client's wait, before its class's budget
    weight: float = 1.0  # its tenant's weight: VTC charges it work / weight (module rules)

    @property
    def charge(self) -> float:
        """What its tenant's counter grows by when it is let go."""
        return self.work / self.weight


class Fairness:
    """The VTC counters of every band, and who is backlogged there, over all model queues.

    Shared (`shared=True`, the gateway topology): the counters are the fleet's (`core.fleet`).
    Each change is applied here at once and kept as an op for the next exchange (`take_ops`);
    `adopt` takes the fleet's counters and the tenants other replicas hold, and re-applies
    the ops taken after that exchange was sent, so nothing done meanwhile is lost."""

    def __init__(self, *, shared: bool = False) -> None:
        self._counters: dict[int, dict[str, float]] = {}  # rank -> tenant -> counter (ever seen)
        self._backlog: dict[int, dict[str, int]] = {}  # rank -> tenant -> waiters (any model)
        self._elsewhere: dict[int, set[str]] = {}  # rank -> tenants other replicas hold
        self._ops: list[CounterOp] | None = [] if shared else None
        self._work: dict[tuple[int, str], float] = {}  # mean work per waiter (moving)
        # Tenant -> a waiter's charge for a tenant not seen here (1 / its weight; absent: 1):
        # in a gateway tier, a tenant another replica alone holds (`core.fleet`).
        self.unseen_charge: Mapping[str, float] = {}

    def counter(self, rank: int, tenant: str) -> float:
        return self._counters.get(rank, {}).get(tenant, 0.0)

    def work_of(self, rank: int, tenant: str) -> float:
        """What each of `tenant`'s waiters in band `rank` adds to its counter (its work over its
        weight), a moving mean of those that arrived here; for a tenant never seen here, one
        unit of work over its weight (`unseen_charge`)."""
        seen = self._work.get((rank, tenant))
        return self.unseen_charge.get(tenant, 1.0) if seen is None else seen

    def arrive(self, rank: int, tenant: str, work: float | None = None) -> None:
        """A waiter of `tenant` joins band `rank` on some model. A tenant that was idle in the
        band (here and, shared, on every other replica) is lifted to the smallest counter
        among the backlogged (or, with none, to the largest ever seen): no credit banked
        while idle. `work`: what the waiter will be charged (`Waiter.charge`)."""
        counters = self._counters.setdefault(rank, {})
        backlog = self._backlog.setdefault(rank, {})
        elsewhere = self._elsewhere.get(rank, set())
        if tenant not in backlog and tenant not in elsewhere:
            backlogged = [counters.get(t, 0.0) for t in {*backlog, *elsewhere}]
            floor = min(backlogged) if backlogged else max(counters.values(), default=0.0)
            if floor > counters.get(tenant, 0.0):
                self._apply(("^", rank, tenant, floor))
        backlog[tenant] = backlog.get(tenant, 0) + 1
        if work is not None and work > 0:
            seen = self._work.get((rank, tenant))
            self._work[(rank, tenant)] = work if seen is None else seen + (work - seen) / 8

    def leave(self, rank: int, tenant: str, charged_work: float = 0.0) -> None:
        """A waiter left band `rank`: admitted (its tenant is charged its work) or removed."""
        if charged_work:
            self._apply(("+", rank, tenant, charged_work))
        backlog = self._backlog[rank]
        backlog[tenant] -= 1
        if not backlog[tenant]:
            del backlog[tenant]

    def take_ops(self) -> list[CounterOp]:
        """The changes since the last call, for the fleet's counters (none when not shared)."""
        if self._ops is None:
            return []
        ops, self._ops = self._ops, []
        return ops

    def restore_ops(self, ops: list[CounterOp]) -> None:
        """Ops `take_ops` gave that never reached the fleet: sent again with the next."""
        if self._ops is not None:
            self._ops[:0] = ops

    def adopt(
        self, counters: Mapping[tuple[int, str], float], elsewhere: Mapping[int, set[str]]
    ) -> None:
        """The fleet's counters, from an exchange that carried every op taken before it."""
        self._counters = {}
        for (rank, tenant), value in counters.items():
            self._counters.setdefault(rank, {})[tenant] = value
        self._elsewhere = {rank: set(tenants) for rank, tenants in elsewhere.items()}
        for op in self._ops or []:  # taken after the exchange was sent: not in it
            self._apply(op, record=False)

    def forget_elsewhere(self) -> None:
        """Nothing is known of other replicas' waiters any more."""
        self._elsewhere = {}

    def _apply(self, op: CounterOp, *, record: bool = True) -> None:
        kind, rank, tenant, value = op
        counters = self._counters.setdefault(rank, {})
        now = counters.get(tenant, 0.0)
        counters[tenant] = now + value if kind == "+" else max(now, value)
        if record and self._ops is not None:
            self._ops.append(op)


@record
class Pushed:
    """What `HoldQueues.push` did: queued the arrival, and the waiter it displaced."""

    queued: bool
    displaced: Waiter | None = None


@dataclass(slots=True)
class _Waiting:
    """One tenant's waiters in one band, in both orders. Entries of waiters that left stay
    in the heaps until they reach a top (lazy deletion: leaving is O(1))."""

    oldest: list[tuple[float, int, Waiter]] = field(default_factory=list)  # (key, seq, w)
    newest: list[tuple[int, Waiter]] = field(default_factory=list)  # (-seq, w)
    count: int = 0


@dataclass(slots=True)
class _Band:
    per_tenant: dict[str, _Waiting] = field(default_factory=dict)
    newest_first: bool = False  # a waiter expired since the band was last empty
    busy_since_s: float | None = None  # when it was last empty (None: no clock was given)
    let_go: deque[float] = field(default_factory=lambda: deque(maxlen=PACE_KEPT))

    def pace(self, now_s: float) -> BandPace | None:
        """How fast its waiters went since it was last empty; None until it stands (module
        rules)."""
        if not self.per_tenant or self.busy_since_s is None or not self.newest_first:
            return None
        if len(self.let_go) == PACE_KEPT:  # the last PACE_KEPT - 1 let-gos after the oldest
            return BandPace(PACE_KEPT - 1, now_s - self.let_go[0])
        return BandPace(len(self.let_go), now_s - self.busy_since_s)


class DeferralQueue:
    """One model's waiters (or, alone, any waiters). `fairness` is shared with the other
    models' queues; a queue made without one keeps its own."""

    def __init__(
        self,
        alpha_s_per_unit: float,
        max_waiters: Mapping[str, int],
        fairness: Fairness | None = None,
    ) -> None:
        self.alpha_s_per_unit = alpha_s_per_unit
        self.max_waiters = dict(max_waiters)
        self.fairness = fairness if fairness is not None else Fairness()
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

    def by_tenant(self) -> dict[int, dict[str, int]]:
        """Per band, per tenant, how many wait."""
        return {
            rank: {tenant: waiting.count for tenant, waiting in band.per_tenant.items()}
            for rank, band in self._bands.items()
            if band.per_tenant
        }

    def push(self, waiter: Waiter, now_s: float | None = None) -> bool:
        """Queue `waiter`; False (and nothing queued) when its class is at its bound. `now_s`:
        the clock, for its band's pace (without it the band has none)."""
        if self._per_class.get(waiter.klass, 0) >= self.max_waiters.get(waiter.klass, 0):
            return False
        band = self._bands.setdefault(waiter.rank, _Band())
        if not band.per_tenant:  # a busy period starts
            band.busy_since_s = now_s
        self.fairness.arrive(waiter.rank, waiter.tenant, waiter.charge)
        key = waiter.deadline_s + self.alpha_s_per_unit * waiter.work
        waiting = band.per_tenant.setdefault(waiter.tenant, _Waiting())
        sequence = next(self._sequence)
        heapq.heappush(waiting.oldest, (key, sequence, waiter))
        heapq.heappush(waiting.newest, (-sequence, waiter))
        waiting.count += 1
        self._by_id[waiter.waiter_id] = waiter
        self._per_class[waiter.klass] = self._per_class.get(waiter.klass, 0) + 1
        self._per_rank[waiter.rank] = self._per_rank.get(waiter.rank, 0) + 1
        return True

    def peek(self) -> Waiter | None:
        """The waiter `pop` would return."""
        chosen = self._choose()
        return chosen[2] if chosen else None

    def pop(self, now_s: float | None = None) -> Waiter | None:
        """Remove and return the next waiter to admit, charging its tenant's counter; `now_s`
        is when, for its band's pace."""
        chosen = self._choose()
        if chosen is None:
            return None
        band, _, waiter = chosen
        if now_s is not None:
            band.let_go.append(now_s)
        self._forget(band, waiter, charged_work=waiter.charge)
        return waiter

    def remove(self, waiter_id: int, *, expired: bool = False) -> Waiter | None:
        """Take a waiter out (client gone, or `expired`: its budget passed while it waited);
        no counter is charged. An expiry of its class's budget, not its client's, turns its
        band newest-first (module rules)."""
        waiter = self._by_id.get(waiter_id)
        if waiter is None:
            return None
        band = self._bands[waiter.rank]
        band.newest_first = band.newest_first or (expired and not waiter.client_cut)
        self._forget(band, waiter)
        return waiter

    def displaceable(self, klass: str, rank: int) -> Waiter | None:
        """The earliest-deadline waiter of `klass` of the tenant holding the most of them in
        band `rank` here (`HoldQueues.push`); None when none waits."""
        by_tenant: dict[str, list[Waiter]] = {}
        for waiter in self._by_id.values():
            if waiter.klass == klass and waiter.rank == rank:
                by_tenant.setdefault(waiter.tenant, []).append(waiter)
        if not by_tenant:
            return None
        most = max(by_tenant.values(), key=len)
        return min(most, key=lambda w: (w.deadline_s, w.waiter_id))

    def ahead_view(self) -> Elsewhere:
        """These waiters as `Elsewhere` sees waiters: who would go before a new arrival
        (`core.signals.Signals.here`), by the same counters, work and order as `pop`."""
        fairness = self.fairness
        return Elsewhere(
            self.by_tenant(), {}, fairness.counter, fairness.work_of, self.newest_first()
        )

    def paces(self, now_s: float) -> dict[int, BandPace]:
        """Each standing band, and how fast its waiters have been let go (module rules)."""
        found = {rank: band.pace(now_s) for rank, band in self._bands.items()}
        return {rank: pace for rank, pace in found.items() if pace is not None}

    def newest_first(self) -> frozenset[int]:
        """The bands that now serve each tenant's newest waiter first."""
        return frozenset(rank for rank, band in self._bands.items() if band.newest_first)

    def __iter__(self) -> Iterator[Waiter]:
        return iter(list(self._by_id.values()))

    def _choose(self) -> tuple[_Band, str, Waiter] | None:
        for rank in sorted(self._bands):
            band = self._bands[rank]
            if not band.per_tenant:
                continue
            heads = {
                t: self._head(waiting, band.newest_first) for t, waiting in band.per_tenant.items()
            }
            counter = self.fairness.counter
            tenant = min(heads, key=lambda t: (counter(rank, t), heads[t][0]))
            return band, tenant, heads[tenant][1]
        return None

    def _head(self, waiting: _Waiting, newest_first: bool) -> tuple[tuple[float, int], Waiter]:
        """A tenant's next waiter in the band's order, with its sort key among tenants of
        equal counters; the entries of waiters that left are dropped on the way."""
        if newest_first:
            while waiting.newest[0][1].waiter_id not in self._by_id:
                heapq.heappop(waiting.newest)
            negative_sequence, waiter = waiting.newest[0]
            return (0.0, negative_sequence), waiter
        while waiting.oldest[0][2].waiter_id not in self._by_id:
            heapq.heappop(waiting.oldest)
        key, sequence, waiter = waiting.oldest[0]
        return (key, sequence), waiter

    def _forget(self, band: _Band, waiter: Waiter, charged_work: float = 0.0) -> None:
        del self._by_id[waiter.waiter_id]
        self._per_class[waiter.klass] -= 1
        self._per_rank[waiter.rank] -= 1
        self.fairness.leave(waiter.rank, waiter.tenant, charged_work)
        waiting = band.per_tenant[waiter.tenant]
        waiting.count -= 1
        if max(len(waiting.oldest), len(waiting.newest)) > 2 * waiting.count + 16:  # bounded
            alive = self._by_id
            waiting.oldest = [e for e in waiting.oldest if e[2].waiter_id in alive]
            waiting.newest = [e for e in waiting.newest if e[1].waiter_id in alive]
            heapq.heapify(waiting.oldest)
            heapq.heapify(waiting.newest)
        if not waiting.count:
            del band.per_tenant[waiter.tenant]
            if not band.per_tenant:
                band.newest_first = False  # nothing standing: oldest first again
                band.busy_since_s = None  # and its pace starts again
                band.let_go.clear()


class HoldQueues:
    """Every model's `DeferralQueue`, sharing one `Fairness` and one bound per class.

    A model's queue exists while something waits in it (model names come from requests: an
    empty queue is dropped, its tenants' counters live on in `fairness`)."""

    def __init__(
        self, alpha_s_per_unit: float, max_waiters: Mapping[str, int], *, shared: bool = False
    ) -> None:
        self.alpha_s_per_unit = alpha_s_per_unit
        self.max_waiters = dict(max_waiters)
        self.fairness = Fairness(shared=shared)
        self._queues: dict[str, DeferralQueue] = {}
        self._model_of: dict[int, str] = {}  # waiter id -> its model
        self._per_class: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._model_of)

    def __contains__(self, waiter_id: object) -> bool:
        return waiter_id in self._model_of

    def waiting(self, klass: str) -> int:
        """The class's waiters over every model (what its bound counts)."""
        return self._per_class.get(klass, 0)

    def models(self) -> list[str]:
        """The models someone waits for, in a stable order."""
        return sorted(self._queues)

    def queue(self, model: str) -> DeferralQueue | None:
        return self._queues.get(model)

    def ahead_of(self, model: str, rank: int) -> int:
        """`model`'s waiters served before a new arrival of band `rank` for that model; a
        waiter for another model is never ahead of it."""
        queue = self._queues.get(model)
        return 0 if queue is None else queue.ahead_of(rank)

    def waiting_by_rank(self, model: str) -> dict[int, int]:
        queue = self._queues.get(model)
        return {} if queue is None else queue.waiting_by_rank()

    def summary(self) -> dict[str, dict[int, dict[str, int]]]:
        """Per model, per band, per tenant, how many wait (what `core.fleet` shares)."""
        return {model: queue.by_tenant() for model, queue in self._queues.items()}

    def push(self, waiter: Waiter, now_s: float | None = None, *, displace: bool = True) -> Pushed:
        """Queue `waiter` in its model's queue. At its class's bound (over every model), it
        displaces a waiter of its class (module rules), which is returned, already removed;
        with none to displace, or not `displace` (relegated into the class), nothing is
        queued. `now_s`: see `DeferralQueue.push`."""
        displaced = None
        if self.waiting(waiter.klass) >= self.max_waiters.get(waiter.klass, 0):
            displaced = self._displaceable(waiter) if displace else None
            if displaced is None:
                return Pushed(False)
            self.remove(displaced.waiter_id)
        queue = self._queues.get(waiter.model)
        if queue is None:
            queue = DeferralQueue(self.alpha_s_per_unit, {}, self.fairness)
            self._queues[waiter.model] = queue
        queue.max_waiters = self.max_waiters  # never the binding bound: the total is
        queue.push(waiter, now_s)
        self._model_of[waiter.waiter_id] = waiter.model
        self._per_class[waiter.klass] = self.waiting(waiter.klass) + 1
        return Pushed(True, displaced)

    def _displaceable(self, arrival: Waiter) -> Waiter | None:
        """The waiter a full class's `arrival` displaces (module rules), or None."""
        here = self._queues.get(arrival.model)
        found = None if here is None else here.displaceable(arrival.klass, arrival.rank)
        if found is not None:
            return found
        held = [q for q in self._queues.values() if q.waiting(arrival.klass)]
        most = max(held, key=lambda q: q.waiting(arrival.klass), default=None)
        return None if most is None else most.displaceable(arrival.klass, arrival.rank)

    def pop(self, model: str, now_s: float | None = None) -> Waiter | None:
        """The next waiter of `model`'s queue, charged to its tenant (see DeferralQueue)."""
        queue = self._queues.get(model)
        waiter = None if queue is None else queue.pop(now_s)
        if waiter is not None:
            self._forget(waiter)
        return waiter

    def remove(self, waiter_id: int, *, expired: bool = False) -> Waiter | None:
        """Take a waiter out of whichever queue it is in; no counter is charged. `expired`:
        see `DeferralQueue.remove`."""
        model = self._model_of.get(waiter_id)
        if model is None:
            return None
        waiter = self._queues[model].remove(waiter_id, expired=expired)
        if waiter is not None:
            self._forget(waiter)
        return waiter

    def _forget(self, waiter: Waiter) -> None:
        del self._model_of[waiter.waiter_id]
        self._per_class[waiter.klass] -= 1
        if not self._queues[waiter.model]:
            del self._queues[waiter.model]
