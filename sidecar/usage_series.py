"""The per-tenant usage series (chargeback), attached to `Metrics` as `metrics.usage`.

Labels are bounded as everywhere: tenants are the policy's (else `__unknown__`), models the
policy's or Triton's (else `__unknown__`), chosen by `sidecar/usage.py` before counting. The
meaning of each series and how `qos-sidecar usage` reads them: docs/usage.md.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class UsageSeries:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "qos_usage_requests_total",
            "Requests that reached Triton and ended (Envoy's access log), by tenant and model.",
            ["tenant", "model"],
            registry=registry,
        )
        self.demand = Counter(
            "qos_usage_demand_total",
            "Requests asked for (every decision with a tenant, admitted or refused, retries "
            "included), by tenant and model.",
            ["tenant", "model"],
            registry=registry,
        )
        self.tokens = Counter(
            "qos_usage_tokens_total",
            "LLM tokens by tenant, model and kind: prompt (admitted requests), generated "
            "(read from the response). Models with a token policy, ext_proc mode.",
            ["tenant", "model", "kind"],
            registry=registry,
        )
        self.work = Counter(
            "qos_usage_work_seconds_total",
            "Upstream time (request sent to Triton until its response came back) of ended "
            "requests, by tenant and model: the weights GPU-seconds are split by.",
            ["tenant", "model"],
            registry=registry,
        )
        self.gpu_seconds = Counter(
            "qos_gpu_seconds_total",
            "Triton's compute time (nv_inference_compute_infer_duration_us) given to tenants "
            "in proportion to their work in each scrape interval; tenant=__unattributed__: "
            "what found no work. Summed over tenants it follows Triton's counter.",
            ["tenant", "model"],
            registry=registry,
        )
