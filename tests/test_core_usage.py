"""Per-tenant usage arithmetic (core/usage.py): the split of Triton's compute time over the
tenants' work, and the sustained-contention share. Pure, no event loop."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.usage import (
    UNATTRIBUTED,
    ComputeLedger,
    aligned,
    counter_increase,
    split,
    sustained_share,
)


@pytest.mark.parametrize(
    ("before", "after", "grown"),
    [(None, 500.0, 0.0), (100.0, 350.0, 250.0), (100.0, 100.0, 0.0), (900.0, 40.0, 40.0)],
    ids=["first-sight-is-baseline", "grew", "idle", "restart-counts-from-zero"],
)
def test_counter_increase(before: float | None, after: float, grown: float) -> None:
    assert counter_increase(before, after) == grown


def test_split_is_proportional_to_work() -> None:
    assert split(10.0, {"a": 3.0, "b": 1.0}) == {"a": 7.5, "b": 2.5}


def test_split_without_work_is_unattributed() -> None:
    assert split(4.0, {}) == {UNATTRIBUTED: 4.0}
    assert split(4.0, {"a": 0.0}) == {UNATTRIBUTED: 4.0}
    assert split(0.0, {"a": 1.0}) == {}


@given(
    st.floats(min_value=0.0, max_value=1e6),
    st.dictionaries(st.sampled_from("abcdef"), st.floats(min_value=0.0, max_value=1e4)),
)
def test_split_adds_up_to_the_total(total: float, weights: dict[str, float]) -> None:
    parts = split(total, weights)
    assert sum(parts.values()) == pytest.approx(total, rel=1e-9, abs=1e-9)


def test_an_interval_splits_its_increase_over_its_work() -> None:
    ledger = ComputeLedger(hold_s=5.0)
    ledger.note_counter("t0", "simgpu", 1_000_000.0, now=0.0)  # baseline: given to nobody
    assert ledger.settle(now=0.0) == []
    ledger.note_work("simgpu", "heavy", 0.6, now=0.1)
    ledger.note_work("simgpu", "light", 0.2, now=0.1)
    ledger.note_counter("t0", "simgpu", 1_800_000.0, now=0.25)
    (given_out,) = ledger.settle(now=0.25)
    assert given_out.model == "simgpu"
    assert given_out.seconds == pytest.approx({"heavy": 0.6, "light": 0.2})


def test_endpoints_count_separately_and_add_up() -> None:
    ledger = ComputeLedger()
    ledger.note_counter("t0", "m", 100.0, now=0.0)
    ledger.note_counter("t1", "m", 5_000.0, now=0.0)
    ledger.note_counter("t0", "m", 1_100.0, now=1.0)
    ledger.note_counter("t1", "m", 7_000.0, now=1.0)
    assert ledger.waiting_s("m") == pytest.approx(0.003)


def test_compute_waits_for_work_that_arrives_late() -> None:
    """The access log can arrive after the scrape that shows the compute: it waits."""
    ledger = ComputeLedger(hold_s=5.0)
    ledger.note_counter("t0", "m", 0.0, now=0.0)
    ledger.note_counter("t0", "m", 2_000_000.0, now=1.0)
    assert ledger.settle(now=1.0) == []
    ledger.note_work("m", "a", 1.0, now=1.2)
    (given_out,) = ledger.settle(now=1.25)
    assert given_out.seconds == {"a": pytest.approx(2.0)}


def test_compute_without_work_becomes_unattributed_after_the_hold() -> None:
    ledger = ComputeLedger(hold_s=5.0)
    ledger.note_counter("t0", "m", 0.0, now=0.0)
    ledger.note_counter("t0", "m", 3_000_000.0, now=1.0)
    assert ledger.settle(now=5.9) == []
    (given_out,) = ledger.settle(now=6.0)
    assert given_out.seconds == {UNATTRIBUTED: pytest.approx(3.0)}
    assert ledger.waiting_s("m") == 0.0


def test_work_without_compute_is_dropped_after_the_hold() -> None:
    ledger = ComputeLedger(hold_s=5.0)
    ledger.note_counter("t0", "m", 0.0, now=0.0)
    ledger.note_work("m", "a", 1.0, now=0.0)
    assert ledger.settle(now=5.0) == []
    ledger.note_work("m", "b", 1.0, now=5.5)
    ledger.note_counter("t0", "m", 1_000_000.0, now=6.0)
    (given_out,) = ledger.settle(now=6.0)
    assert given_out.seconds == {"b": pytest.approx(1.0)}  # a's stale work took none


@given(
    st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=1e6),  # counter growth, us
            st.dictionaries(st.sampled_from("xyz"), st.floats(min_value=0.0, max_value=5.0)),
        ),
        max_size=30,
    )
)
def test_given_plus_waiting_is_always_the_counter_increase(
    steps: list[tuple[float, dict[str, float]]],
) -> None:
    """Nothing is lost: every increase is given to a tenant, to UNATTRIBUTED, or waits."""
    ledger = ComputeLedger(hold_s=1.0)
    counter = 0.0
    ledger.note_counter("t0", "m", counter, now=0.0)
    given_s = 0.0
    for second, (growth, work) in enumerate(steps, start=1):
        for tenant, amount in work.items():
            ledger.note_work("m", tenant, amount, now=float(second))
        counter += growth
        ledger.note_counter("t0", "m", counter, now=float(second))
        given_s += sum(sum(a.seconds.values()) for a in ledger.settle(now=float(second) + 0.5))
    total_s = counter / 1e6
    assert given_s + ledger.waiting_s("m") == pytest.approx(total_s, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize(
    ("contended", "share"),
    [
        ([0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0.0),
        ([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], 0.4),  # 40 s run > 30 s threshold
        ([1, 1, 1, 0, 0, 0, 1, 1, 1, 0], 0.0),  # two 30 s runs: not longer than 30 s
        ([0, 0, 0, 0, 0, 0, 1, 1, 1, 1], 0.4),  # a run still going at the end counts
        ([1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 1.0),
    ],
)
def test_sustained_share(contended: list[int], share: float) -> None:
    samples = [(10.0 * i, 5.0 if c else 1.0, 2.0) for i, c in enumerate(contended)]
    assert sustained_share(samples, step_s=10.0, threshold_s=30.0) == pytest.approx(share)


def test_aligned_keeps_the_times_both_series_have() -> None:
    demand = [(30.0, 4.0), (10.0, 1.0), (20.0, 2.0)]
    drain = [(10.0, 3.0), (30.0, 3.0)]
    assert aligned(demand, drain) == [(10.0, 1.0, 3.0), (30.0, 4.0, 3.0)]
