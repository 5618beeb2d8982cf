"""The shipped Grafana dashboard and Prometheus alert rules (examples/observability/) read only
series a real sidecar exports, with the labels they use; and Envoy's timings of admitted
requests reach the per-tenant experience series.

One stack (Valkey, Triton, the sidecar, an ext_authz HTTP and an ext_proc Envoy) with the
shipped policies (policies/): they have the overload classes, the token model and the tenants
the dashboard is about, which the other e2e modules' own policies do not.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from devstack.demo import token_accounting
from devstack.stack import LocalStack
from sidecar.core.types import Outcome, Reason
from sidecar.metrics import Metrics
from tests.binaries import require_binaries
from tests.promql_refs import (
    Ref,
    alert_exprs,
    dashboard_exprs,
    exported,
    problems,
    refs_of,
    template_refs,
)
from tests.stack_client import in_background, infer, metric_value, wait_for

ROOT = Path(__file__).resolve().parents[1]
OBSERVABILITY = ROOT / "examples" / "observability"
DASHBOARD = OBSERVABILITY / "qos-sidecar-dashboard.json"
ALERTS = OBSERVABILITY / "qos-sidecar-alerts.yaml"
KEYS = {
    "search": "demo-key-search",
    "analytics": "demo-key-analytics",
    "research": "demo-key-research",
}
# Series a healthy run with ordinary traffic never has a sample of: named on /metrics by
# their HELP and TYPE lines only, so their label names are read from the sidecar's own
# declarations (`Metrics`), not from the page. Any other series the files use must have
# samples after this module's traffic.
ONLY_AFTER_EVENTS = {
    "qos_state_errors_total": "a quota store call failed",
    "qos_adapter_errors_total": "an adapter failed to answer a call",
    "qos_backend_scrape_errors_total": "a Triton scrape failed",
    "qos_malformed_requests_total": "an Envoy call could not be read",
    "qos_adaptive_cap": "a class with overload.protect saw its model busy",
    "qos_model_seconds_per_token": "a token model settled 8 responses (ext_proc)",
}
# Label values an expression may match on, where the sidecar's code lists them all.
KNOWN_VALUES = {
    "reason": {reason.value for reason in Reason},
    "outcome": {outcome.value for outcome in Outcome},
}

pytestmark = pytest.mark.stack


def all_refs() -> list[tuple[str, Ref]]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = dashboard_exprs(dashboard) + alert_exprs(yaml.safe_load(ALERTS.read_text()))
    return [(where, ref) for where, expr in exprs for ref in refs_of(expr)] + template_refs(
        dashboard
    )


def declared_labels() -> dict[str, set[str]]:
    """Sample name -> label names, as the sidecar's `Metrics` declares its series."""
    metrics = Metrics(CollectorRegistry())
    out: dict[str, set[str]] = {}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    for group in (metrics, metrics.experience):
        for series in vars(group).values():
            if not isinstance(series, MetricWrapperBase):
                continue
            family = series.describe()[0]
            labels = set(series._labelnames)  # private: prometheus_client has no public accessor
            for suffix in suffixes.get(family.type, ("",)):
                out[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    require_binaries("envoy", "triton", "valkey")
    work = tmp_path_factory.mktemp("stack")
    policies = work / "policies"  # a copy: the reload test rewrites a file
    shutil.copytree(ROOT / "policies", policies)
    with LocalStack(work, policies, modes=("http", "extproc")) as running:
        yield running


def scrape(stack: LocalStack) -> str:
    with urllib.request.urlopen(stack.admin_url + "/metrics", timeout=5) as response:
        return str(response.read().decode())


@pytest.mark.parametrize("mode", ["http", "extproc"])
def test_an_admitted_request_shows_in_its_tenants_latency_and_first_byte(
    stack: LocalStack, mode: str
) -> None:
    url, labels = stack.url(mode), {"tenant": "search", "class": "standard"}

    def count(name: str) -> float:
        if name == "qos_responses_total":
            return metric_value(stack.admin_url, name, **labels, code="2xx")
        return metric_value(stack.admin_url, name, **labels)

    before = {
        name: count(name)
        for name in (
            "qos_request_duration_seconds_count",
            "qos_request_duration_seconds_sum",
            "qos_time_to_first_byte_seconds_count",
            "qos_time_to_first_byte_seconds_sum",
            "qos_slo_requests_total",
            "qos_responses_total",
        )
    }
    sent, delay_ms = 4, 100
    for _ in range(sent):
        assert infer(url, api_key=KEYS["search"], delay_ms=delay_ms).status == 200
    wait_for(
        lambda: count("qos_request_duration_seconds_count") >= before[
            "qos_request_duration_seconds_count"] + sent,
        10,
        "Envoy's access-log entries of the admitted requests",
    )  # fmt: skip
    added = {name: count(name) - value for name, value in before.items()}
    assert added["qos_request_duration_seconds_count"] == sent
    assert added["qos_time_to_first_byte_seconds_count"] == sent
    assert added["qos_slo_requests_total"] == sent  # each judged once: met, missed or failed
    # Envoy's own timings: Triton answers no sooner than the delay each request asked for,
    # so neither its first byte nor the last can have come before it.
    assert added["qos_time_to_first_byte_seconds_sum"] >= sent * delay_ms / 1000
    assert added["qos_request_duration_seconds_sum"] >= added["qos_time_to_first_byte_seconds_sum"]
    assert added["qos_responses_total"] == sent  # 2xx


def hold_some(stack: LocalStack) -> None:
    """Requests held for Triton: research's batch requests (admitted below 4 waiting) and
    search's standard ones (below 8) sent together to Triton's one simgpu instance, which runs
    8 at a time: those that would queue past their class's threshold are held."""
    url, admin = stack.url("http"), stack.admin_url

    def send(tenant: str, count: int, delay_ms: float) -> list[Any]:
        key = KEYS[tenant]
        return [
            in_background(lambda: infer(url, api_key=key, delay_ms=delay_ms)) for _ in range(count)
        ]

    for _ in range(3):
        sent = send("research", 6, 1000) + send("search", 8, 100)
        for thread, _ in sent:
            thread.join(30)
        if metric_value(admin, "qos_hold_duration_seconds_count") > 0:
            return
    raise AssertionError("no request was held in 3 rounds")


def fail_one_reload(stack: LocalStack) -> None:
    """A policy file that does not load, then a good one: both reload results, and the
    failed reload alert's condition while the bad file is there."""
    path = stack.policy_path / "classes.yaml"
    good = path.read_text()

    def last_ok() -> float:
        return metric_value(stack.admin_url, "qos_policy_last_reload_success")

    try:
        path.write_text(good.replace("rank: 1", "rank: 0"))
        wait_for(lambda: last_ok() == 0, 10, "the bad policy's reload failed")
    finally:
        path.write_text(good + "\n# a comment changes the content hash\n")
    wait_for(lambda: last_ok() == 1, 10, "the good policy reloaded")


def test_every_series_of_the_dashboard_and_alerts_is_exported_with_its_labels(
    stack: LocalStack,
) -> None:
    # Traffic for the series the files read: admits and 429s (analytics' burst is 5), and
    # the token model through ext_proc (research's LLM requests, as the demo sends them).
    for _ in range(3):
        assert infer(stack.url("http"), api_key=KEYS["search"]).status == 200
    statuses = {infer(stack.url("http"), api_key=KEYS["analytics"]).status for _ in range(8)}
    assert 200 in statuses
    hold_some(stack)
    token_accounting(stack.url("extproc"), stack.admin_url)
    fail_one_reload(stack)
    wait_for(
        lambda: (
            metric_value(stack.admin_url, "qos_slo_requests_total") > 0
            and metric_value(stack.admin_url, "qos_backend_signal_age_seconds") >= 0
            and "qos_model_in_flight_requests{" in scrape(stack)
        ),
        10,
        "completions recorded and Triton's models read",
    )
    seen, empty = exported(scrape(stack))
    declared = declared_labels()
    refs = all_refs()
    assert refs, "no expression read"
    unseen = sorted({ref.metric for _, ref in refs if ref.metric in empty} - set(ONLY_AFTER_EVENTS))
    assert not unseen, f"exported but no sample after this module's traffic: {unseen}"
    fallback = {name: declared[name] for name in empty if name in ONLY_AFTER_EVENTS}
    found = [p for where, ref in refs for p in problems(where, ref, seen, fallback, KNOWN_VALUES)]
    assert not found, "\n".join(found)
