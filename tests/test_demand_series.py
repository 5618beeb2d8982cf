"""The autoscaling series (sidecar/demand.py) on their own registry, with a virtual clock."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from sidecar.demand import DEMAND_RATE, DEMAND_RATIO, DRAIN_RATE, DemandSeries
from sidecar.metrics import Metrics


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_gauges_follow_the_rates_and_decay_while_idle() -> None:
    registry, clock = CollectorRegistry(), Clock()
    series = DemandSeries(registry, clock=clock, tau_s=10.0)
    for _ in range(3):
        series.offered("simgpu")
    series.drained("simgpu")
    series.offered(None)  # not demand: nothing counted
    series.drained(None)
    labels = {"model": "simgpu"}
    assert registry.get_sample_value(DEMAND_RATE, labels) == pytest.approx(0.3)
    assert registry.get_sample_value(DRAIN_RATE, labels) == pytest.approx(0.1)
    assert registry.get_sample_value(DEMAND_RATIO, labels) == pytest.approx(3.0)
    clock.now += 10.0  # one time constant, nothing happened: read at the scrape, decayed
    assert registry.get_sample_value(DEMAND_RATE, labels) == pytest.approx(0.3 / 2.718281828)
    # The drain (0.1 / e) is now under its floor, one completion per tau (0.1): the ratio of a
    # model going idle falls toward 0 instead of staying at 3.
    assert registry.get_sample_value(DEMAND_RATIO, labels) == pytest.approx(0.3 / 2.718281828 / 0.1)
    clock.now += 1000.0  # long idle: the model's series go away
    assert registry.get_sample_value(DEMAND_RATE, labels) is None


def test_metrics_exports_the_series_by_their_names() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.demand.offered("simgpu")
    metrics.demand.drained("simgpu")
    text = generate_latest(metrics.registry).decode()
    for name in (DEMAND_RATE, DRAIN_RATE, DEMAND_RATIO):
        assert f"# TYPE {name} gauge" in text
        assert f'{name}{{model="simgpu"}}' in text
