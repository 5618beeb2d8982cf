"""What the QoS benchmark counts as met, and its per-token times, on made-up records."""

from __future__ import annotations

from benchmarks.loadgen import Record
from benchmarks.report import class_stats, met


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
