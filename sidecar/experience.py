"""Per-tenant experience series: what admitted requests lived through, from Envoy's access log.

Attached to `Metrics` as `metrics.experience`. Labels stay bounded: a lease names its tenant
and class as the policy did when it was granted; a name the current policy no longer has
(a reload removed it) is reported as `__unknown__`. The judgement is `core.experience`'s.
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry

from sidecar.core.experience import CompletionTimings, slo_result
from sidecar.plain_metrics import PlainCounter, PlainHistogram
from sidecar.policy.model import Policy

UNKNOWN = "__unknown__"
# From a small model's few milliseconds to a long generation's minutes.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def code_class(status: int | None) -> str:
    """1xx..5xx, or `none` when the client got no response."""
    return f"{status // 100}xx" if status is not None and 100 <= status < 600 else "none"


class ExperienceSeries:
    """Updated on every completion: plain numbers, no lock (`sidecar/plain_metrics.py`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.first_byte_seconds = PlainHistogram(
            "qos_time_to_first_byte_seconds",
            "Admitted requests' time from arrival at Envoy to the first byte from Triton (for a "
            "streaming LLM: the wait before the first token), by tenant and granted class.",
            ["tenant", "class"],
            SECONDS_BUCKETS,
            registry,
        )
        self.duration_seconds = PlainHistogram(
            "qos_request_duration_seconds",
            "Admitted requests' time from arrival at Envoy to the last byte sent back, by "
            "tenant and granted class (requests the client left before any answer excluded: "
            "they count as missed in qos_slo_requests_total).",
            ["tenant", "class"],
            SECONDS_BUCKETS,
            registry,
        )
        self.slo = PlainCounter(
            "qos_slo_requests_total",
            "Admitted requests judged against their class's latency_objective_ms, by tenant, "
            "class and result: met, missed (slower, or the client left first), failed (5xx).",
            ["tenant", "class", "result"],
            registry,
        )
        self.responses = PlainCounter(
            "qos_responses_total",
            "Admitted requests' responses as Envoy sent them, by tenant, class and code "
            "(2xx, 4xx, 5xx, ...; none: the client left before any).",
            ["tenant", "class", "code"],
            registry,
        )

    def completed(
        self, tenant: str, klass: str, timings: CompletionTimings, policy: Policy
    ) -> None:
        """Record one admitted request's end (its lease's tenant and class)."""
        class_policy = policy.classes.get(klass)
        tenant = tenant if tenant in policy.tenants else UNKNOWN
        klass = klass if class_policy is not None else UNKNOWN
        labels = (tenant, klass)
        if timings.first_byte_s is not None:
            self.first_byte_seconds.observe(labels, timings.first_byte_s)
        if timings.duration_s is not None and math.isfinite(timings.duration_s):
            self.duration_seconds.observe(labels, timings.duration_s)
        self.responses.inc((tenant, klass, code_class(timings.status)))
        if class_policy is not None:
            result = slo_result(timings, class_policy.latency_objective_ms)
            if result is not None:
                self.slo.inc((tenant, klass, result.value))
