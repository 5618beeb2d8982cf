"""The autoscaling signal (sidecar/core/demand.py): pure, the clock is a number."""

from __future__ import annotations

import math

import pytest

from sidecar.core import admission
from sidecar.core.admission import Answer
from sidecar.core.decide import shed_overloaded
from sidecar.core.demand import (
    MAX_MODELS,
    OTHER,
    DemandRates,
    SmoothedRate,
    drained_model,
    offered_model,
    ratio_of,
)
from sidecar.core.types import Decision, LeaseRef, Outcome, Reason, RequestAttributes
from tests.test_core_admission import ALLOWED, INFER, hold, planned, policy_with, signals, take

TAU = 15.0


def test_a_steady_rate_reads_as_itself() -> None:
    rate = SmoothedRate(TAU)
    for tick in range(1, 2001):  # 10 per second for 200 s (> 13 tau)
        rate.add(tick / 10)
    # Just after an event it reads half an event's worth (1 / 2 tau) above, just before one
    # as much below: a sawtooth around the rate.
    assert rate.at(200.0) == pytest.approx(10.0 + 1 / (2 * TAU), rel=1e-3)
    assert rate.at(200.099) == pytest.approx(10.0 - 1 / (2 * TAU), rel=1e-3)


def test_an_idle_rate_decays_by_one_e_per_tau() -> None:
    rate = SmoothedRate(TAU)
    rate.add(0.0, events=30.0)  # 30 events at once: 2 per second for a moment
    assert rate.at(0.0) == pytest.approx(2.0)
    assert rate.at(TAU) == pytest.approx(2.0 / math.e)
    assert rate.at(-5.0) == pytest.approx(2.0)  # a reading from before the last event
    assert SmoothedRate(TAU).at(100.0) == 0.0


def run_step(rates: DemandRates, offered_per_s: float, drained_per_s: float, t0: float, t1: float):
    """Feed `rates` events at the given rates (one 0.1 s tick at a time) from t0 to t1."""
    t = t0
    owed_offer = owed_drain = 0.0
    while t < t1 - 1e-9:
        t += 0.1
        owed_offer += offered_per_s * 0.1
        owed_drain += drained_per_s * 0.1
        while owed_offer >= 1.0:
            rates.offered("m", t)
            owed_offer -= 1.0
        while owed_drain >= 1.0:
            rates.drained("m", t)
            owed_drain -= 1.0


# A 1x -> 3x -> 1x step on a model that drains at most 10/s: offered 10/s (steady: the ratio
# is 1), then 30/s for 60 s (it drains 10/s), then 10/s again. After the step down the backlog
# is gone (shed or held out), so it drains 10/s.
#   seconds after the step up: ratio
STEP_UP = [(1.0, 1.10, 1.16), (5.0, 1.5, 1.62), (15.0, 2.2, 2.32), (45.0, 2.85, 2.95)]
#   seconds after the step down: ratio
STEP_DOWN = [(1.0, 2.7, 2.9), (15.0, 1.68, 1.8), (30.0, 1.22, 1.32), (60.0, 1.0, 1.05)]


def test_the_ratio_rises_after_a_step_up_and_falls_after_the_step_down() -> None:
    rates = DemandRates(TAU)
    run_step(rates, 10, 10, 0.0, 200.0)
    assert rates.read(200.0)["m"].ratio == pytest.approx(1.0, abs=0.02)
    clock = 200.0
    for after_s, low, high in STEP_UP:
        run_step(rates, 30, 10, clock, 200.0 + after_s)
        clock = 200.0 + after_s
        assert low <= rates.read(clock)["m"].ratio <= high, after_s
    run_step(rates, 30, 10, clock, 260.0)
    clock = 260.0
    for after_s, low, high in STEP_DOWN:
        run_step(rates, 10, 10, clock, 260.0 + after_s)
        clock = 260.0 + after_s
        assert low <= rates.read(clock)["m"].ratio <= high, after_s
    reading = rates.read(clock)["m"]
    assert reading.demand_per_s == pytest.approx(10.0, rel=0.05)
    assert reading.drain_per_s == pytest.approx(10.0, rel=0.05)


def test_the_ratio_floors_the_drain_at_one_completion_per_tau() -> None:
    assert ratio_of(3.0, 1.5, TAU) == 2.0
    assert ratio_of(1.0, 0.0, TAU) == pytest.approx(15.0)  # nothing completed yet: finite
    assert ratio_of(0.0, 0.0, TAU) == 0.0


def test_idle_models_are_forgotten_and_names_are_bounded() -> None:
    rates = DemandRates(TAU, max_models=2)
    rates.offered("a", 0.0)
    rates.offered("b", 0.0)
    rates.offered("c", 0.0)  # past the bound: counted under OTHER
    assert set(rates.read(0.0)) == {"a", "b", OTHER}
    assert rates.read(0.0)[OTHER].demand_per_s == pytest.approx(1 / TAU)
    assert rates.read(20 * TAU) == {}  # all decayed below the floor: forgotten
    rates.offered("c", 20 * TAU)
    assert list(rates.read(20 * TAU)) == ["c"]
    assert MAX_MODELS >= 100  # a fleet's model count fits


# -- what counts ----------------------------------------------------------------------------------
ATTRS = RequestAttributes("POST", INFER, {})


def answer(outcome: Outcome, reason: Reason) -> Answer:
    return Answer(Decision(outcome, 200, reason, "search", "standard", "standard"))


@pytest.mark.parametrize(
    ("reason", "outcome", "counted"),
    [
        (Reason.ADMITTED, Outcome.ADMIT, True),
        (Reason.ADMITTED_DEFERRED, Outcome.ADMIT, True),
        (Reason.ADMITTED_RELEGATED, Outcome.ADMIT, True),
        (Reason.ADMITTED_FAIL_OPEN, Outcome.ADMIT, True),
        (Reason.OVERLOADED, Outcome.SHED, True),
        (Reason.OVER_RATE, Outcome.SHED, False),
        (Reason.OVER_CONCURRENCY, Outcome.SHED, False),
        (Reason.UNKNOWN_MODEL, Outcome.SHED, False),
        (Reason.UNKNOWN_TENANT, Outcome.SHED, False),
        (Reason.STATE_UNAVAILABLE, Outcome.SHED, False),
    ],
)
def test_which_answers_are_demand(reason: Reason, outcome: Outcome, counted: bool) -> None:
    assert offered_model(ATTRS, answer(outcome, reason)) == ("simgpu" if counted else None)


def test_a_hold_is_demand_and_a_body_model_wins_over_the_path() -> None:
    policy = policy_with()
    assert offered_model(ATTRS, hold(policy)) == "simgpu"
    shed = Answer(shed_overloaded(planned(policy), 0.5, "deep queue"))
    named = RequestAttributes("POST", "/v1/chat/completions", {}, model="llama")
    assert offered_model(named, shed) == "llama"
    admitted = admission.on_quota(take(policy, signals(0)), ALLOWED, 0.0)
    no_model = RequestAttributes("POST", "/v2/health/ready", {})
    assert isinstance(admitted, Answer) and offered_model(no_model, admitted) is None


def test_the_drained_model_is_the_leases_else_the_paths() -> None:
    lease = LeaseRef("search", "standard", "L1")
    assert drained_model(LeaseRef("search", "standard", "L1", "llama"), INFER) == "llama"
    assert drained_model(lease, INFER) == "simgpu"
    assert drained_model(lease, "/v1/chat/completions") is None
    assert drained_model(None, INFER) is None  # no lease: a shed, never drained
    assert drained_model(None, INFER, granted=True) == "simgpu"  # leased mode's admit
