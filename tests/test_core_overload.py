"""Table tests for backend-aware admission. Pure: the load is a value."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from sidecar.core.admission import LoadAction, judge_load, overload_retry_after_s
from sidecar.core.load import SignalState
from sidecar.policy.model import ClassPolicy, OverloadPolicy, StaleAction

FRESH, STALE, MISSING = SignalState.FRESH, SignalState.STALE, SignalState.MISSING


def klass(
    admit_below: int = 8,
    shed_above: int | None = 32,
    max_wait_ms: int = 500,
    relegate_to: str | None = None,
    on_stale: StaleAction = StaleAction.SATURATED,
    overload: bool = True,
) -> ClassPolicy:
    return ClassPolicy(
        "standard",
        rank=2,
        latency_objective_ms=2000,
        max_wait_ms=max_wait_ms,
        triton_priority=2,
        concurrency_retry_after_ms=1700,
        overload=OverloadPolicy(admit_below, shed_above, on_stale) if overload else None,
        relegate_to=relegate_to,
    )


@pytest.mark.parametrize(
    ("policy", "state", "depth", "drain", "ahead", "relegated", "action", "wait_s"),
    [
        # quota only
        (klass(overload=False), FRESH, 1000, 0.0, 0, False, LoadAction.ADMIT, 0.0),
        # idle backend
        (klass(), FRESH, 7, 10.0, 0, False, LoadAction.ADMIT, 0.0),
        # idle backend but others of this band already wait: queue behind them
        (klass(), FRESH, 0, 10.0, 3, False, LoadAction.DEFER, 0.3),
        # busy: 8 - 8 + 1 = 1 ahead at 10/s -> 0.1 s, fits in 0.5 s
        (klass(), FRESH, 8, 10.0, 0, False, LoadAction.DEFER, 0.1),
        # busy: (20 - 8 + 1) + 2 = 15 ahead at 10/s -> 1.5 s > 0.5 s
        (klass(), FRESH, 20, 10.0, 2, False, LoadAction.SHED, 1.5),
        (klass(relegate_to="batch"), FRESH, 20, 10.0, 2, False, LoadAction.RELEGATE, 1.5),
        # relegated once already: no second relegation
        (klass(relegate_to="batch"), FRESH, 20, 10.0, 2, True, LoadAction.SHED, 1.5),
        # not sheddable: admitted to wait in Triton rather than refused
        (klass(shed_above=None), FRESH, 20, 10.0, 2, False, LoadAction.ADMIT, 1.5),
        # at the shed threshold: shed at once even if it would fit the wait budget
        (klass(max_wait_ms=60000), FRESH, 32, 10.0, 0, False, LoadAction.SHED, 2.5),
        (klass(relegate_to="batch"), FRESH, 40, 10.0, 0, False, LoadAction.RELEGATE, 3.3),
        # no drain rate measured yet: held within its budget rather than shed on a guess ...
        (klass(), FRESH, 10, 0.0, 0, False, LoadAction.DEFER, math.inf),
        # ... unless the class may not wait at all
        (klass(max_wait_ms=0), FRESH, 10, 0.0, 0, False, LoadAction.SHED, math.inf),
        # stale or missing signals: a defined state
        (klass(), STALE, 0, 10.0, 0, False, LoadAction.SHED, 2.5),
        (klass(), MISSING, 0, 10.0, 0, False, LoadAction.SHED, 2.5),
        (klass(on_stale=StaleAction.ADMIT), STALE, 500, 10.0, 0, False, LoadAction.ADMIT, 0.0),
        (klass(shed_above=None), MISSING, 0, 10.0, 0, False, LoadAction.DEFER, 0.1),
    ],
)
def test_load_verdicts(
    policy: ClassPolicy,
    state: SignalState,
    depth: int,
    drain: float,
    ahead: int,
    relegated: bool,
    action: LoadAction,
    wait_s: float,
) -> None:
    verdict = judge_load(policy, state, depth, drain, ahead, relegated=relegated)
    assert verdict.action is action, verdict.why
    assert verdict.predicted_wait_s == pytest.approx(wait_s)


def test_retry_after_comes_from_the_drain_rate_or_the_class_fallback() -> None:
    policy = klass()
    draining = judge_load(policy, FRESH, 20, 10.0, 2)
    assert overload_retry_after_s(policy, draining) == pytest.approx(1.5)
    stalled = judge_load(policy, FRESH, 20, 0.0, 0)
    assert overload_retry_after_s(policy, stalled) == 1.7  # concurrency_retry_after_ms


def capped(max_in_flight: int) -> ClassPolicy:
    base = klass()
    assert base.overload is not None
    return replace(base, overload=replace(base.overload, max_in_flight=max_in_flight))


@pytest.mark.parametrize(
    ("in_flight", "action", "wait_s"),
    [
        (None, LoadAction.ADMIT, 0.0),  # the store never said: the cap is not applied
        (5, LoadAction.ADMIT, 0.0),  # under the cap and under admit_below
        (6, LoadAction.DEFER, 0.1),  # at the cap: 1 ahead at 10/s
        (9, LoadAction.DEFER, 0.4),  # 4 over: 0.4 s, fits 0.5 s
        (12, LoadAction.SHED, 0.7),  # 7 over: 0.7 s > 0.5 s
    ],
)
def test_max_in_flight_caps_admission_even_with_an_empty_queue(
    in_flight: int | None, action: LoadAction, wait_s: float
) -> None:
    verdict = judge_load(capped(6), FRESH, 0, 10.0, 0, in_flight=in_flight)
    assert verdict.action is action
    assert verdict.predicted_wait_s == pytest.approx(wait_s)
    if in_flight is not None:
        assert f"{in_flight} in flight (max 6)" in verdict.why


def test_the_larger_excess_of_queue_and_in_flight_counts() -> None:
    # Queue 10 (3 over admit_below 8), in flight 7 (2 over the cap 6): 3 ahead.
    verdict = judge_load(capped(6), FRESH, 10, 10.0, 0, in_flight=7)
    assert verdict.predicted_wait_s == pytest.approx(0.3)


def test_the_hold_budget_is_cut_to_what_the_class_takes_upstream() -> None:
    """max_wait 500 ms of a 2 s objective: 1.7 s upstream lately leaves 300 ms. A wait of
    0.4 s fits max_wait but not that: the request is shed at once (it would be let go only to
    miss), with the cut said in its trace and its budget in the verdict."""
    slow = {"standard": 1.7}
    verdict = judge_load(klass(), FRESH, 11, 10.0, 0, upstream_s=slow)  # 4 ahead: 0.4 s
    assert verdict.action is LoadAction.SHED
    assert "hold budget 0.300s (standard took 1.700s upstream lately)" in verdict.why
    assert verdict.budget_s == pytest.approx(0.3)
    fits = judge_load(klass(), FRESH, 10, 10.0, 0, upstream_s=slow)  # 3 ahead: 0.3 s
    assert fits.action is LoadAction.DEFER
    fast = judge_load(klass(), FRESH, 11, 10.0, 0, upstream_s={"standard": 0.2})
    assert fast.action is LoadAction.DEFER and "<= max_wait 0.5s" in fast.why


@pytest.mark.parametrize(
    ("policy", "depth", "late_from", "action"),
    [
        (klass(), 5, None, LoadAction.ADMIT),  # nothing learnt: sent at once
        (klass(), 5, 6, LoadAction.ADMIT),  # under the lateness limit
        (klass(), 6, 6, LoadAction.SHED),  # at it: most sent there lately ended late
        (klass(relegate_to="batch"), 7, 6, LoadAction.RELEGATE),
        (klass(shed_above=None), 7, 6, LoadAction.ADMIT),  # never shed by load
    ],
)
def test_an_arrival_at_its_classs_lateness_limit_is_not_sent(
    policy: ClassPolicy, depth: int, late_from: int | None, action: LoadAction
) -> None:
    verdict = judge_load(policy, FRESH, depth, 10.0, 0, late_from=late_from)
    assert verdict.action is action
    if action is not LoadAction.ADMIT:
        assert "most of standard sent at 6 or more lately ended late" in verdict.why
        # Retry-After: the drain down to the limit, (depth - 6 + 1) at 10/s
        assert verdict.predicted_wait_s == pytest.approx((depth - 5) / 10)
