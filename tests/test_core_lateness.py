"""The lateness limit (core/lateness.py): at which queue depths a class's requests sent at once
have lately ended late more often than not. Pure: a frozen clock, no event loop."""

from __future__ import annotations

from collections import deque

import pytest

from sidecar.core import lateness
from sidecar.core.lateness import HORIZONS, MIN_SEEN, Lateness


def sent_and_ended(
    tracker: Lateness,
    outcomes: list[tuple[int, bool]],
    now: float = 0.0,
    klass: str = "i",
    *,
    beneath: bool = False,
) -> None:
    """`beneath`: first one sent at depth 0 that ended on time (a limit needs such: rule 2)."""
    for n, (depth, late) in enumerate([(0, False)] * beneath + outcomes):
        lease = f"{klass}-{now}-{n}"
        tracker.sent(lease, "llm", klass, depth, now)
        tracker.ended(lease, late, now, 1.0)


def test_the_limit_is_where_most_requests_sent_at_once_ended_late() -> None:
    tracker = Lateness()
    on_time = [(depth, False) for depth in range(8) for _ in range(3)]
    late = [(depth, True) for depth in range(10, 16) for _ in range(3)]
    sent_and_ended(tracker, on_time + late + [(8, False), (9, True)])
    assert tracker.of("llm", 0.0) == {"i": 9}
    assert tracker.of("other", 0.0) == {}


def test_no_limit_while_most_are_on_time_or_too_few_were_seen() -> None:
    tracker = Lateness()
    sent_and_ended(tracker, [(depth, depth % 3 == 0) for depth in range(16)])  # a third late
    assert tracker.of("llm", 0.0) == {}
    few = Lateness()
    sent_and_ended(few, [(15, True)] * (MIN_SEEN - 1), beneath=True)
    assert few.of("llm", 0.0) == {}
    sent_and_ended(few, [(15, True)])
    assert few.of("llm", 0.0) == {"i": 15}


def test_a_few_on_time_deep_or_shallow_do_not_move_the_limit_across_many_late() -> None:
    """Lateness is taken to grow with depth (adjacent violators pooled): two lucky requests at
    depth 14 do not lift the limit above depths 10-13, where most ended late, and five on
    time at depth 0 do not pull it down to 0 beside twenty late at 15."""
    tracker = Lateness()
    sent_and_ended(tracker, [(d, True) for d in (10, 11, 12, 13) for _ in range(4)])
    sent_and_ended(tracker, [(14, False), (14, False), (3, False), (4, False)], klass="i")
    assert tracker.of("llm", 0.0) == {"i": 10}
    sparse = Lateness()
    sent_and_ended(sparse, [(0, False)] * 5 + [(15, True)] * 20)
    assert sparse.of("llm", 0.0) == {"i": 15}


def test_the_limit_lifts_once_its_outcomes_are_older_than_ten_objectives() -> None:
    tracker = Lateness()
    sent_and_ended(tracker, [(12, True)] * 10, now=0.0, beneath=True)  # objective 1 s
    assert tracker.of("llm", HORIZONS) == {"i": 12}
    assert tracker.of("llm", HORIZONS + 0.1) == {}  # nothing sent there since: try again


def test_only_the_noted_and_judged_count() -> None:
    tracker = Lateness()
    for n in range(10):
        tracker.ended(f"never-sent-{n}", True, 0.0, 1.0)  # another replica's, or restarted
        tracker.sent(f"unjudged-{n}", "llm", "i", 12, 0.0)
        tracker.ended(f"unjudged-{n}", None, 0.0, 1.0)  # Envoy did not say how long it took
    assert tracker.of("llm", 0.0) == {}
    tracker.ended("unjudged-0", True, 0.0, 1.0)  # an end is counted once
    assert tracker.of("llm", 0.0) == {}


def test_memory_is_bounded_by_names_from_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lateness, "MAX_KEPT", 3)
    monkeypatch.setattr(lateness, "MAX_PENDING", 5)
    tracker = Lateness()
    for n in range(5):  # five models: past three every entry is forgotten
        tracker.sent(f"m{n}-beneath", f"m{n}", "i", 0, 0.0)
        tracker.ended(f"m{n}-beneath", False, 0.0, 1.0)
        for k in range(MIN_SEEN):
            tracker.sent(f"m{n}-{k}", f"m{n}", "i", 12, 0.0)
            tracker.ended(f"m{n}-{k}", True, 0.0, 1.0)
    assert tracker.of("m0", 0.0) == {}
    assert tracker.of("m4", 0.0) == {"i": 12}
    for n in range(7):
        tracker.sent(f"lost-{n}", "m4", "i", 1, 0.0)  # ends never heard: forgotten past five
    tracker.ended("lost-0", False, 0.0, 1.0)
    tracker.ended("lost-6", False, 0.0, 1.0)
    assert len(tracker._outcomes[("m4", "i")].kept) == MIN_SEEN + 2


def test_a_limit_short_of_evidence_is_probed_and_holds_while_its_probes_end_late() -> None:
    """Rule 4: before the outcomes at or over the limit age out and it lifts by itself, the
    next arrivals there are sent as probes, up to twice MIN_SEEN evidence with those out;
    late probes keep the limit, on-time ones lift it. Objective 1 s: horizon 10 s."""
    tracker = Lateness()
    sent_and_ended(tracker, [(12, True)] * MIN_SEEN, now=0.0)
    sent_and_ended(tracker, [(12, True)] * MIN_SEEN, now=5.0, beneath=True)
    assert tracker.enforced("llm", 5.0) == {"i": 12}  # sixteen at or over it: enforced
    assert tracker.of("llm", 10.5) == {"i": 12} and tracker.enforced("llm", 10.5) == {}
    for n in range(MIN_SEEN):  # probes go out: evidence and probes make sixteen again
        tracker.sent(f"probe-{n}", "llm", "i", 12 + n, 10.5)
    assert tracker.enforced("llm", 10.5) == {"i": 12}
    tracker.sent("under", "llm", "i", 3, 10.5)  # under the limit: no probe
    assert tracker._outcomes[("llm", "i")].probes == deque([10.5] * MIN_SEEN)
    for n in range(MIN_SEEN):
        tracker.ended(f"probe-{n}", True, 11.0, 1.0)  # late: the limit holds past 15 s
    sent_and_ended(tracker, [], now=11.0, beneath=True)
    assert tracker.of("llm", 15.5) == {"i": 12}
    assert tracker.enforced("llm", 15.5) == {}  # and is probed again
    probed = Lateness()
    sent_and_ended(probed, [(12, True)] * MIN_SEEN, now=0.0, beneath=True)
    sent_and_ended(probed, [(12, False)] * MIN_SEEN, now=9.0)  # probes on time: 8 of 16 late
    assert probed.of("llm", 9.0) == {}


def test_a_probe_whose_end_is_never_heard_counts_for_one_horizon() -> None:
    tracker = Lateness()
    sent_and_ended(tracker, [(12, True)] * MIN_SEEN, now=0.0, beneath=True)
    assert tracker.enforced("llm", 0.0) == {}  # eight: probed at once
    for n in range(MIN_SEEN):
        tracker.sent(f"lost-{n}", "llm", "i", 12, 1.0)
    assert tracker.enforced("llm", 1.0) == {"i": 12}  # eight kept and eight probes out
    assert tracker.enforced("llm", 10.5) == {}  # the kept ones aged out: the limit lifted
    sent_and_ended(tracker, [(12, True)] * MIN_SEEN, now=10.5, beneath=True)
    assert tracker.enforced("llm", 10.5) == {"i": 12}  # the lost probes still count ...
    assert tracker.enforced("llm", 11.5) == {}  # ... for one horizon, then probe again


def test_no_limit_when_requests_sent_at_the_shallowest_depth_ended_late_too() -> None:
    """Rule 2b: late at every depth seen, from an empty queue on (a long batch ahead of them,
    not the queue, made them late), there is no depth to shed from: shedding every arrival
    only idles the model. On-time outcomes beneath the late ones make the limit again."""
    tracker = Lateness()
    sent_and_ended(tracker, [(depth, True) for depth in range(12) for _ in range(2)])
    assert tracker.of("llm", 0.0) == {}
    deep = Lateness()  # nothing shallower seen than the late ones either
    sent_and_ended(deep, [(12, True)] * (2 * MIN_SEEN))
    assert deep.of("llm", 0.0) == {}
    sent_and_ended(deep, [(3, False)])
    assert deep.of("llm", 0.0) == {"i": 12}
