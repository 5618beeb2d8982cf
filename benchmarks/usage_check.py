"""Issue 13 §5 in the QoS benchmark: the GPU-seconds a sidecar attributed to tenants
(`qos_gpu_seconds_total`, tenants other than `__unattributed__`) against Triton's own
compute-time counter (`nv_inference_compute_infer_duration_us`, every model) over the same
run of one system. Target: within 5 %.

`GpuSecondsCheck.start` reads both once the sidecar has scraped Triton (its baseline is its
first scrape); `finish`, after the system's last point has drained, waits until the sidecar
has given out what Triton counted (compute waits up to `core.usage.HOLD_S` for its work) and
reads both again.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from sidecar.core.load import parse_triton_metrics
from sidecar.core.usage import HOLD_S, UNATTRIBUTED

TOLERANCE = 0.05


def _page(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def triton_compute_s(metrics_url: str) -> float:
    """Triton's compute-time counters, every model summed, in seconds."""
    return sum(c.compute_us for c in parse_triton_metrics(_page(metrics_url)).values()) / 1e6


def sidecar_gpu_s(admin_url: str) -> tuple[dict[str, float], bool]:
    """(GPU-seconds per tenant label, `__unattributed__` included; scraped Triton yet) from
    the sidecar's /metrics."""
    per_tenant: dict[str, float] = {}
    scraped = False
    for family in text_string_to_metric_families(_page(admin_url + "/metrics")):
        for sample in family.samples:
            scraped = scraped or sample.name == "qos_backend_queue_depth"
            if sample.name == "qos_gpu_seconds_total":
                tenant = sample.labels.get("tenant", "")
                per_tenant[tenant] = per_tenant.get(tenant, 0.0) + sample.value
    return per_tenant, scraped


@dataclass
class GpuSecondsCheck:
    metrics_url: str
    admin_url: str
    triton_before_s: float = 0.0
    before: dict[str, float] = field(default_factory=dict)

    def start(self, timeout_s: float = 30.0) -> GpuSecondsCheck:
        deadline = time.monotonic() + timeout_s
        while not sidecar_gpu_s(self.admin_url)[1] and time.monotonic() < deadline:
            time.sleep(0.1)
        self.triton_before_s = triton_compute_s(self.metrics_url)
        self.before = sidecar_gpu_s(self.admin_url)[0]
        return self

    def _grown(self) -> dict[str, float]:
        now = sidecar_gpu_s(self.admin_url)[0]
        return {t: v - self.before.get(t, 0.0) for t, v in now.items() if v > self.before.get(t, 0)}

    def finish(self, expected_s: Mapping[str, float] | None = None) -> dict[str, Any]:
        """The comparison, for results.json (see `line`). `expected_s`: each tenant's work
        by the benchmark's own account (the model's service time of its served requests),
        to compare the split with: `share_error_pp`, the largest difference of a tenant's
        share, in percentage points."""
        triton_s = triton_compute_s(self.metrics_url) - self.triton_before_s
        deadline = time.monotonic() + HOLD_S + 2.0
        grown = self._grown()
        while sum(grown.values()) < triton_s * 0.999 and time.monotonic() < deadline:
            time.sleep(0.2)
            grown = self._grown()
        unattributed = grown.pop(UNATTRIBUTED, 0.0)
        attributed = sum(grown.values())
        ratio = attributed / triton_s if triton_s > 0 else None
        found: dict[str, Any] = {
            "triton_compute_s": round(triton_s, 3),
            "attributed_s": round(attributed, 3),
            "unattributed_s": round(unattributed, 3),
            "attributed_over_triton": None if ratio is None else round(ratio, 4),
            "per_tenant_s": {t: round(v, 3) for t, v in sorted(grown.items())},
        }
        if expected_s:
            found["share_error_pp"] = share_error_pp(grown, expected_s)
        return found


def share_error_pp(attributed: Mapping[str, float], expected: Mapping[str, float]) -> float:
    """The largest difference between a tenant's share of `attributed` and of `expected`."""
    got, want = sum(attributed.values()) or 1.0, sum(expected.values()) or 1.0
    tenants = set(attributed) | set(expected)
    worst = max(
        (abs(attributed.get(t, 0.0) / got - expected.get(t, 0.0) / want) for t in tenants),
        default=0.0,
    )
    return round(100 * worst, 2)


def line(name: str, found: Mapping[str, Any]) -> str:
    """One TARGET line (benchmarks/qos_targets.py's form) for a system's comparison."""
    ratio = found.get("attributed_over_triton")
    value = (
        f"attributed {found['attributed_s']:.1f} s + unattributed {found['unattributed_s']:.1f} s"
        f" of Triton's {found['triton_compute_s']:.1f} s compute"
    )
    met = ratio is not None and abs(ratio - 1.0) <= TOLERANCE
    value += "" if ratio is None else f" ({ratio:.1%})"
    if found.get("share_error_pp") is not None:
        value += f"; tenant shares within {found['share_error_pp']:.1f} pp of the service time"
    return (
        f"TARGET gpu_seconds_attributed[{name}]: {value} (within 5%) {'met' if met else 'missed'}"
    )
