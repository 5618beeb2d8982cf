"""Issue 13 §5 on the real stack: per-tenant usage (chargeback).

Real Envoy (the shipped ext_authz HTTP and ext_proc bootstraps), Triton running the
simulated GPU model, Valkey, the sidecar as its own process. Two tenants send the same
number of requests, one with eight times the work of the other. The sidecar's
`qos_gpu_seconds_total` split over the two must add up to the increase of Triton's own
compute-time counter, read from Triton's /metrics, within 5 %, and the heavier tenant must
get the bigger share.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest

from devstack.stack import LocalStack
from sidecar.core.load import parse_triton_metrics
from sidecar.core.usage import UNATTRIBUTED
from tests.binaries import require_binaries
from tests.stack_client import infer, key_digest, metric_value, wait_for, write_policy_file

pytestmark = pytest.mark.stack
HEAVY_MS, LIGHT_MS, EACH = 80.0, 10.0, 8
MODES = ("http", "extproc")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    require_binaries("envoy", "triton", "valkey")
    work = tmp_path_factory.mktemp("usage")
    tenants = "".join(
        f"""
  {name}:
    match: {{api_key_sha256: [{key_digest("k-" + name)}]}}
    allowed_classes: [interactive]
    default_class: interactive
    buckets:
    - {{unit: requests, rate: 100, per: second, burst: 100}}"""
        for name in ("heavy", "light")
    )
    policy = write_policy_file(
        work / "policies",
        f"""
classes:
  interactive: {{rank: 1, latency_objective_ms: 2000, max_wait_ms: 1000, triton_priority: 1}}
tenants:{tenants}
""",
    )
    with LocalStack(work, policy, modes=MODES) as running:
        yield running


def triton_compute_s(stack: LocalStack) -> float:
    """Triton's own compute-time counter of simgpu, in seconds."""
    assert stack.triton is not None
    with urllib.request.urlopen(stack.triton.metrics_url, timeout=5) as response:
        page = parse_triton_metrics(response.read().decode())
    return page["simgpu"].compute_us / 1e6


def gpu_seconds(stack: LocalStack, tenant: str) -> float:
    return metric_value(stack.admin_url, "qos_gpu_seconds_total", tenant=tenant, model="simgpu")


@pytest.mark.parametrize("mode", MODES)
def test_gpu_seconds_add_up_to_tritons_compute_time(stack: LocalStack, mode: str) -> None:
    # The sidecar's baseline is its first scrape: wait until it has seen simgpu.
    wait_for(lambda: "simgpu" in _scraped_models(stack), 30, "the sidecar scraped Triton")
    before_s = triton_compute_s(stack)
    heavy_before, light_before = gpu_seconds(stack, "heavy"), gpu_seconds(stack, "light")
    requests_before = {t: requests_of(stack, t) for t in ("heavy", "light")}
    for _ in range(EACH):
        assert infer(stack.url(mode), api_key="k-heavy", delay_ms=HEAVY_MS).status == 200
        assert infer(stack.url(mode), api_key="k-light", delay_ms=LIGHT_MS).status == 200
    grown_s = triton_compute_s(stack) - before_s
    assert grown_s >= EACH * (HEAVY_MS + LIGHT_MS) / 1000 * 0.9  # Triton counted the work

    def grown(tenant: str) -> float:
        return gpu_seconds(stack, tenant) - (heavy_before if tenant == "heavy" else light_before)

    def attributed() -> float:
        return grown("heavy") + grown("light")

    wait_for(lambda: attributed() >= grown_s * 0.95, 30, "the compute time was attributed")
    heavy, light = grown("heavy"), grown("light")
    unattributed = gpu_seconds(stack, UNATTRIBUTED)
    assert attributed() == pytest.approx(grown_s, rel=0.05), (heavy, light, unattributed)
    assert heavy > 2 * light > 0, (heavy, light)
    for tenant in ("heavy", "light"):
        requests = requests_of(stack, tenant) - requests_before[tenant]
        assert requests == EACH, (tenant, requests)


def requests_of(stack: LocalStack, tenant: str) -> float:
    return metric_value(stack.admin_url, "qos_usage_requests_total", tenant=tenant, model="simgpu")


def test_demand_counts_every_decision(stack: LocalStack) -> None:
    """Every decision of a tenant for simgpu (both modes above, and this test's own) is
    demand, labelled with the model."""
    before = metric_value(stack.admin_url, "qos_usage_demand_total", tenant="light", model="simgpu")
    for _ in range(3):
        assert infer(stack.url("http"), api_key="k-light", delay_ms=1).status == 200
    after = metric_value(stack.admin_url, "qos_usage_demand_total", tenant="light", model="simgpu")
    assert after - before == 3
    assert metric_value(stack.admin_url, "qos_usage_demand_total", model="__unknown__") == 0


def _scraped_models(stack: LocalStack) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(stack.admin_url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        sample.labels.get("model", "")
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "qos_backend_queue_depth"
    }
