"""The benchmark's reading of the autoscaling signal (benchmarks/demand_probe.py), on
recorded samples."""

from __future__ import annotations

from benchmarks.demand_probe import caps_text, describe, report_md, step_signal

PHASES = ((10.0, 1.0), (20.0, 3.0), (10.0, 1.0))  # step up at 10 s, down at 30 s, end at 40 s
T0 = 500.0


def samples(ratios: list[tuple[float, float]]) -> list[tuple[float, float, float, float]]:
    return [(T0 + t, ratio, ratio * 10.0, 10.0) for t, ratio in ratios]


def test_rise_and_fall_count_from_when_the_ratio_stayed_on_its_new_side() -> None:
    at_1x = [(6, 0.98), (8, 1.02), (9.5, 0.99)]  # around 1
    at_3x = [(11, 1.05), (12, 0.99), (13, 1.04), (15, 1.3), (20, 2.4), (29, 2.8)]
    after = [(31, 2.7), (34, 1.2), (36, 1.05), (37, 0.97), (38, 1.01), (39, 0.96), (40, 0.95)]
    recorded = samples([*at_1x, *at_3x, *after])
    signal = step_signal(recorded, T0, PHASES)
    by_level = {c["threshold"]: c for c in signal["crossings"]}
    assert by_level[1.0] == {"threshold": 1.0, "rose_after_s": 3.0, "fell_after_s": 9.0}
    assert by_level[1.1] == {"threshold": 1.1, "rose_after_s": 5.0, "fell_after_s": 6.0}
    assert signal["ratio_before_step"] == round((0.98 + 1.02 + 0.99) / 3, 3)
    assert signal["ratio_peak"] == 2.8 and signal["ratio_at_end"] == 0.95
    text = describe(signal, PHASES)
    assert "signal rose above 1 after 3 s from the 1x->3x step" in text
    assert "fell below 1 9 s after the 3x->1x step" in text


def test_a_ratio_that_never_settles_is_said_so() -> None:
    recorded = samples([(5, 1.0), (15, 1.5), (25, 0.9), (35, 1.4), (40, 1.3)])
    signal = step_signal(recorded, T0, PHASES)
    assert all(c["rose_after_s"] is None for c in signal["crossings"])  # fell back at 25 s
    assert all(c["fell_after_s"] is None for c in signal["crossings"])
    assert "not below 1 within the 10 s after the 3x->1x step" in describe(signal, PHASES)


def test_the_report_section_lists_the_systems_that_have_one() -> None:
    results = {
        "systems": {
            "passthrough": {"step": {"recovery_s": 1.0}},
            "sidecar-http": {"step": {"demand_signal_text": "signal rose above 1 after 2 s"}},
        }
    }
    section = report_md(results)
    assert "- `sidecar-http`: signal rose above 1 after 2 s" in section
    assert "passthrough" not in section
    assert report_md({"systems": {"passthrough": {}}}) == ""


def test_the_caps_are_told_as_medians_per_phase_leaving_out_a_cap_that_did_not_bind() -> None:
    series = [
        (2.0, {"cap:batch": None, "held": 0}),  # before half of the 1x phase: not counted
        (6.0, {"cap:batch": 8, "held": 1}),
        (8.0, {"cap:batch": None, "held": 3}),  # did not bind: not in the cap's median
        (9.0, {"cap:batch": 12, "held": 2}),
        (15.0, {"cap:batch": 1, "held": 90}),
        (25.0, {"cap:batch": 3, "held": 120}),
        (29.0, {"cap:batch": 2, "held": 100}),
        (31.0, {"cap:batch": 4, "held": 20}),
    ]
    text = caps_text(series, PHASES)
    assert text == (
        "before the step: batch 12, held 2; in the 3x phase: batch 2, held 100;"
        " 0-10 s after it: batch 4, held 20"
    )
    assert caps_text([], PHASES) == ""
    results = {
        "systems": {"s": {"step": {"demand_signal_text": "x", "caps": series, "phases": PHASES}}}
    }
    assert "- `s`: before the step: batch 12" in report_md(results)
