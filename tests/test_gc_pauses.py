"""Python's collector: its pauses are seen, and start-up's objects are left out of it."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from sidecar import gc_pauses
from sidecar.metrics import Metrics


def observed(metrics: Metrics, generation: str) -> float:
    value = metrics.registry.get_sample_value(
        "qos_gc_pause_seconds_count", {"generation": generation}
    )
    return value or 0.0


def test_each_collection_is_observed_by_generation_until_the_watcher_stops() -> None:
    metrics = Metrics(CollectorRegistry())
    ticks = iter(float(i) for i in range(100))
    watcher = gc_pauses.PauseWatcher(metrics.gc_pause_seconds, clock=lambda: next(ticks))
    try:
        gc.collect(0)
        gc.collect(2)
        assert observed(metrics, "0") == 1
        assert observed(metrics, "2") == 1
        assert observed(metrics, "1") == 0
        # Each pause is its stop less its start: one tick of the fake clock.
        total = metrics.registry.get_sample_value("qos_gc_pause_seconds_sum", {"generation": "2"})
        assert total == 1.0
    finally:
        watcher.stop()
    gc.collect(2)
    assert observed(metrics, "2") == 1
    watcher.stop()  # twice is harmless


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("unfrozen")
def test_freezing_leaves_what_is_alive_out_of_full_collections() -> None:
    alive = [[i] for i in range(10_000)]  # containers the collector tracks
    assert gc.get_freeze_count() == 0
    assert gc_pauses.freeze_start_up() >= len(alive)
    # A full collection now walks only what came since: start-up's objects are not in it.
    tracked_after = len(gc.get_objects(generation=2))
    assert tracked_after < len(alive)
