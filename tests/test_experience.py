"""Per-tenant experience: Envoy's timings of admitted requests, judged against their class's
objective (`core.experience`), read from access-log entries (`envoy.access_log.timings_of`)
and exported per tenant and class (`sidecar.experience`)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import duration_pb2, wrappers_pb2
from prometheus_client import CollectorRegistry, generate_latest

from devstack.demo import decision_time_summary
from sidecar.core.experience import CompletionTimings, SloResult, slo_result
from sidecar.core.types import RequestAttributes
from sidecar.envoy.access_log import timings_of
from sidecar.metrics import Metrics
from sidecar.service import AdmissionService
from sidecar.state.memory import MemoryQuotaStore
from tests.core_fixtures import make_policy


@pytest.mark.parametrize(
    ("timings", "objective_ms", "expected"),
    [
        (CompletionTimings(0.1, 0.05, 200), 250, SloResult.MET),
        (CompletionTimings(0.25, 0.05, 200), 250, SloResult.MET),  # at the objective
        (CompletionTimings(0.3, 0.05, 200), 250, SloResult.MISSED),
        (CompletionTimings(0.01, 0.01, 503), 250, SloResult.FAILED),  # fast, but an error
        (CompletionTimings(0.01, 0.01, 429), 250, SloResult.MET),  # the client's error
        (CompletionTimings(math.inf, None, None), 250, SloResult.MISSED),  # the client left
        (CompletionTimings(None, None, 502), 250, SloResult.FAILED),
        (CompletionTimings(None, None, None), 250, None),  # Envoy said nothing: not judged
    ],
)
def test_slo_result(timings: CompletionTimings, objective_ms: int, expected: Any) -> None:
    assert slo_result(timings, objective_ms) == expected


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(round(seconds * 1e9))
    return value


def test_timings_are_read_from_the_access_log_entry() -> None:
    served = accesslog_pb2.HTTPAccessLogEntry(
        common_properties=accesslog_pb2.AccessLogCommon(
            time_to_last_upstream_tx_byte=_duration(0.025),
            time_to_first_upstream_rx_byte=_duration(0.125),
            time_to_last_upstream_rx_byte=_duration(1.275),
            time_to_last_downstream_tx_byte=_duration(1.5),
            duration=_duration(1.5),
        ),
        response=accesslog_pb2.HTTPResponseProperties(
            response_code=wrappers_pb2.UInt32Value(value=200)
        ),
    )
    # With Triton from its last byte sent to the last byte back: 1.25 s.
    assert timings_of(served) == CompletionTimings(1.5, 0.125, 200, 1.25)
    # The client left before any answer: no response code, no first byte, infinite duration.
    left = accesslog_pb2.HTTPAccessLogEntry(
        common_properties=accesslog_pb2.AccessLogCommon(duration=_duration(2.0))
    )
    assert timings_of(left) == CompletionTimings(math.inf, None, None)
    assert timings_of(accesslog_pb2.HTTPAccessLogEntry()) == CompletionTimings()


def test_completions_are_exported_per_tenant_and_class() -> None:
    metrics = Metrics(CollectorRegistry())
    policy = make_policy()  # interactive: 250 ms objective, standard: 2000 ms
    series = metrics.experience
    series.completed("search", "interactive", CompletionTimings(0.1, 0.04, 200), policy)
    series.completed("search", "interactive", CompletionTimings(0.4, 0.3, 200), policy)
    series.completed("search", "interactive", CompletionTimings(0.02, 0.01, 503), policy)
    series.completed("search", "interactive", CompletionTimings(math.inf, None, None), policy)
    series.completed("analytics", "standard", CompletionTimings(0.4, 0.3, 200), policy)
    # Names the policy no longer has (a reload removed them): bounded, not invented.
    series.completed("gone", "vanished", CompletionTimings(0.4, 0.3, 200), policy)

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    search = {"tenant": "search", "class": "interactive"}
    assert value("qos_slo_requests_total", **search, result="met") == 1
    assert value("qos_slo_requests_total", **search, result="missed") == 2
    assert value("qos_slo_requests_total", **search, result="failed") == 1
    assert value("qos_slo_requests_total", tenant="analytics", **{"class": "standard"},
                 result="met") == 1  # fmt: skip
    # The client that left has no finite duration and no first byte: not in the histograms.
    assert value("qos_request_duration_seconds_count", **search) == 3
    assert value("qos_request_duration_seconds_sum", **search) == pytest.approx(0.52)
    assert value("qos_request_duration_seconds_bucket", **search, le="0.25") == 2
    assert value("qos_time_to_first_byte_seconds_count", **search) == 3
    assert value("qos_time_to_first_byte_seconds_bucket", **search, le="0.05") == 2
    assert value("qos_responses_total", **search, code="2xx") == 2
    assert value("qos_responses_total", **search, code="5xx") == 1
    assert value("qos_responses_total", **search, code="none") == 1
    unknown = {"tenant": "__unknown__", "class": "__unknown__"}
    assert value("qos_request_duration_seconds_count", **unknown) == 1
    assert (
        value("qos_time_to_first_byte_seconds_count", tenant="gone", **{"class": "vanished"})
        is None
    )
    # No objective for a class the policy does not know: not judged.
    assert value("qos_slo_requests_total", **unknown, result="met") is None


def test_a_completed_lease_records_its_tenants_experience() -> None:
    """Through the service: the lease of an admitted request names its tenant and class."""
    service = AdmissionService(make_policy(), MemoryQuotaStore(), Metrics(CollectorRegistry()))

    async def body() -> None:
        attrs = RequestAttributes(
            method="POST",
            path="/v2/models/m/infer",
            headers={"x-api-key": "k-search", "x-qos-class": "interactive"},
        )
        decision = await service.check(attrs, "http")
        assert decision.admitted
        token = dict(decision.headers)["x-qos-lease"]
        assert await service.complete(token, CompletionTimings(0.3, 0.2, 200))

    asyncio.run(body())
    labels = {"tenant": "search", "class": "interactive"}
    registry = service.metrics.registry
    assert registry.get_sample_value("qos_time_to_first_byte_seconds_sum", labels) == 0.2
    assert registry.get_sample_value("qos_slo_requests_total", {**labels, "result": "missed"}) == 1


def test_decision_time_has_sub_millisecond_buckets() -> None:
    metrics = Metrics(CollectorRegistry())
    for seconds in (0.00004, 0.00015, 0.00015, 0.0004, 0.003):
        metrics.observe_decision_seconds("grpc", seconds)

    def below(le: str) -> float | None:
        labels = {"api": "grpc", "le": le}
        return metrics.registry.get_sample_value("qos_decision_duration_seconds_bucket", labels)

    assert [below(le) for le in ("5e-05", "0.0001", "0.0002", "0.0005", "0.005")] == [
        1, 1, 3, 4, 5
    ]  # fmt: skip


def test_the_demo_reports_sub_millisecond_decision_quantiles() -> None:
    metrics = Metrics(CollectorRegistry())
    for _ in range(99):
        metrics.observe_decision_seconds("http", 0.00015)  # in the (0.1 ms, 0.2 ms] bucket
    metrics.observe_decision_seconds("http", 0.004)
    summary = decision_time_summary(generate_latest(metrics.registry).decode())
    assert "over 100 decisions" in summary
    # p50: halfway into the bucket's 99 (0.1 + 0.1 x 50/99 ms); p99: its last one, at 0.2 ms.
    assert "p50 ~0.151 ms (<= 0.2 ms)" in summary, summary
    assert "p99 ~0.2 ms (<= 0.2 ms)" in summary, summary
