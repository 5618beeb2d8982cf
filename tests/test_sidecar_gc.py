"""benchmarks/sidecar_gc.py: one phase's share of the sidecar's `qos_gc_pause_seconds`."""

from __future__ import annotations

from benchmarks.sidecar_gc import describe, during


def test_a_phase_counts_only_its_own_collections_and_names_the_longests_bucket() -> None:
    before = {"count:0": 10, "count:2": 1, "sum:0": 0.010, "sum:2": 0.020}
    before |= {"le:0.001": 9, "le:0.01": 10, "le:0.1": 11, "le:+Inf": 11}
    after = {"count:0": 14, "count:2": 2, "sum:0": 0.012, "sum:2": 0.050}
    after |= {"le:0.001": 13, "le:0.01": 14, "le:0.1": 16, "le:+Inf": 16}
    gc = during(before, after)
    assert gc == {
        "collections": 5,
        "gen2_collections": 1,
        "pause_ms": 32.0,
        "longest_ms_at_most": 100.0,  # one of the five fell between 10 and 100 ms
    }
    assert describe(gc) == "5 collections (1 full), 32.0 ms in all, the longest at most 100 ms"


def test_a_phase_with_no_collection_names_no_longest() -> None:
    same = {"count:0": 3, "sum:0": 0.001, "le:0.001": 3, "le:+Inf": 3}
    gc = during(same, dict(same))
    assert gc["collections"] == 0 and gc["longest_ms_at_most"] is None
    assert describe(gc) == "0 collections (0 full), 0.0 ms in all"
