"""The autoscaling series (sidecar/demand.py) on their own registry, with a virtual clock."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf import struct_pb2
from prometheus_client import CollectorRegistry, generate_latest

from sidecar.core.demand import TAU_S
from sidecar.demand import DEMAND_RATE, DEMAND_RATIO, DRAIN_RATE, DemandSeries
from sidecar.metrics import Metrics
from tests.test_adapters import INFER, check_request, make_service, with_grpc


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


def test_the_service_counts_demand_and_the_access_log_counts_drain() -> None:
    service = make_service()
    service.metrics.demand.clock = Clock()  # frozen: no decay between the events and the read

    async def body(authz: Any, als: Any) -> None:
        leases = []
        for _ in range(3):
            r = await authz.Check(check_request({"x-api-key": "k-search"}))
            leases.append(r.dynamic_metadata.fields["x-qos-lease"].string_value)
        refused = await authz.Check(check_request({"x-api-key": "k-nobody"}))
        assert refused.HasField("denied_response")  # an unknown tenant is no demand

        def entry(lease: str | None) -> Any:
            metadata = base_pb2.Metadata()
            if lease:
                fields = struct_pb2.Struct()
                fields.update({"x-qos-lease": lease})
                metadata.filter_metadata["envoy.filters.http.ext_authz"].CopyFrom(fields)
            return accesslog_pb2.HTTPAccessLogEntry(
                common_properties=accesslog_pb2.AccessLogCommon(metadata=metadata),
                request=accesslog_pb2.HTTPRequestProperties(path=INFER),
            )

        entries = [entry(leases[0]), entry(leases[1]), entry(None)]  # None: a shed, say
        message = als_pb2.StreamAccessLogsMessage(
            http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(log_entry=entries)
        )

        async def stream() -> Any:
            yield message

        await als.StreamAccessLogs(stream())

    asyncio.run(with_grpc(service, body))
    labels = {"model": "simgpu"}
    registry = service.metrics.registry
    assert registry.get_sample_value(DEMAND_RATE, labels) == pytest.approx(3 / TAU_S)
    assert registry.get_sample_value(DRAIN_RATE, labels) == pytest.approx(2 / TAU_S)
    assert registry.get_sample_value(DEMAND_RATIO, labels) == pytest.approx(1.5)
