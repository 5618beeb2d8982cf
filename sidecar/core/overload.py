"""Backend-aware admission: what Triton's queue depth means for one request of one class.

Rules (checked before any quota is taken, so a request shed for load costs its tenant
nothing):
- A class without an `overload` policy is admitted on quota alone.
- The depth used is the model's queue depth when the signal is FRESH; when it is STALE or
  MISSING, `on_stale` decides: `saturated` acts as if the depth were at `shed_above` (or
  `admit_below` for classes that are never shed), `admit` as if it were zero.
- Below `admit_below` and, when the class sets `max_in_flight`, with fewer requests of the
  model in flight than that (the sidecars' own count, shared through the store; unknown when
  the store cannot say, and then not applied), with nobody of the same or a better band
  already waiting, admit. Over either limit counts as that many requests ahead.
- At or above `shed_above` (sheddable classes): relegate once if the class names a target,
  else shed with 503.
- Otherwise predict the wait from the observed drain rate: the requests ahead of this one
  (the queue above `admit_below` plus the sidecar's own waiters of the same or better band)
  divided by completions per second. If the wait fits in the class's `max_wait_ms`, defer;
  if not, relegate once, else shed at once with Retry-After = the predicted wait. A class
  that is not sheddable is admitted instead: it waits in Triton's queue, never is refused.
  Nothing is held just to time out.
- No drain rate measured yet (a cold start): the wait cannot be predicted, so a class that
  may wait is deferred within its budget rather than shed on a guess.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from sidecar.core.load import SignalState
from sidecar.policy.model import ClassPolicy, StaleAction


class LoadAction(enum.Enum):
    ADMIT = "admit"
    DEFER = "defer"
    RELEGATE = "relegate"
    SHED = "shed"


@dataclass(frozen=True, slots=True)
class LoadVerdict:
    action: LoadAction
    predicted_wait_s: float  # inf when nothing is draining
    why: str  # one line for the decision's trace


def judge_load(
    klass: ClassPolicy,
    state: SignalState,
    queue_depth: int,
    drain_per_s: float,
    waiting_ahead: int,
    *,
    relegated: bool = False,
    in_flight: int | None = None,
) -> LoadVerdict:
    overload = klass.overload
    if overload is None:
        return LoadVerdict(LoadAction.ADMIT, 0.0, "no overload policy: quota only")
    can_relegate = klass.relegate_to is not None and not relegated
    if state is SignalState.FRESH:
        depth, seen = queue_depth, f"queue {queue_depth}"
    elif overload.on_stale is StaleAction.ADMIT:
        depth, seen = 0, f"load signal {state.value}, treated as idle"
    else:
        depth = overload.shed_above if overload.shed_above is not None else overload.admit_below
        seen = f"load signal {state.value}, treated as saturated"

    over_cap = 0
    if overload.max_in_flight is not None and in_flight is not None:
        over_cap = max(0, in_flight - overload.max_in_flight + 1)
        seen = f"{seen}, {in_flight} in flight (max {overload.max_in_flight})"
    if depth < overload.admit_below and over_cap == 0 and waiting_ahead == 0:
        return LoadVerdict(LoadAction.ADMIT, 0.0, f"{seen} < admit_below {overload.admit_below}")

    ahead = max(0, depth - overload.admit_below + 1, over_cap) + waiting_ahead
    wait_s = ahead / drain_per_s if drain_per_s > 0 else math.inf
    if overload.shed_above is not None and depth >= overload.shed_above:
        action = LoadAction.RELEGATE if can_relegate else LoadAction.SHED
        return LoadVerdict(action, wait_s, f"{seen} >= shed_above {overload.shed_above}")
    budget_s = klass.max_wait_ms / 1000
    predicted = f"{seen}, {waiting_ahead} waiting: predicted wait {wait_s:.3f}s"
    if drain_per_s <= 0 and budget_s > 0:
        return LoadVerdict(LoadAction.DEFER, wait_s, f"{seen}, drain rate unknown: held")
    if wait_s <= budget_s:
        return LoadVerdict(LoadAction.DEFER, wait_s, f"{predicted} <= max_wait {budget_s:g}s")
    if can_relegate:
        return LoadVerdict(LoadAction.RELEGATE, wait_s, f"{predicted} > max_wait {budget_s:g}s")
    if overload.shed_above is None:
        return LoadVerdict(LoadAction.ADMIT, wait_s, f"{predicted}; not sheddable: admitted")
    return LoadVerdict(LoadAction.SHED, wait_s, f"{predicted} > max_wait {budget_s:g}s")


def overload_retry_after_s(klass: ClassPolicy, verdict: LoadVerdict) -> float:
    """When to come back: the predicted drain time, or the class's fallback when nothing
    drains (stale signal, stalled Triton)."""
    if math.isfinite(verdict.predicted_wait_s) and verdict.predicted_wait_s > 0:
        return verdict.predicted_wait_s
    return klass.concurrency_retry_after_ms / 1000
