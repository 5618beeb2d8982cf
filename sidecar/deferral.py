"""Holding deferred requests: the async side of the deferral queue.

The order is the pure `HoldQueues`: one queue per model (bands, tenant fairness with counters
shared across the models, hybrid key); whether a model's head may go is the pure
`core.signals.may_go`, on that model's signals. This module owns the futures the held Envoy calls
wait on, and what this replica knows of each model between two reads of the shared state
(`model_signals`): the requests it let go since the last scrape (the scrape has not seen them
yet), less the ones that ended since (each end is a batch's row done, so the queue moved on by
one: a queue depth that counted only what went grew through every scrape interval, by about
17 at 70 let go a second, and held or shed arrivals at a queue Triton had emptied), and the
model's requests in flight (the store's count at the last refresh, plus what
this replica admitted and minus what it saw end since). `pump()` runs after every load scrape,
in-flight refresh and completion.

A held call ends in one of four ways: admitted (LET_GO), its deadline passed (EXPIRED; the
queue hears of the expiry, which turns its band newest-first), an arrival displaced it from
its class's full queue (DISPLACED), or it was cancelled because Envoy or the client gave up
(the waiter leaves the queue at once and the cancellation propagates).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable

from sidecar.core import lateness
from sidecar.core.admission import HoldOutcome
from sidecar.core.experience import CompletionTimings, SloResult, slo_result
from sidecar.core.fleet import NOBODY, Elsewhere, backlogged, merge_summaries
from sidecar.core.in_flight import InFlightCounts
from sidecar.core.lateness import Lateness
from sidecar.core.load import LoadView
from sidecar.core.protect import Protection, shares_for
from sidecar.core.queue import HoldQueues, Waiter
from sidecar.core.signals import ModelSignals, Signals, cap_of, may_go
from sidecar.core.types import Decision, Reason
from sidecar.core.upstream import UpstreamTimes
from sidecar.policy.model import ClassPolicy, Policy


class Deferrer:
    def __init__(
        self,
        policy: Callable[[], Policy],
        load: Callable[[], LoadView],
        *,
        stale_after_s: float,
        alpha_s_per_unit: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        shared: bool = False,
    ) -> None:
        self._policy = policy
        self._load = load
        self.stale_after_s = stale_after_s
        self.clock = clock
        self.queue = HoldQueues(alpha_s_per_unit, self._bounds(), shared=shared)
        # Gateway topology (`shared`): other replicas' waiters, per model, as of the last
        # exchange (`core.fleet`).
        self.shared = shared
        self._first: dict[str, dict[int, dict[str, int]]] = {}  # replicas that win ties
        self._after: dict[str, dict[int, dict[str, int]]] = {}
        self._futures: dict[int, asyncio.Future[HoldOutcome]] = {}
        # Per model, let go less ended since the last scrape (what the scrape has not seen).
        self._since_scrape: dict[str, int] = {}
        self.in_flight_counts = InFlightCounts()  # the store's, plus what happened here since
        self.on_ended: Callable[[str], None] | None = None  # told of each request's end
        self.protection = Protection()  # adaptive caps (`overload.protect`)
        self.upstream = UpstreamTimes()  # each class's time in Triton: its hold budget
        self.lateness = Lateness()  # depths its requests sent at once end late from
        self.limits_published: dict[str, set[str]] = {}  # model -> classes in the metric
        self._shares_of: tuple[Policy | None, dict[str, dict[str, float]]] = (None, {})
        self._charges_of: tuple[Policy | None, dict[str, float]] = (None, {})
        self._ids = itertools.count(1)

    def _bounds(self) -> dict[str, int]:
        return {name: c.max_queued for name, c in self._policy().classes.items()}

    def in_flight(self, model: str) -> int | None:
        """The model's requests in flight, as far as this replica knows; None when nobody
        said (the cap is then not applied). See `core.in_flight`."""
        return self.in_flight_counts.of(model)

    def set_in_flight(self, counts: dict[str, int], started: int | None = None) -> None:
        """The store's counts per model, from the read `in_flight_counts.read_starts()` gave
        `started` for (None: a read that saw every write confirmed so far)."""
        if started is None:
            started = self.in_flight_counts.read_starts()
        self.in_flight_counts.read(counts, started)
        self.pump()

    def note_ended(self, model: str, sent: int | None = None) -> None:
        """A request of `model` ended (its lease was released here, by a release sent when
        `in_flight_counts.release_starts()` gave `sent`)."""
        self.in_flight_counts.ended(model, sent)
        self._since_scrape[model] = self._since_scrape.get(model, 0) - 1

    async def hold(
        self,
        tenant: str,
        klass: str,
        rank: int,
        model: str,
        work: float,
        deadline_s: float,
        *,
        counted: bool = True,
        displace: bool = True,
        client_cut: bool = False,
        weight: float = 1.0,
    ) -> HoldOutcome:
        """Wait until admitted (LET_GO) or `deadline_s` (this clock) passes (EXPIRED). At its
        class's bound it displaces a waiter of the class, whose hold then ends DISPLACED (or,
        with none to displace or not `displace`, answers EXPIRED at once; `HoldQueues.push`).
        `client_cut`: its client's wait, not its class's budget, set `deadline_s` (core/queue.py
        reads its expiry accordingly). `weight`: its tenant's, for the tenants' turns."""
        self.queue.max_waiters = self._bounds()  # follow policy reloads
        waiter = Waiter(
            next(self._ids),
            tenant,
            klass,
            rank,
            deadline_s,
            work,
            model,
            counted,
            client_cut,
            weight,
        )
        pushed = self.queue.push(waiter, self.clock(), displace=displace)
        displaced = (
            None if pushed.displaced is None else self._futures.get(pushed.displaced.waiter_id)
        )
        if displaced is not None and not displaced.done():
            displaced.set_result(HoldOutcome.DISPLACED)
        if not pushed.queued:
            return HoldOutcome.EXPIRED
        future: asyncio.Future[HoldOutcome] = asyncio.get_running_loop().create_future()
        self._futures[waiter.waiter_id] = future
        self.pump()
        try:
            return await asyncio.wait_for(future, timeout=max(0.0, deadline_s - self.clock()))
        except TimeoutError:
            self.queue.remove(waiter.waiter_id, expired=True)  # its band may turn newest-first
            return HoldOutcome.EXPIRED
        finally:
            # Admitted, expired or cancelled (client gone): it leaves the queue now.
            self.queue.remove(waiter.waiter_id)
            self._futures.pop(waiter.waiter_id, None)

    def note_admitted(
        self, model: str, written: bool = True, decision: Decision | None = None
    ) -> None:
        """A request went to Triton: count it until the next scrape and read see it. Not
        `written`: its model entry is still to be written (`note_written` follows). Sent at
        once with a lease (`decision`), of a class the load may shed: its depth is noted for
        its end (core/lateness.py)."""
        lease = None if decision is None else decision.lease
        if lease is not None and decision is not None and decision.reason is Reason.ADMITTED:
            klass = self._policy().classes.get(lease.klass)
            if klass is not None and lateness.applies(klass):
                depth = self._depth(self._load(), model)
                self.lateness.sent(lease.lease_id, model, lease.klass, depth, self.clock())
        self._since_scrape[model] = self._since_scrape.get(model, 0) + 1
        self.in_flight_counts.admitted(model, written=written)

    def note_written(self, model: str) -> None:
        """The model entry of an admit noted as not written is now in the store."""
        self.in_flight_counts.written(model)

    def on_scrape(self) -> None:
        """A fresh load view arrived: it counts everything released so far."""
        self._since_scrape.clear()
        self.pump()

    def model_signals(self, model: str, view: LoadView, now: float) -> ModelSignals:
        """`model`'s load as this replica knows it now (see the module comment)."""
        policy = self._policy()
        shares = self._shares(policy, model)
        caps = self.protection.caps(model, policy.classes.values(), shares, now) if shares else {}
        return ModelSignals(
            view.state_of(model, now, self.stale_after_s),
            self._depth(view, model),
            view.completions_per_s(model),
            self.in_flight(model),
            caps,
            self.upstream.of(model),
            self.lateness.enforced(model, now),
        )

    def _depth(self, view: LoadView, model: str) -> int:
        """`model`'s queue depth as an arrival reads it (`ModelSignals.queue_depth`), and as
        the lateness limit notes a request sent at once: Triton's, plus what went since, less
        what ended since (a batch that ends takes the next rows off the queue)."""
        return max(0, view.queue_depth(model) + self._since_scrape.get(model, 0))

    def _shares(self, policy: Policy, model: str) -> dict[str, float]:
        """`shares_for`, worked out once per policy and model (this runs per decision)."""
        if self._shares_of[0] is not policy:
            self._shares_of = (policy, {})
        known = self._shares_of[1]
        if model not in known:
            if len(known) >= 1024:  # model names come from requests: bounded
                known.clear()
            known[model] = shares_for(policy, model)
        return known[model]

    def adaptive_caps(self, model: str) -> dict[str, tuple[int, bool]]:
        """Each protected class's learnt cap on `model`, and whether it binds now."""
        binding = self.model_signals(model, self._load(), self.clock()).caps
        return {
            klass: (cap, binding.get(klass) is not None)
            for klass, cap in self.protection.learnt(model).items()
        }

    def arrived(self, klass: ClassPolicy, model: str | None, signals: Signals) -> None:
        """A request of `klass` for `model` arrived, judged on `signals`: what adaptive caps
        learn from arrivals (core/protect.py rules 1 and 2)."""
        seen = signals.model  # a class with no overload block is protected all the same
        if model is None or seen is None:
            return
        cap = cap_of(klass, seen.caps)
        self.protection.arrived(model, klass, seen.in_flight, cap, self.clock())

    def at_room(self, klass: ClassPolicy, model: str | None, signals: Signals) -> None:
        """A request of `klass` for `model`, its quota taken, is judged for room on `signals`:
        whether its class's cap held it back (core/protect.py `at_cap`)."""
        if model is not None and signals.model is not None:
            self._at_cap(klass, model, signals.model)

    def _at_cap(self, klass: ClassPolicy | None, model: str, seen: ModelSignals) -> None:
        if klass is not None:
            self.protection.at_cap(model, klass, seen.in_flight, cap_of(klass, seen.caps))

    def completed(
        self, model: str, klass: str, timings: CompletionTimings, lease_id: str | None = None
    ) -> None:
        """A request of `klass` for `model` ended, as Envoy measured it: its whole duration
        (core/protect.py rule 2, core/lateness.py), its time upstream (core/upstream.py).
        `on_ended` is told (the nudger: a batch of the model may have just ended)."""
        if self.on_ended is not None:
            self.on_ended(model)
        if timings.upstream_s is not None:
            self.upstream.took(model, klass, timings.upstream_s)
        policy = self._policy().classes.get(klass)
        if policy is None:
            return
        if lease_id is not None and lateness.applies(policy):  # only those are noted
            result = slo_result(timings, policy.latency_objective_ms)
            late = None if result is None else result is not SloResult.MET
            objective_s = policy.latency_objective_ms / 1000
            self.lateness.ended(lease_id, late, self.clock(), objective_s)
        if timings.duration_s is not None:
            self.protection.completed(model, policy, timings.duration_s, self.clock())

    def elsewhere(self, model: str) -> Elsewhere:
        """Other replicas' waiters for `model`, ordered by the fleet's counters."""
        first, after = self._first.get(model), self._after.get(model)
        if not first and not after:
            return NOBODY
        fairness = self.queue.fairness
        return Elsewhere(first or {}, after or {}, fairness.counter, fairness.work_of)

    def adopt_fleet(
        self, me: str, others: list[tuple[str, str]], counters: dict[tuple[int, str], float]
    ) -> None:
        """An exchange's answer, (replica id, summary) of the others (see `core.fleet`):
        then let go whoever it gives room to."""
        self._first = merge_summaries([text for replica, text in others if replica < me])
        self._after = merge_summaries([text for replica, text in others if replica > me])
        held = backlogged(merge_summaries([text for _, text in others]))
        self.queue.fairness.adopt(counters, held)
        self.queue.fairness.unseen_charge = self._unseen_charges()
        self.pump()

    def _unseen_charges(self) -> dict[str, float]:
        """Per tenant of weight other than 1, the charge of one unit of work (1 / weight), for
        tenants other replicas hold and this one has not seen; kept per policy snapshot."""
        policy = self._policy()
        if self._charges_of[0] is not policy:
            tenants = policy.tenants.values()
            charges = {t.name: 1.0 / t.weight for t in tenants if t.weight != 1.0}
            self._charges_of = (policy, charges)
        return self._charges_of[1]

    def fleet_busy(self) -> bool:
        """Does this replica, or any other as last seen, hold a request?"""
        return len(self.queue) > 0 or bool(self._first) or bool(self._after)

    def forget_fleet(self) -> None:
        """The store cannot say what the other replicas hold: order only this one's (the
        fairness counters stay as last read)."""
        self._first, self._after = {}, {}
        self.queue.fairness.forget_elsewhere()
        self.pump()

    def signals(self, model: str | None) -> Signals:
        """What an admission decision for `model` sees now (None: a request for no model)."""
        if model is None:
            return Signals(None)  # a request for no model is never held, nor waits behind any
        view, now = self._load(), self.clock()
        model_signals = self.model_signals(model, view, now)
        served = view.served_models(now, self.stale_after_s)
        # Only this model's waiters: another model's are not ahead of it (own queue, own room).
        queue = self.queue.queue(model)
        here = None if queue is None else queue.ahead_view()
        paces = {} if queue is None else queue.paces(now)
        return Signals(
            model_signals,
            self.queue.waiting_by_rank(model),
            served,
            self.elsewhere(model),
            here,
            paces,
        )

    def pump(self) -> int:
        """Release waiters from the head of every model's queue while the core says they may
        go; returns how many. Head-of-line within a model: when its head may not go, nobody
        behind it on that model does (a better band or fairer tenant goes first), but the
        other models' queues are walked all the same."""
        policy, view, now = self._policy(), self._load(), self.clock()
        released = 0
        for model in self.queue.models():
            queue, elsewhere = self.queue.queue(model), self.elsewhere(model)
            while queue is not None and (waiter := queue.peek()) is not None:
                signals = self.model_signals(model, view, now)
                reserved = elsewhere.ahead_of(waiter.rank, waiter.tenant)
                klass = policy.classes.get(waiter.klass)
                if not may_go(klass, signals, reserved):
                    self._at_cap(klass, model, signals)
                    break
                self.queue.pop(model, now)
                future = self._futures.get(waiter.waiter_id)
                if future is not None and not future.done():
                    future.set_result(HoldOutcome.LET_GO)
                    # The service writes its model entry, if the policy counts models.
                    self.note_admitted(model, written=not waiter.counted)
                    released += 1
                queue = self.queue.queue(model)  # dropped once empty
        return released
