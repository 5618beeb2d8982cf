"""benchmarks/device_log.py: joining the model's batch log to a QoS point's records."""

from __future__ import annotations

from pathlib import Path

from benchmarks import device_log
from benchmarks.loadgen import Record, RunResult
from benchmarks.triton_stalls import Batch, attach_batch_log, read_batches

T0 = 1000.0  # the run's start on the monotonic clock


def record(klass: str, sent: float, latency: float | None, status: int = 200) -> Record:
    return Record("t1", klass, sent, sent, status, latency, latency, None, "", "")


def run(records: list[Record]) -> tuple[RunResult, list[Record]]:
    return RunResult(records, 0.0, 0.0, 0.0, 1.0, start_monotonic=T0), records


def test_a_request_is_matched_to_the_batch_that_ended_just_before_its_answer() -> None:
    batches = [Batch(T0 + 0.0, T0 + 0.1, 2), Batch(T0 + 0.1, T0 + 0.3, 3)]
    ends = [b.end for b in batches]
    assert device_log.batch_of(batches, ends, T0 + 0.302) == batches[1]
    assert device_log.batch_of(batches, ends, T0 + 0.105) == batches[0]
    # Not within MATCH_S of any end (or before every end): no batch.
    assert device_log.batch_of(batches, ends, T0 + 0.2) is None
    assert device_log.batch_of(batches, ends, T0 + 0.05) is None


def test_a_request_is_matched_by_its_id_where_the_log_names_ids_however_late_its_answer() -> None:
    """A busy host may deliver an answer well after its batch's end; the id join does not
    depend on it, and a request whose id no batch logged is not matched to a neighbour."""
    batches = [Batch(T0 + 0.0, T0 + 0.1, 2, ("r-1", "r-2")), Batch(T0 + 0.1, T0 + 0.3, 1, ("-",))]
    late = record("interactive", 0.0, 0.25)  # 150 ms after its batch's end, within the next
    late.request_id = "r-1"
    prompt = record("interactive", 0.0, 0.101)
    prompt.request_id = "r-2"
    unknown = record("standard", 0.05, 0.251)  # ended within MATCH_S of the second batch
    unknown.request_id = "r-9"
    point = device_log.point(batches, [run([late, prompt, unknown])])
    assert point["answered"] == 3 and point["matched"] == 2
    assert point["classes"]["interactive"]["batch_ms_p50"] == 100.0  # both in the first batch
    assert "standard" not in point["classes"]
    assert device_log.by_id(batches) == {"r-1": batches[0], "r-2": batches[0]}


def test_a_point_says_how_long_each_class_waited_and_how_long_its_batch_ran() -> None:
    batches = [
        Batch(T0 + 0.00, T0 + 0.10, 1),
        Batch(T0 + 0.10, T0 + 0.30, 2),
        # idle from 0.30 to 0.40 although the batch request sent at 0.25 waited
        Batch(T0 + 0.40, T0 + 0.45, 1),
    ]
    records = [
        record("interactive", 0.00, 0.101),  # ran at once in the first batch
        record("interactive", 0.05, 0.251),  # waited 50 ms for the second
        record("standard", 0.08, 0.221),  # waited 20 ms, ran in the second
        record("batch", 0.25, 0.201),  # waited 150 ms, 100 of them with the device idle
        record("interactive", 0.26, None, status=0),  # its client gave up: not answered
        record("standard", 0.27, 0.001, status=503),  # refused: never reached Triton
    ]
    point = device_log.point(batches, [run(records)])
    assert point["answered"] == 4 and point["matched"] == 4
    interactive = point["classes"]["interactive"]
    assert interactive["wait_ms_p50"] == 25.0  # 0 and 50 ms
    assert interactive["batch_ms_p95"] == 195.0  # 100 and 200 ms, interpolated
    assert point["classes"]["batch"] == {
        "wait_ms_p50": 150.0,
        "wait_ms_p99": 150.0,
        "batch_ms_p50": 50.0,
        "batch_ms_p95": 50.0,
    }
    # The device sat idle 0.30-0.40 while the batch request waited (its send plus the grace
    # for its way into Triton is before 0.30): 100 ms of the 0.00-0.45 window.
    assert point["longest_idle_while_waiting_ms"] == 100.0
    assert point["idle_while_waiting_share"] == round(0.1 / 0.451, 5)
    assert "interactive wait p50/p99 25.0/" in device_log.describe(point)


def test_a_refused_request_does_not_make_the_device_look_idle_while_it_waited() -> None:
    batches = [Batch(T0 + 0.0, T0 + 0.1, 1), Batch(T0 + 0.3, T0 + 0.4, 1)]
    records = [
        record("interactive", 0.0, 0.101),
        record("batch", 0.05, 0.001, status=503),  # refused by the sidecar
        record("interactive", 0.29, 0.111),  # sent during the idle stretch
    ]
    point = device_log.point(batches, [run(records)])
    assert point["idle_while_waiting_share"] == 0.0


def test_attach_points_the_model_at_the_log_once(tmp_path: Path) -> None:
    (tmp_path / "llm").mkdir()
    config = tmp_path / "llm" / "config.pbtxt"
    config.write_text('name: "llm"\nmax_batch_size: 16\n')
    attach_batch_log(tmp_path, "llm", tmp_path / "a.log")
    attach_batch_log(tmp_path, "llm", tmp_path / "b.log")
    text = config.read_text()
    assert text.count("batch_log") == 1 and str(tmp_path / "b.log") in text
    assert text.startswith('name: "llm"\nmax_batch_size: 16\n')
    assert read_batches(tmp_path / "b.log") == []


def test_a_miss_is_put_down_to_the_longest_request_of_the_longest_batch_it_waited_through() -> None:
    def sized(klass: str, sent: float, latency: float | None, tokens: int, status: int = 200):
        return Record("t1", klass, sent, sent, status, latency, latency, None, "", "", 10, tokens)

    batches = [
        Batch(T0 + 0.00, T0 + 0.05, 2),
        Batch(T0 + 0.05, T0 + 0.25, 2),  # 200 ms: a long standard request set its length
        Batch(T0 + 0.25, T0 + 0.30, 3),
    ]
    records = [
        sized("interactive", 0.00, 0.051, 20),
        sized("batch", 0.00, 0.051, 30),  # the first batch's longest: not waited through
        sized("standard", 0.02, 0.231, 300),
        sized("interactive", 0.03, 0.221, 40),  # ran in the long batch: late by 0.1 s deadline
        sized("interactive", 0.06, 0.241, 20),  # waited it out, ran in the third: late
        sized("interactive", 0.07, None, 50, status=0),  # gave up at its deadline, inside it
        sized("interactive", 0.08, 0.001, 10, status=503),  # refused: not a miss
        sized("interactive", 0.26, 0.041, 10),  # on time
    ]
    deadlines = {"interactive": 0.1, "standard": 1.0, "batch": 10.0}
    point = device_log.point(batches, [run(records)], deadlines)
    assert point["missed_behind"] == {"interactive": {"standard": 3}}
    assert "its misses by the longest batch's longest request: standard 3" in (
        device_log.describe(point)
    )
    # A batch none of whose requests was answered cannot name one; without deadlines, no
    # attribution at all.
    lone = [sized("interactive", 0.06, None, 50, status=0)]
    assert device_log.point(batches, [run(lone)], deadlines)["missed_behind"] == {
        "interactive": {"unknown": 1}
    }
    assert device_log.point(batches, [run(records)])["missed_behind"] == {}


def test_by_id_a_batch_whose_clients_all_gave_up_still_names_its_longest_request() -> None:
    """The log names the requests a batch ran, answered or not: a miss behind a batch whose
    every client had given up is put down to that batch's longest request, where the time
    join could only say `unknown`."""
    batches = [Batch(T0 + 0.00, T0 + 0.30, 2, ("a", "b")), Batch(T0 + 0.30, T0 + 0.35, 1, ("c",))]

    def gave_up(klass: str, sent: float, tokens: int, request_id: str) -> Record:
        r = Record("t1", klass, sent, sent, 0, None, None, None, "", "timeout", 10, tokens)
        r.request_id = request_id
        return r

    records = [
        gave_up("batch", 0.00, 500, "a"),  # the long row that set the batch's 300 ms
        gave_up("interactive", 0.00, 20, "b"),  # ran in it, its client gone at 0.1 s
        gave_up("interactive", 0.05, 20, "c"),  # waited through it, ran after
    ]
    deadlines = {"interactive": 0.1, "batch": 0.2}
    point = device_log.point(batches, [run(records)], deadlines)
    assert point["answered"] == 0 and point["matched"] == 0
    assert point["missed_behind"] == {"interactive": {"batch": 2}, "batch": {"batch": 1}}
