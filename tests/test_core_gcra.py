"""Properties of the GCRA arithmetic the stores share."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.gcra import gcra_step, recorded_tat

rates = st.floats(min_value=0.1, max_value=1000.0)
bursts = st.floats(min_value=1.0, max_value=500.0)


@settings(max_examples=300, deadline=None)
@given(
    rate=rates,
    burst=bursts,
    arrivals=st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=5.0), st.floats(min_value=0.0, max_value=10.0)
        ),
        min_size=1,
        max_size=200,
    ),
)
def test_never_admits_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: float, arrivals: list[tuple[float, float]]
) -> None:
    tat, now, start, admitted = 0.0, 0.0, 0.0, 0.0
    for gap, cost in arrivals:
        now += gap
        step = gcra_step(tat, now, cost, rate, burst)
        if step.allowed:
            tat = step.new_tat
            admitted += cost
        assert admitted <= burst + rate * (now - start) + 1e-6


@settings(max_examples=300, deadline=None)
@given(
    rate=rates, burst=bursts, cost=st.floats(min_value=0.01, max_value=10.0), k=st.integers(0, 50)
)
def test_retry_after_is_exactly_when_it_fits(
    rate: float, burst: float, cost: float, k: int
) -> None:
    tat, now = 0.0, 0.0
    for _ in range(k):
        step = gcra_step(tat, now, cost, rate, burst)
        if step.allowed:
            tat = step.new_tat
    step = gcra_step(tat, now, cost, rate, burst)
    if step.allowed or cost > burst:
        return
    assert not gcra_step(tat, now + step.retry_after_s * 0.99 - 1e-6, cost, rate, burst).allowed
    assert gcra_step(tat, now + step.retry_after_s + 1e-6, cost, rate, burst).allowed


def test_fresh_bucket_allows_burst_then_denies() -> None:
    tat = 0.0
    results = []
    for _ in range(6):
        step = gcra_step(tat, 100.0, 1.0, 2.0, 5.0)
        results.append(step.allowed)
        tat = step.new_tat
    assert results == [True] * 5 + [False]
    assert abs(gcra_step(tat, 100.0, 1.0, 2.0, 5.0).retry_after_s - 0.5) < 1e-9


def test_cost_above_burst_never_fits() -> None:
    step = gcra_step(0.0, 10.0, 11.0, 1.0, 10.0)
    assert not step.allowed
    assert step.retry_after_s == 10.0


@settings(max_examples=300, deadline=None)
@given(
    rate=rates,
    burst=bursts,
    records=st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=5.0),
            st.floats(min_value=-600.0, max_value=600.0),
        ),
        min_size=1,
        max_size=100,
    ),
)
def test_a_recorded_charge_moves_the_level_and_stops_at_empty_and_full(
    rate: float, burst: float, records: list[tuple[float, float]]
) -> None:
    """What was spent elsewhere comes off the level (a refund goes back on), never below empty
    (no debt) and never above full."""
    tat, now = 0.0, 0.0

    def level() -> float:
        return burst - rate * (max(tat, now) - now)

    for gap, cost in records:
        now += gap
        before = level()
        tat = recorded_tat(tat, now, cost, rate, burst)
        assert level() == pytest.approx(min(burst, max(0.0, before - cost)), abs=1e-6)


def test_a_recorded_charge_is_what_a_checked_one_would_have_taken() -> None:
    checked = gcra_step(0.0, 10.0, 30.0, 10.0, 100.0)
    assert checked.allowed
    assert recorded_tat(0.0, 10.0, 30.0, 10.0, 100.0) == checked.new_tat
