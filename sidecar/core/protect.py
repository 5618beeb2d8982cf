"""Adaptive protection: how many of a model's requests a lower class may have in flight.

A fixed `max_in_flight` is right for one workload only: too high and a better class waits
behind long batches of lower work, too low and the GPU runs half-empty batches while a lower
class with a long deadline is shed (issue 12: 70% of batch work shed at 2x, a third of the
SLO-met throughput of Triton's priority alone). A class with `overload.protect` instead gets a
cap that the sidecar finds from what it observes, per model:

1. Presence. The cap binds only while better-ranked work for the model is present or
   expected: a better-ranked request arrived within the last `horizon` (PRESENCE_GAPS times
   the mean gap between their arrivals, and at least one of their objectives). Otherwise the
   class is not capped at all: lower classes get full batches while nobody needs protecting.
2. Outcome. The cap follows the latency that better-ranked requests of the model get (Envoy's
   duration of the request, hold included, from the access log), as a share of their class's
   `latency_objective_ms`. A period lasts at least the shortest objective among them (about
   how long an admission takes to show in their latencies) and until MIN_SAMPLES of them have
   completed (or MAX_PERIODS objectives have passed, or sooner once more of them are over the
   target than MIN_SAMPLES could hold under it: the outcome is known, and waiting for the rest
   only leaves the cap too high for longer); it ends with one step on the QUANTILE (nearest
   rank: of 20 shares the 19th, not the largest, which would track a 98th percentile) of
   their shares, taken per better class (the worst of them decides: a class far inside its
   objective must not dilute one near it; batch watching interactive and standard once grew
   its cap to 13 while standard's, watching interactive alone, fell to 3):
   - above the preset's TARGET: the cap is multiplied by DECREASE (at least the floor);
   - else, if the cap held a request of the class back in the period (it found the model's
     in-flight count at the cap: on arrival, once its quota was taken, or waiting at the head
     of the model's queue; `at_cap`) and some of them completed: the cap grows by
     INCREASE of itself (at least 1);
   - else it stays: a cap nobody pushes against says nothing about a larger one.
3. The floor is the class's `max_in_flight` (1 without it), and the cap never falls below it;
   it starts there, and is kept per (model, class) across periods of absence (rule 1).
   A class is never let in where a better-ranked protected class would not be: while theirs
   binds, its cap is at most theirs (but not below its own floor).
4. Presets (`Protect`), a model's own overriding the class's: the share of their objective
   that 95% of better-ranked requests stay under. `latency` keeps them at 45% (smallest
   batches, most margin: a 95th percentile held near 60% left 1-3% of them past their
   objective, the controller's lag and their tail beyond it; benchmarks/README.md, "The
   latency preset at 45%"), `balanced` at 80%, `throughput` at their objective (fullest
   batches; about one in twenty of them then comes close to missing). A class's
   `protect_share` replaces its preset's share (the knob between and beyond the presets); a
   model's own preset overrides that too.

5. Model names come from requests: at most MAX_KEPT models' entries are kept, and past
   that all are forgotten (every cap back at its floor, the safe side), so a client naming
   random models cannot grow the sidecar's memory.

6. The class's queue thresholds follow the cap: while it binds above its floor, its
   `admit_below` and `shed_above` are the policy's times cap / floor
   (`core.signals.effective_overload`). A backend that serves better classes first (Triton's
   priority levels, an in-flight batcher) keeps them on time with more lower work queued;
   where it does not, their latency says so and the cap, and the thresholds, come down.

Every threshold is the policy's own objectives, scaled by the preset; nothing here knows a
workload. The core is pure: the caller passes the clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sidecar.core.signals import cap_floor
from sidecar.policy.model import ClassPolicy, Policy, Protect

TARGET = {Protect.LATENCY: 0.45, Protect.BALANCED: 0.8, Protect.THROUGHPUT: 1.0}
QUANTILE = 0.95
MIN_SAMPLES = 20
MAX_PERIODS = 5.0
DECREASE = 0.8
INCREASE = 0.1
PRESENCE_GAPS = 4.0
GAP_WEIGHT = 0.2  # of the newest gap in the moving mean of arrival gaps
MAX_KEPT = 4096  # models (and (model, class) arrivals) kept; names come from requests
# Shares over the target that MIN_SAMPLES of them may hold with their QUANTILE under it.
OVER_ALLOWED = MIN_SAMPLES - math.ceil(QUANTILE * MIN_SAMPLES)


@dataclass(slots=True)
class _Arrivals:
    """When a class last sent the model a request, and the mean gap between them."""

    last_s: float
    mean_gap_s: float | None = None

    def saw(self, now_s: float) -> None:
        gap = max(0.0, now_s - self.last_s)
        if self.mean_gap_s is None:
            self.mean_gap_s = gap
        else:
            self.mean_gap_s += GAP_WEIGHT * (gap - self.mean_gap_s)
        self.last_s = now_s


@dataclass(slots=True)
class _Lane:
    """One protected class's cap on one model, and what its current period saw."""

    rank: int  # of the protected class: completions of better ranks are what it watches
    cap: float
    period_start_s: float
    # As the last `caps` call said: the period, the preset's target share, the floor.
    period_s: float
    target: float
    floor: int
    shares: dict[int, list[float]] = field(default_factory=dict)  # better rank -> shares
    over: dict[int, int] = field(default_factory=dict)  # better rank -> shares over the target
    samples: int = 0
    limited: bool = False

    def advance(self, now_s: float) -> None:
        """Rule 2: once a period is over, one step, and a new period starts now."""
        elapsed = now_s - self.period_start_s
        if elapsed < self.period_s:
            return
        if (
            self.samples < MIN_SAMPLES
            and elapsed < MAX_PERIODS * self.period_s
            and max(self.over.values(), default=0) <= OVER_ALLOWED  # outcome not known yet
        ):
            return
        if any(_quantile(shares) > self.target for shares in self.shares.values()):
            self.cap = max(float(self.floor), self.cap * DECREASE)
        elif self.limited and self.samples:  # no evidence, no growth
            self.cap += max(1.0, self.cap * INCREASE)
        self.shares, self.over, self.samples, self.limited = {}, {}, 0, False
        self.period_start_s = now_s

    def took(self, rank: int, share: float) -> None:
        self.shares.setdefault(rank, []).append(share)
        if share > self.target:
            self.over[rank] = self.over.get(rank, 0) + 1
        self.samples += 1


def _quantile(shares: list[float]) -> float:
    """The nearest-rank QUANTILE: the smallest share that QUANTILE of them are at or under."""
    ordered = sorted(shares)
    return ordered[max(0, math.ceil(QUANTILE * len(ordered)) - 1)]


@dataclass(slots=True)
class Protection:
    """The adaptive caps of every (model, protected class) this replica has seen."""

    _arrivals: dict[tuple[str, int], _Arrivals] = field(default_factory=dict)
    # model -> class -> lane: a completion (once per request) touches its model's lanes only.
    _lanes: dict[str, dict[str, _Lane]] = field(default_factory=dict)

    def arrived(
        self, model: str, klass: ClassPolicy, in_flight: int | None, cap: int | None, now_s: float
    ) -> None:
        """A request of `klass` for `model` arrived, the model's count at `in_flight` and its
        class's cap at `cap` (None: not capped now). Rules 1 and 2 (held back)."""
        seen = self._arrivals.get((model, klass.rank))
        if seen is None:
            if len(self._arrivals) >= MAX_KEPT:
                self._arrivals.clear()  # rule 5
            self._arrivals[(model, klass.rank)] = _Arrivals(now_s)
        else:
            seen.saw(now_s)
        self.at_cap(model, klass, in_flight, cap)

    def at_cap(
        self, model: str, klass: ClassPolicy, in_flight: int | None, cap: int | None
    ) -> None:
        """A request of `klass` for `model` found the model's count at `in_flight` and its
        class's cap at `cap`: at or over it, the cap held it back in this period (rule 2).
        Read on arrival, again once its quota is taken (concurrent arrivals all read the count
        before any of them was sent), and while it waits at the head of the model's queue (a
        request still held when a period starts is held back in that period too)."""
        lane = self._lanes.get(model, {}).get(klass.name)
        if lane is not None and cap is not None and in_flight is not None and in_flight >= cap:
            lane.limited = True

    def completed(self, model: str, klass: ClassPolicy, duration_s: float, now_s: float) -> None:
        """A request of `klass` for `model` ended after `duration_s` (Envoy's measure): the
        lanes of classes ranked below it take its share of its objective (rule 2)."""
        share = duration_s * 1000 / klass.latency_objective_ms
        for lane in self._lanes.get(model, {}).values():
            if lane.rank > klass.rank:
                lane.advance(now_s)
                lane.took(klass.rank, share)

    def caps(
        self,
        model: str,
        classes: Iterable[ClassPolicy],
        shares: Mapping[str, float],
        now_s: float,
    ) -> dict[str, int | None]:
        """The cap of every protected class for `model` (name -> cap; None: it does not bind
        now). `shares`: each protected class's target share for this model (`shares_for`)."""
        ranked = sorted(classes, key=lambda c: c.rank)
        out: dict[str, int | None] = {}
        above: int | None = None  # the least binding cap of a better-ranked protected class
        for klass in ranked:
            share = shares.get(klass.name)
            if share is None or klass.overload is None:
                continue
            better = [c for c in ranked if c.rank < klass.rank]
            cap = self._cap(model, klass, better, share, now_s)
            if cap is not None and above is not None:
                cap = max(cap_floor(klass.overload), min(cap, above))  # rule 3
            out[klass.name] = cap
            if cap is not None:
                above = cap if above is None else min(above, cap)
        return out

    def _cap(
        self,
        model: str,
        klass: ClassPolicy,
        better: list[ClassPolicy],
        share: float,
        now_s: float,
    ) -> int | None:
        assert klass.overload is not None
        floor = cap_floor(klass.overload)
        if not better:
            return None  # nobody to protect
        period_s = min(c.latency_objective_ms for c in better) / 1000
        lanes = self._lanes.get(model)
        if lanes is None:
            if len(self._lanes) >= MAX_KEPT:
                self._lanes.clear()  # rule 5
            lanes = self._lanes[model] = {}
        lane = lanes.get(klass.name)
        if lane is None:
            lane = _Lane(klass.rank, float(floor), now_s, period_s, share, floor)
            lanes[klass.name] = lane
        # Follow policy reloads; a raised floor lifts the cap with it.
        lane.period_s, lane.target, lane.floor = period_s, share, floor
        lane.advance(now_s)
        lane.cap = max(lane.cap, float(floor))
        if not any(self._present(model, c, now_s) for c in better):
            return None
        return int(lane.cap)

    def learnt(self, model: str) -> dict[str, int]:
        """The cap each protected class has learnt for `model` (bound or not)."""
        return {name: int(lane.cap) for name, lane in self._lanes.get(model, {}).items()}

    def _present(self, model: str, klass: ClassPolicy, now_s: float) -> bool:
        """Rule 1: did `klass` send `model` a request recently enough to expect another?"""
        seen = self._arrivals.get((model, klass.rank))
        if seen is None:
            return False
        horizon_s = klass.latency_objective_ms / 1000
        if seen.mean_gap_s is not None:
            horizon_s = max(horizon_s, PRESENCE_GAPS * seen.mean_gap_s)
        return now_s - seen.last_s <= horizon_s


def shares_for(policy: Policy, model: str) -> dict[str, float]:
    """Rule 4: each protected class's target share for `model`: the model's own preset's, else
    the class's `protect_share`, else its preset's."""
    model_policy = policy.models.get(model)
    override = model_policy.protect if model_policy is not None else None
    out = {}
    for c in policy.classes.values():
        if c.overload is None or c.overload.protect is None:
            continue
        if override is not None:
            out[c.name] = TARGET[override]
        elif c.overload.protect_share is not None:
            out[c.name] = c.overload.protect_share
        else:
            out[c.name] = TARGET[c.overload.protect]
    return out
