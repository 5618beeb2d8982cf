"""Adaptive caps (sidecar/core/protect.py): pure, the clock is a number."""

from __future__ import annotations

from dataclasses import replace

import pytest

from sidecar.core.admission import LoadAction, judge_load
from sidecar.core.load import SignalState
from sidecar.core.protect import (
    DECREASE,
    MAX_PERIODS,
    MIN_SAMPLES,
    TARGET,
    Protection,
    shares_for,
)
from sidecar.core.signals import cap_of
from sidecar.policy.model import ClassPolicy, ModelPolicy, OverloadPolicy, Policy, Protect

INTERACTIVE = ClassPolicy(
    "interactive",
    rank=1,
    latency_objective_ms=200,
    max_wait_ms=50,
    triton_priority=1,
    overload=OverloadPolicy(16, 64),
)
BATCH = ClassPolicy(
    "batch",
    rank=3,
    latency_objective_ms=20000,
    max_wait_ms=4000,
    triton_priority=3,
    overload=OverloadPolicy(4, 32, max_in_flight=4, protect=Protect.BALANCED),
)
CLASSES = (INTERACTIVE, BATCH)
SHARES = {"batch": TARGET[Protect.BALANCED]}
PERIOD_S = 0.2  # the interactive objective


def caps(p: Protection, now_s: float) -> int | None:
    return p.caps("llm", CLASSES, SHARES, now_s)["batch"]


def test_the_cap_binds_only_while_a_better_class_sends_the_model_work() -> None:
    p = Protection()
    assert caps(p, 0.0) is None  # nobody to protect: full batches
    p.arrived("llm", INTERACTIVE, 0, None, 0.0)
    assert caps(p, 0.05) == 4  # at its floor, max_in_flight
    # Another model's interactive work does not bind this model's cap.
    assert p.caps("resnet", CLASSES, SHARES, 0.05)["batch"] is None
    # Arrivals every 0.1 s: expected for 4 gaps (0.4 s) after the last one.
    for i in range(1, 11):
        p.arrived("llm", INTERACTIVE, 0, None, i * 0.1)
    assert caps(p, 1.0 + 0.39) == 4
    assert caps(p, 1.0 + 0.41) is None


def period(p: Protection, now: float, share: float, *, held_back: bool = True) -> float:
    """One period: interactive arrives and MIN_SAMPLES of it complete at `share` of their
    objective; batch arrives at (held back) or under its cap. Returns the next period's
    start."""
    p.arrived("llm", INTERACTIVE, 3, None, now)
    cap = caps(p, now)
    assert cap is not None
    p.arrived("llm", BATCH, cap if held_back else cap - 1, cap, now)
    for _ in range(MIN_SAMPLES):
        p.completed("llm", INTERACTIVE, share * INTERACTIVE.latency_objective_ms / 1000, now)
    return now + PERIOD_S


def test_the_cap_grows_while_it_holds_the_class_back_and_latency_is_fine() -> None:
    p = Protection()
    now, seen = 0.0, []
    for _ in range(10):
        seen.append(caps(p, now) or 0)
        now = period(p, now, 0.5)  # under balanced's 0.8
    assert seen[0] == 0  # nobody to protect yet
    assert seen[1] >= 4 and seen[1:] == sorted(seen[1:]) and seen[-1] > 8


def test_the_cap_stays_when_nothing_pushes_against_it() -> None:
    p = Protection()
    now = 0.0
    for _ in range(10):
        now = period(p, now, 0.2, held_back=False)
        assert caps(p, now) == 4


def test_too_few_samples_wait_for_more_but_not_forever() -> None:
    p = Protection()
    p.arrived("llm", INTERACTIVE, 0, None, 0.0)
    assert caps(p, 0.0) == 4
    p.arrived("llm", BATCH, 4, 4, 0.0)
    p.completed("llm", INTERACTIVE, 0.01, 0.0)  # one sample: no step after one period
    p.arrived("llm", INTERACTIVE, 0, None, PERIOD_S)
    assert caps(p, PERIOD_S) == 4
    later = MAX_PERIODS * PERIOD_S + 0.01  # five periods on: step on what there is
    p.arrived("llm", INTERACTIVE, 0, None, later)
    assert caps(p, later) == 5


def one_period(p: Protection, now: float, shares: list[float]) -> float:
    """Interactive completes at each of `shares` of its objective while batch is held back at
    its cap. Returns the batch cap one period later."""
    p.arrived("llm", INTERACTIVE, 3, None, now)
    cap = caps(p, now) or 0
    p.arrived("llm", BATCH, cap, cap, now)
    for share in shares:
        p.completed("llm", INTERACTIVE, share * INTERACTIVE.latency_objective_ms / 1000, now)
    later = now + 1.01 * PERIOD_S  # one period on, whatever the sums of floats round to
    p.arrived("llm", INTERACTIVE, 3, None, later)
    return caps(p, later) or 0


def grown() -> tuple[Protection, float, int]:
    """A cap grown for eight periods, its last period closed: (protection, now, cap)."""
    p = Protection()
    now = 0.0
    for _ in range(8):
        now = period(p, now, 0.1)
    now += 0.01 * PERIOD_S
    return p, now, caps(p, now) or 0


def test_the_95th_percentile_of_twenty_is_the_nineteenth_not_the_largest() -> None:
    """One share of 20 over the target is the 5% the preset allows: the cap grows. The largest
    of 20 would step on a 98th percentile and sit lower than the preset says."""
    fine = [0.5] * (MIN_SAMPLES - 1)
    assert one_period(Protection(), 0.0, [*fine, 0.95]) == 5  # from its floor 4
    assert one_period(Protection(), 0.0, [*fine[:-1], 0.95, 0.95]) == 4  # two: cut (floor)
    p, now, high = grown()
    assert one_period(p, now, [*fine[:-1], 0.95, 0.95]) <= high * DECREASE


def test_a_period_whose_outcome_is_known_ends_without_waiting_for_more() -> None:
    """Two of three over the target after one objective: no twenty shares could put the 95th
    percentile back under it, so the cap comes down now."""
    p, now, high = grown()
    assert high > 8
    assert one_period(p, now, [0.5, 0.95, 0.95]) <= high * DECREASE
    # One of three over: not known yet, the period waits for more.
    q, now, high = grown()
    assert one_period(q, now, [0.5, 0.5, 0.95]) == high


def test_a_better_class_near_its_objective_cuts_the_cap_down_to_the_floor() -> None:
    p = Protection()
    now = period(p, 0.0, 0.1)
    for _ in range(12):  # grow it first
        now = period(p, now, 0.1)
    high = caps(p, now) or 0
    assert high > 10
    now = period(p, now, 0.85)  # 95% of them at 85% of their objective: over balanced's 80%
    assert (caps(p, now) or 0) <= high * DECREASE
    for _ in range(20):
        now = period(p, now, 2.0)  # missing
    assert caps(p, now) == 4  # never below the floor


def test_a_lower_class_latency_does_not_move_the_cap() -> None:
    p = Protection()
    now = period(p, 0.0, 0.1)
    start = caps(p, now) or 0
    p.arrived("llm", BATCH, start, start, now)
    for _ in range(MIN_SAMPLES):
        p.completed("llm", BATCH, 30.0, now)  # batch itself late: not what the cap protects
        p.completed("llm", INTERACTIVE, 0.02, now)
    p.arrived("llm", INTERACTIVE, 0, None, now + MAX_PERIODS * PERIOD_S)
    assert (caps(p, now + MAX_PERIODS * PERIOD_S) or 0) > start


@pytest.mark.parametrize(
    ("model_preset", "expected"), [(None, Protect.BALANCED), (Protect.LATENCY, Protect.LATENCY)]
)
def test_a_model_preset_overrides_the_class_preset(
    model_preset: Protect | None, expected: Protect
) -> None:
    policy = Policy(
        "v",
        (),
        classes={"interactive": INTERACTIVE, "batch": BATCH},
        tenants={},
        models={"llm": ModelPolicy("llm", protect=model_preset)},
    )
    assert shares_for(policy, "llm") == {"batch": TARGET[expected]}
    assert shares_for(policy, "other") == {"batch": TARGET[Protect.BALANCED]}


def test_a_class_share_replaces_its_preset_share_and_a_model_preset_overrides_both() -> None:
    shared = replace(BATCH, overload=replace(BATCH.overload, protect_share=0.5))
    policy = Policy(
        "v",
        (),
        classes={"interactive": INTERACTIVE, "batch": shared},
        tenants={},
        models={"llm": ModelPolicy("llm", protect=Protect.THROUGHPUT)},
    )
    assert shares_for(policy, "other") == {"batch": 0.5}
    assert shares_for(policy, "llm") == {"batch": TARGET[Protect.THROUGHPUT]}


def test_a_lower_share_cuts_the_cap_where_the_preset_lets_it_grow() -> None:
    """Interactive at 70% of its objective: under balanced's 80%, over a share of 60%."""

    def run(share: float) -> list[int]:
        p, now, seen = Protection(), 0.0, []
        for _ in range(8):
            p.arrived("llm", INTERACTIVE, 3, None, now)
            cap = p.caps("llm", CLASSES, {"batch": share}, now)["batch"]
            assert cap is not None
            seen.append(cap)
            p.arrived("llm", BATCH, cap, cap, now)  # held back at its cap
            for _ in range(MIN_SAMPLES):
                p.completed("llm", INTERACTIVE, 0.7 * INTERACTIVE.latency_objective_ms / 1000, now)
            now += PERIOD_S
        return seen

    grown, held = run(TARGET[Protect.BALANCED]), run(0.6)
    assert grown[-1] > grown[0]
    assert held == [4] * len(held)  # cut at each step, never below its floor


def test_admission_reads_the_adaptive_cap_and_its_absence() -> None:
    fresh = SignalState.FRESH
    # Not binding now (None): 20 in flight, an empty queue, admitted at once.
    lifted = judge_load(BATCH, fresh, 0, 50.0, 0, in_flight=20, caps={"batch": None})
    assert lifted.action is LoadAction.ADMIT
    assert "adaptive cap off" in lifted.why
    capped = judge_load(BATCH, fresh, 0, 50.0, 0, in_flight=20, caps={"batch": 12})
    assert capped.action is LoadAction.DEFER and "(adaptive max 12)" in capped.why
    # Not said (signals built without protection): the floor.
    assert cap_of(BATCH, {}) == 4
    assert cap_of(replace(BATCH, overload=replace(BATCH.overload, max_in_flight=None)), {}) == 1


def test_random_model_names_cannot_grow_what_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    import sidecar.core.protect as protect

    monkeypatch.setattr(protect, "MAX_KEPT", 8)
    p = Protection()
    for i in range(50):
        p.arrived(f"m{i}", INTERACTIVE, 0, None, 0.0)
        p.caps(f"m{i}", CLASSES, SHARES, 0.0)
    assert len(p._arrivals) <= 8 and len(p._lanes) <= 8


def test_the_queue_thresholds_grow_with_the_cap_above_its_floor() -> None:
    from sidecar.core.signals import effective_overload

    overload = BATCH.overload
    assert overload is not None
    assert effective_overload(BATCH, {"batch": None}) is overload  # not binding
    assert effective_overload(BATCH, {"batch": 4}) is overload  # at its floor
    grown = effective_overload(BATCH, {"batch": 8})  # twice the floor
    assert grown is not None and (grown.admit_below, grown.shed_above) == (8, 64)
    fresh = SignalState.FRESH
    # Queue 6: over the policy's admit_below 4, under the grown 8.
    assert judge_load(BATCH, fresh, 6, 50.0, 0, in_flight=5, caps={"batch": 8}).action is (
        LoadAction.ADMIT
    )
    assert judge_load(BATCH, fresh, 6, 50.0, 0, in_flight=3, caps={"batch": 4}).action is (
        LoadAction.DEFER
    )


STANDARD = ClassPolicy(
    "standard",
    rank=2,
    latency_objective_ms=2000,
    max_wait_ms=500,
    triton_priority=2,
    overload=OverloadPolicy(8, 48, protect=Protect.BALANCED),
)
THREE = (INTERACTIVE, STANDARD, BATCH)
BOTH = {"standard": TARGET[Protect.BALANCED], "batch": TARGET[Protect.BALANCED]}


def test_a_class_far_inside_its_objective_does_not_dilute_one_near_it() -> None:
    """Batch watches interactive and standard: standard's completions, each a small share of
    its own objective, must not outvote interactive's near theirs."""
    p = Protection()
    now = 0.0
    for _ in range(12):  # grow the batch cap while everyone is well inside
        p.arrived("llm", INTERACTIVE, 0, None, now)
        cap = p.caps("llm", THREE, SHARES, now)["batch"] or 0
        p.arrived("llm", BATCH, cap, cap, now)
        for _ in range(MIN_SAMPLES):
            p.completed("llm", INTERACTIVE, 0.02, now)
        now += PERIOD_S
    high = p.caps("llm", THREE, SHARES, now)["batch"] or 0
    assert high > 8
    # One interactive request in ten at 90% of its objective (its 95th percentile over
    # balanced's 80%), while three times as many standard requests finish at 10% of theirs:
    # pooled, the 95th percentile would be an interactive one at 30%.
    p.arrived("llm", INTERACTIVE, 0, None, now)
    p.arrived("llm", BATCH, high, high, now)
    for i in range(MIN_SAMPLES):
        share = 0.9 if i % 10 == 0 else 0.3
        p.completed("llm", INTERACTIVE, share * INTERACTIVE.latency_objective_ms / 1000, now)
    for _ in range(3 * MIN_SAMPLES):
        p.completed("llm", STANDARD, 0.1 * STANDARD.latency_objective_ms / 1000, now)
    now += PERIOD_S
    p.arrived("llm", INTERACTIVE, 0, None, now)
    assert (p.caps("llm", THREE, SHARES, now)["batch"] or 0) <= high * 0.8


def test_a_lower_class_is_never_let_in_where_a_better_protected_one_is_not() -> None:
    p = Protection()
    now = 0.0
    for _ in range(12):  # batch's cap grows (held back, interactive fine); standard's is not
        p.arrived("llm", INTERACTIVE, 0, None, now)  # pushed against, so it stays at 1
        cap = p.caps("llm", THREE, BOTH, now)["batch"] or 0
        p.arrived("llm", BATCH, cap, cap, now)
        for _ in range(MIN_SAMPLES):
            p.completed("llm", INTERACTIVE, 0.02, now)
        now += PERIOD_S
    assert p.learnt("llm")["batch"] > 8 and p.learnt("llm")["standard"] == 1
    # Held to standard's 1, but never below its own floor (max_in_flight 4).
    assert p.caps("llm", THREE, BOTH, now) == {"standard": 1, "batch": 4}
    # Not binding for standard (no class above it protected, nobody above present): batch
    # keeps its own.
    later = now + 60.0
    p.arrived("llm", STANDARD, 0, None, later)
    assert p.caps("llm", THREE, BOTH, later) == {
        "standard": None,
        "batch": p.learnt("llm")["batch"],
    }
