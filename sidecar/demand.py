"""The autoscaling series: each model's demand and drain rates, read at every scrape.

The arithmetic and its rules are `core.demand`; this keeps the rates of this replica, takes
the time from its clock, and exports them as gauges computed when /metrics is read (so an idle
model's rates decay between events, as they should, without a timer):

- `qos_model_demand_rate{model}`: requests per second offered (admitted, held, shed for load);
- `qos_model_drain_rate{model}`: completions per second;
- `qos_model_demand_ratio{model}`: the first over the second, for a single replica.

The first two sum across replicas; the fleet's ratio is sum(demand) / sum(drain) (see
examples/deploy/kubernetes/autoscaling/).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric

from sidecar.core.demand import TAU_S, DemandRates

DEMAND_RATE = "qos_model_demand_rate"
DRAIN_RATE = "qos_model_drain_rate"
DEMAND_RATIO = "qos_model_demand_ratio"


class DemandSeries:
    """A Prometheus collector of this replica's `DemandRates`."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        clock: Callable[[], float] = time.monotonic,
        tau_s: float = TAU_S,
    ) -> None:
        self.clock = clock
        self.rates = DemandRates(tau_s)
        registry.register(self)

    def offered(self, model: str | None) -> None:
        """A request for `model` counts as demand now (None: it does not)."""
        if model is not None:
            self.rates.offered(model, self.clock())

    def drained(self, model: str | None) -> None:
        """A request for `model` completed now (None: no model to count it for)."""
        if model is not None:
            self.rates.drained(model, self.clock())

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        demand, drain, ratio = self._families()
        for model, reading in sorted(self.rates.read(self.clock()).items()):
            demand.add_metric([model], reading.demand_per_s)
            drain.add_metric([model], reading.drain_per_s)
            ratio.add_metric([model], reading.ratio)
        yield from (demand, drain, ratio)

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        tau = f"smoothed with a {self.rates.tau_s:g} s time constant"
        return (
            GaugeMetricFamily(
                DEMAND_RATE,
                "Requests per second this replica was offered for the model: admitted, held "
                f"or shed for load (not refused for quota), {tau}. Sums across replicas.",
                labels=["model"],
            ),
            GaugeMetricFamily(
                DRAIN_RATE,
                "Completions per second of the model's leased requests (Envoy's access log), "
                f"{tau}. Sums across replicas.",
                labels=["model"],
            ),
            GaugeMetricFamily(
                DEMAND_RATIO,
                "This replica's demand rate over its drain rate (the drain floored at one "
                "completion per time constant); above 1, the model is offered more than it "
                "drains. For a fleet, divide the sums of the two rates instead.",
                labels=["model"],
            ),
        )
