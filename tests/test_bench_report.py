"""What the QoS benchmark counts as met, and its per-token times, on made-up records."""

from __future__ import annotations

from typing import Any

from benchmarks.loadgen import Record
from benchmarks.qos_targets import target_lines, wilson_interval_pct
from benchmarks.report import class_stats, describe_last_over, met, point_stats, recovery_s
from benchmarks.workload import ClassSpec, TenantSpec


def record(latency: float, *, error: str = "", tpot: float | None = None) -> Record:
    return Record("t", "interactive", 0.0, 0.0, 200, 0.01, latency, None, "", error, 10, 20, tpot)


def test_a_stream_that_ended_in_an_error_event_is_not_met_however_fast() -> None:
    assert met(record(0.05), 0.2)
    assert not met(record(0.05, error="stream_error"), 0.2)
    assert not met(record(0.25), 0.2)


def test_time_per_output_token_is_reported_only_for_streamed_requests() -> None:
    streamed = class_stats([record(0.1, tpot=0.002), record(0.1, tpot=0.004)], 0.2, 1.0)
    assert streamed["tpot_ms"]["p50"] == 3.0
    assert "tpot_ms" not in class_stats([record(0.1)], 0.2, 1.0)
    failed = class_stats([record(0.1, error="stream_error", tpot=0.002)], 0.2, 1.0)
    assert failed["slo_met"] == 0 and failed["violation_pct"] == 100.0


def sent(klass: str, at: float, status: int = 200, latency: float | None = 0.1) -> Record:
    error = "timeout" if status == 0 else ""
    return Record("t", klass, at, at, status, latency, latency, None, "", error)


CLASSES = {"interactive": ClassSpec("interactive", 0.2, 1), "batch": ClassSpec("batch", 10, 3)}


def test_what_ended_after_the_points_last_request_is_met_but_not_within_the_point() -> None:
    """A 10 s point that ends at 11.5 s (after a 1.5 s warm-up): a batch request sent at 11 s
    and answered 6 s later met its 10 s deadline, but in the drain after the point; the
    interactive request answered at 11.4 s ended within it; a late one counts in neither."""
    records = [
        sent("interactive", 11.0, latency=0.1),  # met, ends at 11.1 s: in the point
        sent("interactive", 5.0, latency=0.3),  # late (deadline 0.2 s)
        sent("batch", 11.0, latency=6.0),  # met, ends at 17 s: after the point
        sent("batch", 3.0, latency=2.0),  # met, ends at 5 s: in the point
    ]
    tenants = [TenantSpec("t", 1.0, 1.0, ("interactive", "batch"))]
    stats = point_stats(records, CLASSES, tenants, {}, 10.0, 1.0, ends_s=11.5)
    assert stats["overall"]["slo_met_over_c"] == 0.3  # three met, over 10 s and C = 1
    assert stats["overall"]["slo_met_in_point_over_c"] == 0.2  # two of them ended by 11.5 s
    unmeasured = point_stats(records, CLASSES, tenants, {}, 10.0, 1.0)
    assert unmeasured["overall"]["slo_met_in_point_over_c"] is None


def test_recovery_says_which_class_held_it_back_and_how_it_missed() -> None:
    """Step from 10 s to 20 s, run to 30 s. Interactive is fine once the step is over; batch
    is shed until 24 s (and one request times out at 23.5 s): recovery is 24 s after the end of
    the step's last window over 1%, and the report names batch and its 503s."""
    records = []
    for i in range(300):
        t = i * 0.1
        records.append(sent("interactive", t, latency=0.5 if 10 <= t < 20 else 0.1))
        if 20 <= t < 24 and i % 2:
            status = 0 if abs(t - 23.5) < 0.01 else 503
            records.append(sent("batch", t, status, None))
        else:
            records.append(sent("batch", t))
    rec = recovery_s(records, CLASSES, 10.0, 20.0, 30.0)
    assert rec["recovery_s"] == 4.0  # the window [23.75, 24.75) still held the last 503
    last = rec["last_over"]
    assert (last["at_s"], last["class"]) == (3.75, "batch")
    assert last["how"] == {"503": 1} and (last["bad"], last["sent"]) == (1, 10)
    assert describe_last_over(last) == "last over at +3.75 s: batch 1 of 10 missed (1 503)"
    # A second earlier, the timeout is in the window too, and counted as such.
    earlier = recovery_s(records[: 2 * 238], CLASSES, 10.0, 20.0, 23.8)
    assert earlier["recovery_s"] is None  # still over at the end of that run
    assert earlier["last_over"]["how"] == {"503": 4, "timeout": 1}  # [22.75, 23.75)
    # Nothing over the threshold after the step: recovered at once, nothing to name.
    calm = [r for r in records if not (r.klass == "batch" and r.status != 200)]
    calm_rec = recovery_s(calm, CLASSES, 10.0, 20.0, 30.0)
    assert calm_rec["recovery_s"] == 0.0 and "last_over" not in calm_rec


def test_a_class_refused_before_the_step_does_not_excuse_another_after_it() -> None:
    """Batch was shed half the time before the step (its threshold 50%); interactive was fine
    (1%). Interactive late until 25 s is not recovered at 22 s however bad batch was before."""
    classes = CLASSES | {"batch": ClassSpec("batch", 2.0, 3)}  # its level: sent in [4, 8)
    records = []
    for i in range(300):
        t = i * 0.1
        late = 10 <= t < 25 and i % 2 == 0
        records.append(sent("interactive", t, latency=0.5 if late else 0.1))
        shed = t < 10 and i % 2 == 1
        records.append(sent("batch", t, 503, None) if shed else sent("batch", t, latency=1.0))
    rec = recovery_s(records, classes, 10.0, 20.0, 30.0)
    assert rec["threshold_pct"] == {"interactive": 1.0, "batch": 50.0}
    assert rec["last_over"]["class"] == "interactive" and rec["last_over"]["how"] == {"late": 1}
    assert rec["recovery_s"] == 5.0  # [24.75, 25.75) held the last late one (sent at 24.8)


def test_a_class_level_before_the_step_leaves_out_what_the_step_made_late() -> None:
    """100 requests a second. Interactive (deadline 0.2 s) met everything sent before 9.85 s;
    what it sent in the 0.15 s before the 10 s step ran into the step and was late. Its own
    level is 0%, not 15 of 400 (3.75%), so two late at 25 s (2 of 100 in a window) keep it
    from having recovered until the window past them. Batch's deadline (10 s) is longer than
    the 4 s before the step: it has no level of its own there, and is held to 1% (it too was
    late just before the step)."""
    records = []
    for i in range(3000):
        t = i * 0.01
        hurt = 9.85 <= t < 20 or 25 <= t < 25.015
        records.append(sent("interactive", t, latency=0.5 if hurt else 0.1))
        records.append(sent("batch", t, latency=20.0 if 8 <= t < 10 else 1.0))
    rec = recovery_s(records, CLASSES, 10.0, 20.0, 30.0)
    assert rec["violation_before_pct"] == {"interactive": 0.0}
    assert rec["threshold_pct"] == {"interactive": 1.0, "batch": 1.0}
    assert rec["last_over"]["class"] == "interactive" and rec["last_over"]["bad"] == 2
    assert rec["recovery_s"] == 5.25  # [25, 26) is the last window that holds them
    # Two runs of that step pooled (the seeds of a run): the same, with twice the requests.
    pooled = recovery_s(records + records, CLASSES, 10.0, 20.0, 30.0)
    assert pooled["recovery_s"] == 5.25 and pooled["last_over"]["sent"] == 200


def test_the_recovery_target_line_gives_each_seed_and_whether_they_straddle_the_goal() -> None:
    step = {"recovery_s": 2.5, "after_s": 10, "seeds": [0.0, 2.5]}
    results = {
        "meta": {"capacity_rps": 10.0, "noisy_tenant": "n", "tenants": []},
        "systems": {"sidecar-http": {"points": [], "step": step}},
    }
    line = next(x for x in target_lines(results) if x.startswith("TARGET recovery"))
    assert line == (
        "TARGET recovery_after_step[sidecar-http]: 2.5 s (seeds pooled; each alone: 0.0 s,"
        " 2.5 s) (<= 3 s) met"
    )
    step["seeds"] = [0.0, None]  # one seed not back within the 10 s observed
    line = next(x for x in target_lines(results) if x.startswith("TARGET recovery"))
    assert "each alone: 0.0 s, > 10 s); seeds on both sides of the goal" in line
    assert line.endswith(" met")  # judged on the pooled records, as a point is


def test_the_recovery_target_line_names_what_held_it_back() -> None:
    last = {"at_s": 3.75, "class": "batch", "bad": 2, "sent": 13, "how": {"503": 1, "timeout": 1}}
    results = {
        "meta": {"capacity_rps": 10.0, "noisy_tenant": "n", "tenants": []},
        "systems": {
            "sidecar-http": {
                "points": [],
                "step": {"recovery_s": 4.0, "after_s": 10, "last_over": last},
            }
        },
    }
    line = next(x for x in target_lines(results) if x.startswith("TARGET recovery"))
    assert line == (
        "TARGET recovery_after_step[sidecar-http]: 4.0 s; last over at +3.75 s: batch 2 of 13"
        " missed (1 503, 1 timeout) (<= 3 s) missed"
    )
    # 2 of 13 is 4.3-42.2% (95%): clear of a 1% threshold, not of a 5% one (the class missed
    # 5% before the step), where the window may be that level's noise. The verdict stays.
    step = results["systems"]["sidecar-http"]["step"]
    for threshold, said in ((1.0, ""), (5.0, "; 95% interval 4.33-42.24%, which holds")):
        step["threshold_pct"] = {"batch": threshold}
        line = next(x for x in target_lines(results) if x.startswith("TARGET recovery"))
        assert line.endswith(" (<= 3 s) missed")
        assert (said in line) if said else ("interval" not in line)
    assert "its class's threshold 5%: the count allows no claim either way" in line


def test_the_noisy_tenant_line_names_the_worst_quiet_tenant_and_its_counts() -> None:
    """Two quiet tenants within their quotas at 1x: the worse one is named with how many of
    its requests missed (2 of 58 is 3.45%: one miss fewer would still be over 1%). Results
    written before the counts were kept give the share alone."""
    tenants = [
        {"name": "n", "share": 0.5, "quota_rps": None},
        {"name": "big", "share": 0.4, "quota_rps": None},
        {"name": "small", "share": 0.1, "quota_rps": None},
    ]
    point = {
        "m": 1.0,
        "tenants": {
            "n": {"violation_pct": 40.0, "sent": 290, "violations": 116},
            "big": {"violation_pct": 0.5, "sent": 232, "violations": 1},
            "small": {"violation_pct": 3.448, "sent": 58, "violations": 2},
        },
    }
    results = {
        "meta": {"capacity_rps": 29.0, "noisy_tenant": "n", "tenants": tenants},
        "systems": {"sidecar-http": {"points": [point]}},
    }
    line = next(x for x in target_lines(results) if x.startswith("TARGET noisy"))
    assert line == (
        "TARGET noisy_tenant[sidecar-http]: worst other tenant small 3.45% (2 of 58) at 1x;"
        " 95% interval 0.95-11.73%: the count allows no claim either way;"
        " every quiet tenant together 3 of 290 (1.03%) (<= 1%) missed"
    )
    for numbers in point["tenants"].values():
        del numbers["sent"], numbers["violations"]
    line = next(x for x in target_lines(results) if x.startswith("TARGET noisy"))
    assert "worst other tenant small 3.45% at 1x (<= 1%) missed" in line


def test_the_noisy_tenant_line_claims_only_what_its_count_allows() -> None:
    """Judged on the share either way; the note comes only where the 95% interval of the
    count holds 1%: 30 of 1,000 and 1 of 1,000 allow a claim, 3 of 400 does not."""
    tenants = [{"name": "n", "share": 0.5, "quota_rps": None}]
    tenants.append({"name": "q", "share": 0.5, "quota_rps": None})
    for misses, sent, verdict, note in (
        (30, 1000, "missed", False),
        (1, 1000, "met", False),
        (3, 400, "met", True),
    ):
        pct = 100 * misses / sent
        point = {
            "m": 1.0,
            "tenants": {
                "n": {"violation_pct": 40.0, "sent": 100, "violations": 40},
                "q": {"violation_pct": pct, "sent": sent, "violations": misses},
            },
        }
        results = {
            "meta": {"capacity_rps": 29.0, "noisy_tenant": "n", "tenants": tenants},
            "systems": {"sidecar-http": {"points": [point]}},
        }
        line = next(x for x in target_lines(results) if x.startswith("TARGET noisy"))
        assert line.endswith(f"(<= 1%) {verdict}"), line
        assert ("no claim either way" in line) is note, line


def test_the_wilson_interval_matches_known_values() -> None:
    """Published values of the 95% Wilson interval: 1 of 54, 0 of 1,000, half of 100."""
    low, high = wilson_interval_pct(1, 54)
    assert (round(low, 2), round(high, 2)) == (0.33, 9.77)
    low, high = wilson_interval_pct(0, 1000)
    assert (low, round(high, 3)) == (0.0, 0.383)
    low, high = wilson_interval_pct(50, 100)
    assert (round(low, 1), round(high, 1)) == (40.4, 59.6)


def test_the_noisy_tenant_is_judged_in_the_noisy_point_where_the_run_has_one() -> None:
    """The sweep's 1x point (no miss, the noisy tenant within its quota) is not where the line
    judges when the run has a noisy point: there the quiet tenant missed 3 of 300 while the
    noisy tenant was refused 120 over its quota."""
    tenants = [
        {"name": "n", "share": 0.5, "quota_rps": 10.0},
        {"name": "q", "share": 0.5, "quota_rps": 20.0},
    ]
    at_1x = {
        "m": 1.0,
        "tenants": {
            "n": {"violation_pct": 0.0, "sent": 100, "violations": 0, "shed_429": 0},
            "q": {"violation_pct": 0.0, "sent": 100, "violations": 0, "shed_429": 0},
        },
    }
    noisy = {
        "m": 2.0,
        "burst": 3.0,
        "tenants": {
            "n": {"violation_pct": 40.0, "sent": 300, "violations": 120, "shed_429": 120},
            "q": {"violation_pct": 1.0, "sent": 300, "violations": 3, "shed_429": 0},
        },
    }
    system: dict[str, Any] = {"points": [at_1x], "noisy": noisy}
    results = {
        "meta": {"capacity_rps": 20.0, "noisy_tenant": "n", "tenants": tenants},
        "systems": {"sidecar-http": system},
    }
    line = next(x for x in target_lines(results) if x.startswith("TARGET noisy"))
    assert line.startswith(
        "TARGET noisy_tenant[sidecar-http]: worst other tenant q 1.00% (3 of 300) in the noisy"
        " point (the noisy tenant at 3x its rate, the others at their 1x rates)"
    ), line
    assert "the noisy tenant got 120 of 300 answered 429 there" in line
    assert "; every quiet tenant together 3 of 300 (1.00%)" in line
    assert "; at 1x, every tenant at its usual share, worst q 0.00% (0 of 100)" in line
    assert line.endswith("(<= 1%) met"), line
    noisy["tenants"]["q"] |= {"violation_pct": 1.333, "violations": 4}
    line = next(x for x in target_lines(results) if x.startswith("TARGET noisy"))
    assert line.endswith("(<= 1%) missed"), line
    del system["noisy"]  # results from before the noisy point: the sweep's 1x
    line = next(x for x in target_lines(results) if x.startswith("TARGET noisy"))
    assert "worst other tenant q 0.00% (0 of 100) at 1x" in line
    assert "untested" in line
