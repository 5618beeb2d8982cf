"""A counter and a histogram kept as plain numbers, for the series every decision updates.

prometheus_client's labelled children take a lock on every `inc` and `observe`, since the
library serves threads; the count and the duration of a decision cost about 1.2 and 1.1 us
that way (`benchmarks/request_cost.py`). The sidecar updates its metrics on one event loop
and is scraped on that loop too (`sidecar/admin`), so these need no lock: an update is a dict
lookup and an addition, and the samples are built when a scrape asks (`collect`). Each worker
process (`--workers`) has its own, as it has its own registry.

They expose what prometheus_client's `Counter` and `Histogram` do under the same name and
labels: `<name>_total` and `<name>_created` for the counter; `_bucket` (cumulative, `le`
as prometheus_client writes it, `+Inf` last), `_count` and `_sum` for the histogram. A
label set appears once it was first updated.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator, Sequence
from typing import cast

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

# How prometheus_client writes a bucket's bound in `le` (its function is untyped).
_le = cast(Callable[[float], str], floatToGoString)


class PlainCounter:
    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self._name, self._documentation, self._labels = name, documentation, list(labels)
        self._counts: dict[tuple[str, ...], float] = {}
        self._created: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        counts = self._counts
        if labels in counts:
            counts[labels] += amount
        else:
            counts[labels] = amount
            self._created[labels] = time.time()

    def describe(self) -> Iterator[Metric]:
        yield self._empty()

    def collect(self) -> Iterator[Metric]:
        family = self._empty()
        for labels, value in self._counts.items():
            family.add_metric(labels, value, created=self._created[labels])
        yield family

    def _empty(self) -> CounterMetricFamily:
        return CounterMetricFamily(self._name, self._documentation, labels=self._labels)


class PlainHistogram:
    def __init__(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name, self._documentation, self._labels = name, documentation, list(labels)
        self._bounds = tuple(sorted(buckets))
        self._les = [*(_le(b) for b in self._bounds), "+Inf"]
        # Per label set: the count in each bucket (not cumulative; the last is +Inf), the sum.
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        registry.register(self)

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = ([0] * (len(self._bounds) + 1), [0.0])
        counts, total = series
        counts[bisect.bisect_left(self._bounds, value)] += 1  # the first bound >= value
        total[0] += value

    def describe(self) -> Iterator[Metric]:
        yield self._empty()

    def collect(self) -> Iterator[Metric]:
        family = self._empty()
        for labels, (counts, total) in self._series.items():
            cumulative, running = [], 0
            for le, count in zip(self._les, counts, strict=True):
                running += count
                cumulative.append((le, float(running)))
            family.add_metric(labels, cumulative, total[0])
        yield family

    def _empty(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self._name, self._documentation, labels=self._labels)
