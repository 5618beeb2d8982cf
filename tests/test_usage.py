"""Per-tenant usage bookkeeping (sidecar/usage.py) and what it reads from Envoy's access log:
bounded labels, the split counted in `qos_gpu_seconds_total`, the upstream time of an entry."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import duration_pb2
from prometheus_client import CollectorRegistry

from sidecar.core.load import TritonCounters
from sidecar.core.types import LeaseRef, RequestAttributes
from sidecar.envoy.access_log import note_usage, upstream_time_of
from sidecar.metrics import Metrics
from sidecar.usage import MAX_CACHED, UsageLedger

TENANTS = {"heavy", "light"}
MODELS = {"llm"}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def ledger_on(registry: CollectorRegistry, clock: Clock) -> UsageLedger:
    return UsageLedger(Metrics(registry), lambda: TENANTS, lambda: MODELS, clock=clock)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_gpu_seconds_follow_the_work_of_each_interval(registry: CollectorRegistry) -> None:
    clock = Clock()
    ledger = ledger_on(registry, clock)
    ledger.scraped("t0", {"simgpu": TritonCounters(compute_us=5_000_000)})  # baseline
    ledger.completed("heavy", "simgpu", 0.3)
    ledger.completed("light", "simgpu", 0.1)
    clock.now = 0.25
    ledger.scraped("t0", {"simgpu": TritonCounters(compute_us=5_800_000)})
    assert value(registry, "qos_gpu_seconds_total", tenant="heavy", model="simgpu") == (
        pytest.approx(0.6)
    )
    assert value(registry, "qos_gpu_seconds_total", tenant="light", model="simgpu") == (
        pytest.approx(0.2)
    )
    assert value(registry, "qos_usage_requests_total", tenant="heavy", model="simgpu") == 1
    assert value(registry, "qos_usage_work_seconds_total", tenant="heavy", model="simgpu") == 0.3


def test_compute_without_work_is_counted_unattributed(registry: CollectorRegistry) -> None:
    clock = Clock()
    ledger = ledger_on(registry, clock)
    ledger.scraped("t0", {"simgpu": TritonCounters(compute_us=0)})
    clock.now = 1.0
    ledger.scraped("t0", {"simgpu": TritonCounters(compute_us=2_000_000)})
    clock.now = 6.0
    ledger.scraped("t0", {"simgpu": TritonCounters(compute_us=2_000_000)})
    assert value(
        registry, "qos_gpu_seconds_total", tenant="__unattributed__", model="simgpu"
    ) == pytest.approx(2.0)


def test_labels_are_bounded(registry: CollectorRegistry) -> None:
    """Tenants are the policy's, models the policy's or Triton's: else `__unknown__`."""
    ledger = ledger_on(registry, Clock())
    ledger.completed("intruder", "made-up-model", 0.1)
    ledger.completed("heavy", "llm", 0.1)  # a policy model, never scraped
    assert value(registry, "qos_usage_requests_total", tenant="__unknown__", model="__unknown__")
    assert value(registry, "qos_usage_requests_total", tenant="heavy", model="llm") == 1
    ledger.completed("light", "simgpu", 0.1)  # not scraped yet: unknown
    ledger.scraped("t0", {"simgpu": TritonCounters()})
    ledger.completed("light", "simgpu", 0.1)  # served by Triton: now a label
    assert value(registry, "qos_usage_requests_total", tenant="light", model="simgpu") == 1
    for i in range(100):  # a client naming models at will grows nothing
        ledger.completed("light", f"made-up-{i}", 0.1)
    assert len(ledger._cached) == 4  # (label pairs) unknown x2, heavy/llm, light/simgpu
    for i in range(MAX_CACHED):  # the raw pairs seen are kept up to a bound, then looked up
        ledger.completed("light", f"made-up-{i}", 0.1)
    assert len(ledger._raw) == MAX_CACHED
    # Every one counted: these, the 100 above and light/simgpu before its scrape.
    assert value(registry, "qos_usage_requests_total", tenant="light", model="__unknown__") == (
        MAX_CACHED + 100 + 1
    )


def test_a_reload_that_adds_a_model_labels_it_from_then_on(registry: CollectorRegistry) -> None:
    """The raw pairs seen are remembered; a policy whose models differ (same tenants) is a
    new reading of them."""
    models = {"llm"}
    ledger = UsageLedger(Metrics(registry), lambda: TENANTS, lambda: models, clock=Clock())
    ledger.completed("heavy", "vision", 0.1)
    ledger.completed("heavy", "vision", 0.1)
    models = {"llm", "vision"}  # the reload
    ledger.completed("heavy", "vision", 0.1)
    assert value(registry, "qos_usage_requests_total", tenant="heavy", model="__unknown__") == 2
    assert value(registry, "qos_usage_requests_total", tenant="heavy", model="vision") == 1


def test_demand_counts_every_decision_with_a_tenant(registry: CollectorRegistry) -> None:
    ledger = ledger_on(registry, Clock())
    attrs = RequestAttributes(method="POST", path="/v2/models/llm/infer", headers={})
    for _ in range(3):
        ledger.asked("heavy", attrs)
    ledger.asked(None, attrs)  # no tenant: not demand of anyone's
    assert value(registry, "qos_usage_demand_total", tenant="heavy", model="llm") == 3


def _duration(seconds: float) -> duration_pb2.Duration:
    found = duration_pb2.Duration()
    found.FromNanoseconds(int(seconds * 1e9))
    return found


def entry(path: str, tenant: str | None, **times: float) -> Any:
    common = accesslog_pb2.AccessLogCommon(**{k: _duration(v) for k, v in times.items()})
    headers = {"x-qos-tenant": tenant} if tenant else {}
    return accesslog_pb2.HTTPAccessLogEntry(
        common_properties=common,
        request=accesslog_pb2.HTTPRequestProperties(path=path, request_headers=headers),
    )


@pytest.mark.parametrize(
    ("times", "upstream_s"),
    [
        ({"time_to_last_upstream_tx_byte": 0.5, "time_to_last_upstream_rx_byte": 0.8}, 0.3),
        ({"time_to_first_upstream_tx_byte": 0.1, "time_to_last_upstream_rx_byte": 0.4}, 0.3),
        ({"time_to_last_upstream_tx_byte": 0.2, "duration": 1.2}, 1.0),  # response cut short
        ({"duration": 0.5}, None),  # never sent to Triton (refused, or the client left)
    ],
)
def test_upstream_time(times: dict[str, float], upstream_s: float | None) -> None:
    found = upstream_time_of(entry("/v2/models/simgpu/infer", "heavy", **times))
    assert found == (None if upstream_s is None else pytest.approx(upstream_s))


def test_an_entry_is_counted_for_the_tenant_the_sidecar_set(registry: CollectorRegistry) -> None:
    class Service:
        usage = ledger_on(registry, Clock())

    usage: Any = Service()
    times = {"time_to_last_upstream_tx_byte": 0.1, "time_to_last_upstream_rx_byte": 0.2}
    note_usage(usage, entry("/v2/models/llm/infer", "heavy", **times), None)
    lease = LeaseRef("light", "interactive", "id", model="llm")
    grpc_path = "/inference.GRPCInferenceService/ModelInfer"
    note_usage(usage, entry(grpc_path, None, **times), lease)  # the lease names both
    note_usage(usage, entry("/v2/models/llm/infer", "heavy", duration=0.3), None)  # refused
    assert value(registry, "qos_usage_requests_total", tenant="heavy", model="llm") == 1
    assert value(registry, "qos_usage_requests_total", tenant="light", model="llm") == 1


def test_a_model_learnt_later_is_labelled_from_then_on(registry: CollectorRegistry) -> None:
    """A decision before the first scrape counts as `__unknown__`, and is not kept so: the
    same pair is labelled with its model once Triton's page lists it."""
    ledger = ledger_on(registry, Clock())
    attrs = RequestAttributes(method="POST", path="/v2/models/simgpu/infer", headers={})
    ledger.asked("heavy", attrs)
    ledger.scraped("t0", {"simgpu": TritonCounters()})
    ledger.asked("heavy", attrs)
    ledger.asked("heavy", attrs)
    assert value(registry, "qos_usage_demand_total", tenant="heavy", model="__unknown__") == 1
    assert value(registry, "qos_usage_demand_total", tenant="heavy", model="simgpu") == 2
