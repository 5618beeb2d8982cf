"""The paired comparison of two versions' QoS runs (benchmarks/ab.py): its summary, pure.
A real pair of tiny runs was made by hand when the tool was written (benchmarks/README.md)."""

from __future__ import annotations

from typing import Any

from benchmarks.ab import (
    compare,
    compare_noisy,
    compare_recovery,
    headline,
    noisy_quiet,
    recoveries,
)


def results(violation: float, met: float, in_point: float | None = None) -> dict[str, Any]:
    overall = {"slo_met_over_c": met}
    if in_point is not None:  # a report from before bf52eae has no such key
        overall["slo_met_in_point_over_c"] = in_point
    point = {"m": 2.0, "classes": {"interactive": {"violation_pct": violation}}, "overall": overall}
    baseline = {"m": 2.0, "classes": {"interactive": {"violation_pct": 90.0}},
                "overall": {"slo_met_over_c": 1.0}}  # fmt: skip
    return {"systems": {"sidecar-http": {"points": [point]}, "passthrough": {"points": [baseline]}}}


def test_only_sidecar_systems_are_compared_seed_by_seed() -> None:
    assert headline(results(2.0, 1.5)) == {("sidecar-http", 2.0): (2.0, 1.5, None)}
    runs = {
        "new": {3: headline(results(1.0, 1.6)), 5: headline(results(3.0, 1.7))},
        "base": {3: headline(results(2.0, 1.5)), 5: headline(results(2.5, 1.5)), 7: {}},
    }
    violation, met = compare(runs)  # seed 7 ran only once: not a pair, left out
    assert violation == (
        "sidecar-http 2x interactive viol: new 1.00, 3.00 (mean 2.00%) | base 2.00, 2.50"
        " (mean 2.25%) | new-base -1.00, +0.50 (mean -0.25, signs differ)"
    )
    assert met.endswith("| new-base +0.10, +0.20 (mean +0.15, all one sign)"), met


def test_what_ended_within_the_point_is_compared_where_both_versions_report_it() -> None:
    runs = {
        "new": {3: headline(results(1.0, 1.6, 1.0)), 5: headline(results(1.0, 1.6, 1.1))},
        "base": {3: headline(results(1.0, 1.5, 0.8)), 5: headline(results(1.0, 1.5, 0.9))},
    }
    *_, in_point = compare(runs)
    assert in_point.startswith("sidecar-http 2x SLO-met ended in the point: new 1.00, 1.10")
    assert in_point.endswith("| new-base +0.20, +0.20 (mean +0.20, all one sign)"), in_point
    runs["base"][5] = headline(results(1.0, 1.5))  # that base run did not measure it
    assert [line.split(":")[0] for line in compare(runs)] == [
        "sidecar-http 2x interactive viol",
        "sidecar-http 2x SLO-met",
    ]


def test_recovery_after_the_step_is_compared_pair_by_pair() -> None:
    def stepped(recovery: float | None) -> dict[str, Any]:
        run = results(1.0, 1.5)
        run["systems"]["sidecar-http"]["step"] = {"recovery_s": recovery, "after_s": 10}
        run["systems"]["passthrough"]["step"] = {"recovery_s": None, "after_s": 10}
        return run

    assert recoveries(stepped(2.5)) == {"sidecar-http": 2.5}  # sidecar systems only
    assert recoveries(results(1.0, 1.5)) == {}  # no step run
    runs = {
        "new": {3: recoveries(stepped(3.0)), 5: recoveries(stepped(None)), 7: {}},
        "base": {3: recoveries(stepped(0.75)), 5: recoveries(stepped(6.5)), 7: {}},
    }
    assert compare_recovery(runs) == [
        "sidecar-http recovery: new 3 s, not back | base 0.75 s, 6.5 s | new sooner in 0, later"
        " in 2, the same in 0 of 2 pairs"
    ]


def test_the_noisy_points_quiet_tenants_are_compared_pooled_seed_by_seed() -> None:
    def noisy(quiet_missed: int, noisy_missed: int = 50) -> dict[str, Any]:
        run = results(1.0, 1.5)
        tenants = {
            "noisy": {"sent": 100, "violations": noisy_missed},
            "t1": {"sent": 150, "violations": quiet_missed},
            "t2": {"sent": 50, "violations": 1},
        }
        run["systems"]["sidecar-http"]["noisy"] = {"tenants": tenants, "m": 1.8, "burst": 3.0}
        run["systems"]["passthrough"]["noisy"] = {"tenants": tenants, "m": 1.8, "burst": 3.0}
        run["meta"] = {"noisy_tenant": "noisy"}
        return run

    # The noisy tenant's own misses are left out: (3 + 1) of 200, sidecar systems only.
    assert noisy_quiet(noisy(3, noisy_missed=99)) == {"sidecar-http": 2.0}
    assert noisy_quiet(results(1.0, 1.5)) == {}  # no noisy point (--noisy-burst 0)
    runs = {
        "new": {3: noisy_quiet(noisy(1)), 5: noisy_quiet(noisy(3))},
        "base": {3: noisy_quiet(noisy(5)), 5: noisy_quiet(noisy(7)), 7: noisy_quiet(noisy(0))},
    }
    (line,) = compare_noisy(runs)
    assert line == (
        "sidecar-http noisy point, quiet tenants pooled: new 1.00, 2.00 (mean 1.50%) | base"
        " 3.00, 4.00 (mean 3.50%) | new-base -2.00, -2.00 (mean -2.00, all one sign)"
    )
