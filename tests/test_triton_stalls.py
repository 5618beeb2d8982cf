"""benchmarks/triton_stalls.py: what counts as a stall, and one short run on a real Triton."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.triton_stalls import GRACE_S, Batch, configure, find_stalls, main, read_batches
from tests.binaries import require_binaries


def test_a_request_sent_during_a_batch_and_run_right_after_it_is_no_stall() -> None:
    batches = [Batch(0.0, 0.1, 1), Batch(0.101, 0.2, 1)]
    assert find_stalls(batches, [0.0, 0.05]) == []


def test_the_instance_idle_while_a_request_waits_is_a_stall_from_the_batch_end() -> None:
    batches = [Batch(0.0, 0.1, 1), Batch(0.4, 0.5, 1)]
    (stall,) = find_stalls(batches, [0.0, 0.05])
    assert (stall.start, stall.end, stall.waiting_since) == (0.1, 0.4, 0.05)
    assert stall.seconds == pytest.approx(0.3)
    assert not stall.woken_by_send  # nothing was sent near its end


def test_a_stall_that_ends_right_after_a_send_was_woken_by_it() -> None:
    batches = [Batch(0.0, 0.1, 1), Batch(0.4, 0.5, 2)]
    (stall,) = find_stalls(batches, [0.0, 0.05, 0.397])
    assert stall.woken_by_send and stall.seconds == pytest.approx(0.3)


def test_a_request_sent_into_an_idle_gap_waits_from_its_arrival() -> None:
    batches = [Batch(0.0, 0.1, 1), Batch(0.35, 0.4, 1)]
    (stall,) = find_stalls(batches, [0.0, 0.25])
    assert stall.start == pytest.approx(0.25 + GRACE_S)
    assert stall.seconds == pytest.approx(0.1 - GRACE_S)


def test_an_idle_gap_with_nothing_sent_and_a_short_wait_are_no_stalls() -> None:
    batches = [Batch(0.0, 0.1, 1), Batch(0.5, 0.6, 1), Batch(0.61, 0.7, 1)]
    # Nothing sent between the first two; the third's request waited 9 ms (under 20 ms).
    assert find_stalls(batches, [0.0, 0.499, 0.6]) == []


def test_a_request_sent_before_a_batch_started_is_not_counted_as_waiting_after_it() -> None:
    # It may have run in that batch: counting it would invent a stall.
    batches = [Batch(0.0, 0.1, 2), Batch(0.5, 0.6, 1)]
    assert find_stalls(batches, [-0.01, 0.0]) == []


def test_configure_sets_the_log_and_drops_priorities_only_for_no_priority(tmp_path: Path) -> None:
    source = Path(__file__).parent.parent / "examples" / "triton" / "llm" / "config.pbtxt"
    for variant in ("shipped", "no-priority", "two-instances"):
        (tmp_path / variant / "llm").mkdir(parents=True)
        (tmp_path / variant / "llm" / "config.pbtxt").write_text(source.read_text())
        configure(tmp_path / variant, variant, tmp_path / "b.log")
    shipped = (tmp_path / "shipped" / "llm" / "config.pbtxt").read_text()
    plain = (tmp_path / "no-priority" / "llm" / "config.pbtxt").read_text()
    for text in (shipped, plain):
        assert f'key: "batch_log" value: {{ string_value: "{tmp_path / "b.log"}" }}' in text
    assert "priority_levels: 4" in shipped and "default_queue_policy" in shipped
    assert "priority_levels" not in plain and "default_queue_policy" not in plain
    assert "max_queue_delay_microseconds" in plain  # the rest of dynamic_batching stays
    two = (tmp_path / "two-instances" / "llm" / "config.pbtxt").read_text()
    assert "count: 2," in two and 'name: "DEVICE", count: 1' in two and "priority_levels: 4" in two


@pytest.mark.stack
def test_a_short_run_logs_every_row_it_served(tmp_path: Path) -> None:
    require_binaries("triton")
    assert main(["--seeds", "1", "--duration", "2", "--out", str(tmp_path)]) == 0
    (out,) = list(tmp_path.iterdir())
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["variant"] for r in runs] == ["shipped", "no-priority", "two-instances", "nudged"]
    for run in runs:
        assert run["requests"] > 10
        assert run["answered"] == run["requests"]
        assert run["rows_run"] == run["answered"]  # the model logged every batch it ran
        assert run["batches"] >= 2
        assert all(s["end"] > s["start"] for s in run["stall_list"])
        assert run["overlapping"] == 0  # one simulated device: two instances never run at once
    nudged = runs[-1]["nudges"]  # answered, every one a rejection: none ran (rows_run above)
    assert nudged["rejected"] > 0 and set(nudged) == {"rejected"}
    assert "| shipped | 1 |" in (out / "report.md").read_text()


def test_read_batches_sorts_by_start_and_tolerates_no_log(tmp_path: Path) -> None:
    assert read_batches(tmp_path / "none.log") == []
    log = tmp_path / "b.log"
    log.write_text("2.0 2.5 3\n1.0 1.5 1\n")
    assert read_batches(log) == [Batch(1.0, 1.5, 1), Batch(2.0, 2.5, 3)]


def test_read_batches_reads_the_ids_of_a_batchs_requests_where_the_log_has_them(
    tmp_path: Path,
) -> None:
    log = tmp_path / "b.log"
    log.write_text("1.0 1.5 2 ab-1,-\n2.0 2.5 1\n")
    assert read_batches(log) == [Batch(1.0, 1.5, 2, ("ab-1", "-")), Batch(2.0, 2.5, 1)]
