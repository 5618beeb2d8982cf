"""The load signal a decision reads: what this replica knows of a model (`ModelSignals`), the
waiters ahead (`Signals`), how each kind of request reads a stale signal (`SIGNAL_READING`),
and which cap on the model's requests in flight a class has now (`cap_of`). Values only; the
rules that use them are in core/admission.py.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from sidecar.core.fleet import NOBODY, Elsewhere
from sidecar.core.load import SignalState
from sidecar.core.record import record
from sidecar.policy.model import ClassPolicy, OverloadPolicy, StaleAction

# -- The load signal, as each kind of request reads it ------------------------------------------


class Reader(enum.Enum):
    ARRIVAL = "arrival"  # a request that just came in
    HEAD = "head"  # the held request at the head of the queue, asking to go


class Reading(enum.Enum):
    DEPTH = "the queue depth Triton reported"
    IDLE = "an empty queue"
    SATURATED = "a queue at shed_above (or admit_below, if never shed)"
    NO_ROOM = "no room"


# (signal state, the class's on_stale, who reads it) -> what the depth is taken to be. A held
# request is never let go early on a signal that may be old, whatever on_stale says: it has
# already been admitted by quota and only waits for evidence of room.
SIGNAL_READING: Mapping[tuple[SignalState, StaleAction, Reader], Reading] = {
    **{(SignalState.FRESH, s, r): Reading.DEPTH for s in StaleAction for r in Reader},
    **{
        (state, StaleAction.ADMIT, Reader.ARRIVAL): Reading.IDLE
        for state in (SignalState.STALE, SignalState.MISSING)
    },
    **{
        (state, StaleAction.SATURATED, Reader.ARRIVAL): Reading.SATURATED
        for state in (SignalState.STALE, SignalState.MISSING)
    },
    **{
        (state, stale, Reader.HEAD): Reading.NO_ROOM
        for state in (SignalState.STALE, SignalState.MISSING)
        for stale in StaleAction
    },
}


@dataclass(frozen=True, slots=True)
class ModelSignals:
    """What this replica knows of one model's load at one instant."""

    state: SignalState
    queue_depth: int  # Triton's at the last scrape, plus what was let go since (unseen yet)
    drain_per_s: float  # completions per second; 0 when not measured yet
    in_flight: int | None = None  # every replica's requests in flight; None: never said
    # The adaptive cap of each class with `overload.protect` (core/protect.py; None: it does
    # not bind now). A protected class missing here is held to its floor, `max_in_flight`.
    caps: Mapping[str, int | None] = field(default_factory=dict)
    # Each class's time upstream on the model lately, the lower quartile (core/upstream.py;
    # absent: not known): what `hold_budget` leaves a held request.
    upstream_s: Mapping[str, float] = field(default_factory=dict)
    # Each class's lateness limit: the depth from which its requests sent at once have
    # lately ended late more often than not (core/lateness.py; absent: none).
    late_from: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BandPace:
    """How fast a band's waiters have been let go since the band was last empty: `let_go` of
    them over the last `span_s` seconds (`core.queue`)."""

    let_go: int
    span_s: float

    def wait_s(self, ahead: int) -> float:
        """The wait of a new arrival with `ahead` of the band's waiters before it, at this
        pace. None let go yet counts as one: all it says is that the pace is slower than one
        per span, so the longer nobody goes, the longer the wait."""
        if self.span_s <= 0:
            return 0.0
        return (ahead + 1) * self.span_s / max(self.let_go, 1)


@dataclass(frozen=True, slots=True)
class Signals:
    """The load a decision sees: its model's, and the sidecar's own waiters for that model
    per band (each model has its own hold queue: another model's waiters are not ahead)."""

    model: ModelSignals | None  # None: no view of Triton for this request (quota only)
    # Held requests of the request's model, per class rank.
    waiting: Mapping[int, int] = field(default_factory=dict)
    served: frozenset[str] | None = None  # the models Triton serves; None: not known now
    # Other replicas' waiters for the model (gateway topology; `core.fleet`).
    elsewhere: Elsewhere = NOBODY
    # This replica's waiters for the model per band and tenant, with the counters that order
    # them: when given, only those its queue serves first are ahead of an arrival.
    here: Elsewhere | None = None
    # This replica's bands for the model that have waiters, and how fast they are let go.
    paces: Mapping[int, BandPace] = field(default_factory=dict)

    def ahead_of(self, rank: int, tenant: str | None = None) -> int:
        """The model's waiters here that would be served before a new arrival of band `rank`
        and `tenant`: a better band's, and in its own band (when `here` says who waits) only
        those of tenants its queue serves first (a counter no larger than the tenant's: its
        own waiters, and ties, go first). Without that, a quiet tenant's arrival would count
        a noisy tenant's backlog as ahead of it, and be shed for a wait it would not have."""
        if self.here is not None and tenant is not None:
            return self.here.ahead_of(rank, tenant)
        return sum(n for band, n in self.waiting.items() if band <= rank)

    def band_wait_s(self, rank: int, tenant: str | None = None) -> float:
        """The wait of a new arrival of band `rank` and `tenant` at the pace its band's
        waiters here have been let go (0 while the band has none). A band that better bands
        leave little room gets a long wait, though the model as a whole drains fast."""
        pace = self.paces.get(rank)
        if pace is None:
            return 0.0
        if self.here is not None and tenant is not None:
            ahead = self.here.ahead_in_band(rank, tenant)
        else:
            ahead = self.waiting.get(rank, 0)
        return pace.wait_s(ahead)


QUOTA_ONLY = Signals(None)


# -- The verdict the load rules give (core/admission.py) ---------------------------------------


class LoadAction(enum.Enum):
    ADMIT = "admit"
    DEFER = "defer"
    RELEGATE = "relegate"
    SHED = "shed"


@record
class LoadVerdict:
    action: LoadAction
    predicted_wait_s: float  # inf when nothing is draining
    why: str  # one line for the decision's trace
    # Requests that go before it: Triton's queue over admit_below (or in flight over the
    # cap) and the sidecar's own waiters ahead of it; 0 when admitted at once.
    ahead: int = 0
    # The hold budget it was judged against (`hold_budget`); None: not judged on a wait.
    budget_s: float | None = None


QUOTA_ONLY_VERDICT = LoadVerdict(LoadAction.ADMIT, 0.0, "admission by quota only")


def depth_read(
    overload: OverloadPolicy, state: SignalState, depth: int, reader: Reader
) -> tuple[int | None, str]:
    """The depth a request of `reader` kind sees (None: no room whatever it is), and how."""
    reading = SIGNAL_READING[(state, overload.on_stale, reader)]
    if reading is Reading.DEPTH:
        return depth, f"queue {depth}"
    if reading is Reading.IDLE:
        return 0, f"load signal {state.value}, treated as idle"
    if reading is Reading.SATURATED:
        saturated = overload.shed_above if overload.shed_above is not None else overload.admit_below
        return saturated, f"load signal {state.value}, treated as saturated"
    return None, f"load signal {state.value}: nobody goes early"


NO_CAPS: Mapping[str, int | None] = {}
NO_UPSTREAM: Mapping[str, float] = {}


def cap_floor(overload: OverloadPolicy) -> int:
    """An adaptive cap's floor (core/protect.py rule 3): `max_in_flight`, 1 without it."""
    return overload.max_in_flight or 1


def cap_of(klass: ClassPolicy, caps: Mapping[str, int | None]) -> int | None:
    """The class's cap on the model's requests in flight now: adaptive with `protect` (as
    `caps` says; its floor if `caps` does not say), else the fixed `max_in_flight`."""
    overload = klass.overload
    if overload is None:
        return None
    if overload.protect is not None:
        return caps.get(klass.name, cap_floor(overload))
    return overload.max_in_flight


def hold_budget(
    klass: ClassPolicy, upstream_s: Mapping[str, float], client_wait_s: float | None = None
) -> tuple[float, bool]:
    """The longest a request of `klass` is held for the model, and whether its client's wait
    (`client_wait_s`, core/client_wait.py) cut it short of what the class gives: its
    `max_wait_ms`, cut to what leaves it, within its objective, the time three in four of
    its class's requests have lately spent upstream on the model (core/upstream.py rule 3).
    Let go later, it would miss as they did, on GPU time the requests behind it needed. The
    client's wait cuts it the same way."""
    budget_s = klass.max_wait_ms / 1000
    took_s = upstream_s.get(klass.name)
    if took_s is not None:
        budget_s = max(0.0, min(budget_s, klass.latency_objective_ms / 1000 - took_s))
    if client_wait_s is None:
        return budget_s, False
    # Its class's time unknown: the least any class lately took (client_wait.py rule 4).
    least_s = took_s if took_s is not None else min(upstream_s.values(), default=0.0)
    client_s = max(0.0, client_wait_s - least_s)
    return (client_s, True) if client_s < budget_s else (budget_s, False)


def held_budget(
    klass: ClassPolicy, upstream_s: Mapping[str, float], client_wait_s: float | None
) -> tuple[float, str]:
    """The request's hold budget on the model now, and how a verdict's trace names it."""
    budget_s, cut = hold_budget(klass, upstream_s, client_wait_s)
    if budget_s >= klass.max_wait_ms / 1000:
        return budget_s, f"max_wait {budget_s:g}s"
    took_s = upstream_s.get(klass.name)
    took = "" if took_s is None else f"{klass.name} took {took_s:.3f}s upstream lately"
    if cut:
        took = f"its client waits {client_wait_s:.3f}s" + (took and f", {took}")
    return budget_s, f"hold budget {budget_s:.3f}s ({took})"


def effective_overload(klass: ClassPolicy, caps: Mapping[str, int | None]) -> OverloadPolicy | None:
    """The class's queue thresholds now. With `protect` and an adaptive cap that binds above
    its floor, `admit_below` and `shed_above` grow by the same factor (core/protect.py rule
    6): the better classes have shown they keep their objective with that much more of this
    class in flight, so its share of the queue grows with it. Never below the policy's."""
    overload = klass.overload
    if overload is None or overload.protect is None:
        return overload
    cap, floor = caps.get(klass.name), cap_floor(overload)
    if cap is None or cap <= floor:
        return overload
    scale = cap / floor
    shed = overload.shed_above
    return replace(
        overload,
        admit_below=max(overload.admit_below, round(overload.admit_below * scale)),
        shed_above=None if shed is None else max(shed, round(shed * scale)),
    )


# -- Room ---------------------------------------------------------------------------------------


def over_cap(cap: int | None, in_flight: int | None) -> int:
    """How many of the model's requests in flight are at or over the class's cap (0: under)."""
    if cap is None or in_flight is None:
        return 0
    return max(0, in_flight - cap + 1)


def has_room(
    overload: OverloadPolicy, depth: int | None, in_flight: int | None, cap: int | None
) -> bool:
    """THE test of "may one more request of this class go to Triton now"."""
    return depth is not None and depth < overload.admit_below and over_cap(cap, in_flight) == 0


def reserve(
    depth: int | None, in_flight: int | None, reserved: int
) -> tuple[int | None, int | None]:
    """Depth and in-flight count with `reserved` requests (other replicas' waiters that go
    first: `core.fleet`) counted as already sent."""
    return (
        None if depth is None else depth + reserved,
        None if in_flight is None else in_flight + reserved,
    )


def may_go(klass: ClassPolicy | None, model: ModelSignals, reserved: int = 0) -> bool:
    """May the held request at the head of the queue go to Triton now? `reserved`: waiters on
    other replicas that go before it."""
    overload = effective_overload(klass, model.caps) if klass is not None else None
    if klass is None or overload is None:
        return True
    depth, _ = depth_read(overload, model.state, model.queue_depth, Reader.HEAD)
    cap = cap_of(klass, model.caps)
    return has_room(overload, *reserve(depth, model.in_flight, reserved), cap)
