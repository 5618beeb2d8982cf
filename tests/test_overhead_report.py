"""The overhead benchmark's judgement of its own runs (benchmarks/overhead_report.py): a
configuration whose answers were not 200 measured a failure, and no target reads it as met."""

from __future__ import annotations

from typing import Any

from benchmarks.overhead_report import (
    INVALID_SHARE,
    failed_answers,
    idle_lines,
    invalid,
    store_lines,
    target_lines,
)


def _phase(rps: float, p99: float, status: dict[str, int], errors: int = 0) -> dict[str, Any]:
    return {
        "completed": sum(status.values()),
        "errors": errors,
        "connect_errors": 0,
        "status": status,
        "achieved_rps": rps,
        "rate_target": rps,
        "latency_ms": {"p50": p99 / 2, "p90": p99, "p99": p99},
    }


def _row(twin: str | None, rps: float, status: dict[str, int]) -> dict[str, Any]:
    phase = _phase(rps, 2.0, status)
    return {
        "twin": twin,
        "max_rps": rps,
        "max_runs": [phase],
        "half": phase,
        "common": phase,
        "common_rate": 100.0,
        "at_sidecar_half": {},
    }


def _lines(sidecar_status: dict[str, int]) -> list[str]:
    configs = {"F": _row(None, 1000.0, {"200": 5000}), "G": _row("F", 1500.0, sidecar_status)}
    return target_lines(configs, 15.0)


def test_a_configuration_answering_503_is_invalid_and_no_target_reading_it_is_met() -> None:
    """G at 1.5 times its twin's rate, every answer a 503: the ratio would read 1.5, met."""
    (line,) = [t for t in _lines({"503": 7500}) if t.startswith("TARGET extproc_valkey_vs_noop")]
    assert line == (
        "TARGET extproc_valkey_vs_noop: invalid: 22500 of 22500 answers of G were not 200"
        " (22500 503) (>= 0.6) missed"
    )
    (added,) = [t for t in _lines({"503": 7500}) if "at_common_rate_extproc" in t]
    assert "invalid" in added and added.endswith("missed")


def test_a_few_failed_answers_leave_the_run_valid_and_more_do_not() -> None:
    few = round(INVALID_SHARE * 7500) - 1  # per phase, three phases: under the share
    assert failed_answers(_phase(1, 1, {"200": 7500 - few, "503": few})) == (few, 7500)
    (valid,) = [t for t in _lines({"200": 7500 - few, "503": few}) if "extproc_valkey_vs" in t]
    assert valid.startswith("TARGET extproc_valkey_vs_noop: 1.500 (>= 0.6)") and "met" in valid
    many = {"200": 7000, "503": 400, "500": 100}
    configs = {"F": _row(None, 1000.0, {"200": 5000}), "G": _row("F", 1500.0, many)}
    assert invalid(configs, {}, "G") == (
        "invalid: 1500 of 22500 answers of G were not 200 (300 500, 1200 503)"
    )
    assert invalid(configs, {}, "F") is None


def test_errors_and_a_failing_twin_invalidate_the_comparison_too() -> None:
    configs = {"F": _row(None, 1000.0, {"200": 5000}), "G": _row("F", 900.0, {"200": 5000})}
    configs["F"]["common"] = _phase(1000.0, 2.0, {"200": 4000}, errors=1000)
    (line,) = [t for t in target_lines(configs, 15.0) if "extproc_valkey_vs" in t]
    assert "invalid: 1000 of 15000 answers of F were not 200 (1000 errors)" in line
    assert line.endswith("missed")
    paired = {"G": {"answers_failed": [50, 100]}}
    configs["F"]["common"] = _phase(1000.0, 2.0, {"200": 5000})
    assert invalid(configs, paired, "G") == (
        "invalid: 50 of 15100 answers of G were not 200 (50 in the paired rounds)"
    )


def test_the_1mib_target_is_judged_on_the_paired_rounds_at_its_own_rate() -> None:
    """H's one pair of phases says +6 ms; its rounds, run seconds apart, +1.5 (median)."""
    configs = {"H0": _row(None, 400.0, {"200": 5000}), "H": _row("H0", 300.0, {"200": 5000})}
    configs["H0"]["common"] = _phase(150.0, 4.0, {"200": 5000})
    configs["H"]["common"] = _phase(150.0, 10.0, {"200": 5000})
    configs["H"]["common_rate"] = 150.0

    def line(paired: dict[str, Any]) -> str:
        (found,) = [t for t in target_lines(configs, 15.0, paired) if "extproc_1mib" in t]
        return found

    assert line({}) == "TARGET extproc_1mib_added_p99: 6.000 ms at 150 req/s (<= 2 ms) missed"
    rounds = {"added_p99_ms_common": 1.5, "added_p99_ms_common_rounds": [1.2, 1.5, 3.0]}
    assert line({"H": {"ratio": 0.75, "ratios": [0.75], **rounds}}) == (
        "TARGET extproc_1mib_added_p99: 1.500 ms (median of paired rounds 1.20, 1.50, 3.00;"
        " one after the other 6.00) at 150 req/s (<= 2 ms) met"
    )


def test_only_a_maximum_a_ratio_reads_is_run_more_than_once() -> None:
    """Envoy alone (A) is context: one maximum-rate run. A sidecar and its twin get every
    repeat, but only when both are measured."""
    from benchmarks.overhead import max_rate_runs

    names = ["A", "B", "C", "D", "E"]
    assert max_rate_runs("A", names, 3) == 1
    assert [max_rate_runs(n, names, 3) for n in ("B", "C", "D")] == [3, 3, 3]
    assert max_rate_runs("E", names, 3) == 1  # its twin, E0, is not measured
    assert max_rate_runs("E0", ["E0"], 3) == 1


def test_the_store_share_is_sized_from_valkeys_cpu_per_decision_where_decisions_call_it() -> None:
    exact, leased, memory = (_row("B", 3000.0, {"200": 15000}) for _ in range(3))
    exact["max_runs"][-1].update(
        redis_cpu_ms_per_request=0.05, redis_calls_per_request={"evalsha": 0.15, "zadd": 0.25}
    )
    leased["max_runs"][-1].update(
        redis_cpu_ms_per_request=0.001, redis_calls_per_request={"evalsha": 0.002}
    )
    lines = store_lines({"D": exact, "DL": leased, "C": memory})
    assert [line for line in lines if line.startswith("- ")] == [
        "- D: 0.050 ms of Valkey's CPU and 0.15 script calls per request: one Valkey core"
        " would serve about 20,000 such decisions a second, shared by every replica"
    ]
    assert store_lines({"C": memory}) == []


def test_idle_cpu_at_the_maximum_is_reported_per_configuration_with_each_process_cores() -> None:
    waiting, saturated = _row("B", 4000.0, {"200": 20000}), _row(None, 12000.0, {"200": 60000})
    waiting["max_runs"] = [dict(waiting["max_runs"][0], host_idle_share=s) for s in (0.3, 0.4, 0.2)]
    waiting["max_runs"][-1].update(
        cpu_ms_per_request=0.15, envoy_cpu_ms_per_request=0.1, redis_cpu_ms_per_request=0.05
    )
    saturated["max_runs"][0].update(host_idle_share=0.02, cpu_ms_per_request=0.04)
    lines = idle_lines({"D": waiting, "B": saturated, "C": _row("B", 1.0, {"200": 5})}, 2)
    assert [line for line in lines if line.startswith("- ")] == [
        "- B: 2% idle (runs 2%); cores busy in the last run: server 0.48",
        "- D: 30% idle (runs 30, 40, 20%); cores busy in the last run: server 0.60, Envoy 0.40,"
        " Valkey 0.20",
    ]
    assert "of its 2 cores" in lines[0]
    assert idle_lines({"C": _row("B", 1.0, {"200": 5})}, 2) == []


def test_a_ratio_a_hair_under_its_goal_reads_with_the_decimals_it_was_judged_on() -> None:
    configs = {"B": _row(None, 1000.0, {"200": 5000}), "DL": _row("B", 849.0, {"200": 4245})}
    configs["DL"]["max_runs"][-1]["redis_calls_per_request"] = {}
    paired = {"DL": {"ratio": 0.849, "ratios": [0.851, 0.849, 0.79]}}
    line = next(x for x in target_lines(configs, 15.0, paired) if "leased_vs_noop" in x)
    assert line.startswith("TARGET http_valkey_leased_vs_noop: 0.849 (median of paired rounds")
    assert line.endswith("(>= 0.85) missed")
