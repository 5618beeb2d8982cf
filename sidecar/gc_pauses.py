"""Python's garbage collector: kept off the request path, and seen when it is on it.

While a collection runs, no decision is made. A full one walks every container object the
process holds, and most of those were made at start-up (modules, the policy and its compiled
matchers, metric series) and live as long as the process.

Rules:
1. `freeze_start_up()` once start-up is done: what is alive then moves to the permanent
   generation, which no collection walks again (it is still freed by reference counting;
   only a cycle among those objects would be kept for good). A full collection then walks
   only what was made since. Objects made by a reload are not frozen.
2. Every collection's pause is observed in `qos_gc_pause_seconds{generation}`: a latency
   spike that lines up with one is the collector's.
3. One watcher per process (`gc.callbacks` is process-wide); `stop()` removes it.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Histogram


def freeze_start_up() -> int:
    """Rule 1: collect what start-up left, then freeze the rest. Returns how many objects
    the permanent generation holds."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class PauseWatcher:
    """Rule 2: each collection's pause into `histogram`, by generation."""

    def __init__(self, histogram: Histogram, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._started = 0.0
        self._by_generation = [histogram.labels(str(g)) for g in range(3)]
        gc.callbacks.append(self._observe)

    def _observe(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self._clock()
        else:
            self._by_generation[info["generation"]].observe(self._clock() - self._started)

    def stop(self) -> None:
        """Rule 3."""
        if self._observe in gc.callbacks:
            gc.callbacks.remove(self._observe)
