"""The plain counter and histogram (sidecar/plain_metrics.py) expose what prometheus_client's
Counter and Histogram expose for the same updates."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from sidecar.metrics import DECISION_BUCKETS
from sidecar.plain_metrics import PlainCounter, PlainHistogram


def _lines(registry: CollectorRegistry) -> list[str]:
    """The exposition, but `_created` samples (timestamps of when each series began)."""
    text = generate_latest(registry).decode()
    return sorted(line for line in text.splitlines() if "_created" not in line)


def test_the_counter_exposes_what_prometheus_client_does() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    labels = ["tenant", "class"]
    plain = PlainCounter("x_decisions_total", "Decisions.", labels, ours)
    reference = Counter("x_decisions_total", "Decisions.", labels, registry=theirs)
    rng = random.Random(3)
    for _ in range(500):
        pair = (rng.choice(["a", "b", 'c"d']), rng.choice(["interactive", "batch"]))
        amount = rng.choice([1.0, 2.5])
        plain.inc(pair, amount)
        reference.labels(*pair).inc(amount)
    assert _lines(ours) == _lines(theirs)
    created = [s for m in ours.collect() for s in m.samples if s.name.endswith("_created")]
    assert len(created) == 6 and all(s.value > 0 for s in created)


def test_the_histogram_exposes_what_prometheus_client_does_bounds_included() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    plain = PlainHistogram("x_seconds", "Time.", ["api"], DECISION_BUCKETS, ours)
    reference = Histogram("x_seconds", "Time.", ["api"], buckets=DECISION_BUCKETS, registry=theirs)
    rng = random.Random(5)
    # Every bound exactly (a value on a bound counts in that bucket), and spread values.
    values = [*DECISION_BUCKETS, 0.0, 2.0, *(rng.expovariate(2000) for _ in range(2000))]
    for value in values:
        api = rng.choice(["http", "grpc"])
        plain.observe((api,), value)
        reference.labels(api).observe(value)
    assert _lines(ours) == _lines(theirs)
