"""Each class's time upstream on each model, and the hold budget it leaves (core/upstream.py,
core.signals.hold_budget). Pure."""

from __future__ import annotations

from dataclasses import replace

from sidecar.core.signals import hold_budget
from sidecar.core.upstream import KEPT, MAX_KEPT, MIN_SEEN, UpstreamTimes
from sidecar.policy.model import ClassPolicy, FailMode, OverloadPolicy

INTERACTIVE = ClassPolicy(
    "interactive", 1, 225, 90, 1, FailMode.OPEN, overload=OverloadPolicy(4, 16)
)


def test_the_lower_quartile_of_the_last_ones_is_known_after_a_few() -> None:
    times = UpstreamTimes()
    for i in range(MIN_SEEN - 1):
        times.took("llm", "interactive", 0.1 + i / 100)
    assert times.of("llm") == {}  # too few to say
    times.took("llm", "interactive", 0.5)
    # Eight: 0.10 .. 0.16 and 0.5; the nearest rank of a quarter is the second, 0.11.
    assert times.of("llm") == {"interactive": 0.1 + (MIN_SEEN - 1) // 4 / 100}
    assert MIN_SEEN == 8
    for _ in range(KEPT):  # only the last KEPT count: the model got slower
        times.took("llm", "interactive", 0.2)
    assert times.of("llm") == {"interactive": 0.2}
    assert times.of("other") == {}


def test_a_class_and_a_model_are_their_own() -> None:
    times = UpstreamTimes()
    for _ in range(MIN_SEEN):
        times.took("llm", "interactive", 0.15)
        times.took("llm", "batch", 3.0)
        times.took("vision", "interactive", 0.01)
    assert times.of("llm") == {"interactive": 0.15, "batch": 3.0}
    assert times.of("vision") == {"interactive": 0.01}


def test_model_names_from_requests_cannot_grow_it_without_bound() -> None:
    times = UpstreamTimes()
    for i in range(MAX_KEPT + 10):
        times.took(f"model-{i}", "interactive", 0.1)
    assert len(times._times) <= MAX_KEPT


def test_the_hold_budget_leaves_the_class_time_upstream_within_the_objective() -> None:
    # Unknown: the policy's max_wait (90 ms).
    assert hold_budget(INTERACTIVE, {})[0] == 0.09
    # 110 ms upstream leaves 115 ms of the 225: more than max_wait, which stands.
    assert hold_budget(INTERACTIVE, {"interactive": 0.11})[0] == 0.09
    # 190 ms upstream leaves 35 ms: held longer, it would miss as three in four did.
    assert abs(hold_budget(INTERACTIVE, {"interactive": 0.19})[0] - 0.035) < 1e-9
    # Slower than the objective: no hold at all.
    assert hold_budget(INTERACTIVE, {"interactive": 0.3})[0] == 0.0
    # Another class's time says nothing of this one's.
    assert hold_budget(INTERACTIVE, {"batch": 30.0})[0] == 0.09
    assert hold_budget(replace(INTERACTIVE, max_wait_ms=0), {"interactive": 0.01})[0] == 0.0
