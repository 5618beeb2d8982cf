"""`qos-sidecar usage` against a fake Prometheus HTTP API serving recorded samples
(tests/fake_prometheus.py): the per-tenant table and CSV, entitlements from a policy, and the
share of the period in sustained contention."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.policy.loader import load_policy
from sidecar.usage_report import UsageQueryError, entitlement_per_s, parse_time
from tests.fake_prometheus import FakePrometheus, serving
from tests.stack_client import key_digest, write_policy_file

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC).timestamp()
SINCE, UNTIL = "2026-12-01T10:00:00Z", "2026-12-01T11:00:00Z"
PERIOD_S = 3600.0
BUSY_S = 3480.0  # the counters grow from T0+60 to T0+3540 only: all inside the period
STEP_S = 60.0


def counter(rate_per_s: float) -> list[tuple[float, float]]:
    """A counter scraped every 15 s from T0-60 to T0+3660, growing at `rate_per_s` while
    busy."""
    return [(T0 + t, rate_per_s * min(max(0.0, t - 60.0), BUSY_S)) for t in range(-60, 3661, 15)]


def gauge(
    value_at: dict[tuple[float, float], float], otherwise: float
) -> list[tuple[float, float]]:
    """A gauge scraped every 15 s: `value_at[(start, end)]` between T0+start and T0+end."""

    def value(t: float) -> float:
        return next((v for (a, b), v in value_at.items() if a <= t < b), otherwise)

    return [(T0 + t, value(t)) for t in range(-60, 3661, 15)]


@pytest.fixture
def prometheus() -> Iterator[FakePrometheus]:
    fake = FakePrometheus()
    for instance in ("a", "b"):  # two sidecar replicas: the report sums them
        fake.add("qos_usage_requests_total", _l("heavy", "simgpu", instance), counter(1.0))
        demand = gauge({(600, 1200): 3.0, (2010, 2130): 3.0}, otherwise=1.0)
        fake.add("qos_model_demand_rate", {"model": "simgpu", "instance": instance}, demand)
        fake.add("qos_model_drain_rate", {"model": "simgpu", "instance": instance}, gauge({}, 5.0))
    fake.add("qos_usage_requests_total", _l("light", "simgpu"), counter(0.5))
    fake.add("qos_usage_requests_total", _l("chat", "llm"), counter(0.1))
    fake.add("qos_gpu_seconds_total", _l("heavy", "simgpu"), counter(0.6))
    fake.add("qos_gpu_seconds_total", _l("light", "simgpu"), counter(0.05))
    fake.add("qos_gpu_seconds_total", _l("__unattributed__", "simgpu"), counter(0.01))
    fake.add("qos_gpu_seconds_total", _l("chat", "llm"), counter(0.2))
    fake.add("qos_usage_tokens_total", {**_l("chat", "llm"), "kind": "prompt"}, counter(100))
    fake.add("qos_usage_tokens_total", {**_l("chat", "llm"), "kind": "generated"}, counter(50))
    fake.add("qos_usage_demand_total", _l("heavy", "simgpu"), counter(3.0))
    fake.add("qos_usage_demand_total", _l("light", "simgpu"), counter(0.5))
    fake.add("qos_usage_demand_total", _l("chat", "llm"), counter(0.1))
    with serving(fake) as running:
        yield running


def _l(tenant: str, model: str, instance: str = "a") -> dict[str, str]:
    return {"tenant": tenant, "model": model, "instance": instance}


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    def tenant(name: str, buckets: str) -> str:
        return f"""
  {name}:
    match: {{api_key_sha256: [{key_digest(name)}]}}
    allowed_classes: [interactive, batch]
    default_class: interactive
    buckets: {buckets}"""

    return write_policy_file(
        tmp_path / "policies",
        f"""
classes:
  interactive: {{rank: 1, latency_objective_ms: 2000, max_wait_ms: 100, triton_priority: 1}}
  batch: {{rank: 2, latency_objective_ms: 60000, max_wait_ms: 1000, triton_priority: 2}}
tenants:{tenant("heavy", "[{unit: requests, rate: 2, per: second, burst: 10}]")}\
{tenant("light", "[{unit: requests, rate: 120, per: minute, burst: 10, classes: [batch]}]")}\
{tenant("chat", "[{unit: cost, rate: 100, per: second, burst: 1000}]")}
""",
    )


def run_usage(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["usage", "--since", SINCE, "--until", UNTIL, "--step", str(STEP_S), *args])
    return code, capsys.readouterr().out


def test_csv_per_tenant_and_model(
    prometheus: FakePrometheus, policy_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run_usage(
        capsys, "--prometheus", prometheus.url, "--format", "csv", "--policy", str(policy_dir)
    )
    assert code == 0
    rows = {(r["tenant"], r["model"]): r for r in csv.DictReader(io.StringIO(out))}
    assert list(rows) == [
        ("chat", "llm"),
        ("heavy", "simgpu"),
        ("light", "simgpu"),
        ("__unattributed__", "simgpu"),
    ]
    heavy, light, chat = rows["heavy", "simgpu"], rows["light", "simgpu"], rows["chat", "llm"]
    assert float(heavy["requests"]) == 2 * BUSY_S  # two replicas, summed
    assert float(light["requests"]) == 0.5 * BUSY_S
    assert float(heavy["gpu_seconds"]) == pytest.approx(0.6 * BUSY_S, abs=1e-3)
    assert float(heavy["gpu_share"]) == pytest.approx(0.6 / 0.66, abs=1e-3)
    assert float(rows["__unattributed__", "simgpu"]["gpu_share"]) == pytest.approx(
        0.01 / 0.66, abs=1e-3
    )
    assert (float(chat["prompt_tokens"]), float(chat["generated_tokens"])) == (
        100 * BUSY_S,
        50 * BUSY_S,
    )
    assert float(chat["gpu_share"]) == 1.0
    assert float(heavy["demand_per_s"]) == pytest.approx(3.0 * BUSY_S / PERIOD_S, abs=1e-3)
    # Entitlements: heavy's bucket, light's only (class-restricted) bucket, chat's none.
    assert (heavy["entitlement_per_s"], light["entitlement_per_s"]) == ("2", "2")
    assert chat["entitlement_per_s"] == ""
    # Contention: 10 of the 61 samples (10:10-10:19) in one 600 s run; the 120 s one at
    # 10:33 is under the 300 s threshold. llm has no demand series: blank.
    assert float(heavy["contention_share"]) == pytest.approx(10 / 61, abs=1e-3)
    assert chat["contention_share"] == ""


def test_table_says_when_the_answer_is_more_gpus(
    prometheus: FakePrometheus, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run_usage(capsys, "--prometheus", prometheus.url)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "tenant",
        "model",
        "requests",
        "prompt_tokens",
        "generated_tokens",
        "gpu_seconds",
        "gpu_share",
        "demand_per_s",
        "entitlement_per_s",
        "contention_share",
    ]
    heavy = next(line.split() for line in lines if line.startswith("heavy"))
    assert heavy[:3] == ["heavy", "simgpu", "6960"]
    assert lines[-1].startswith("simgpu: demand above capacity in runs over 300s for 16%")


def test_a_longer_threshold_finds_no_sustained_contention(
    prometheus: FakePrometheus, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("--prometheus", prometheus.url, "--format", "csv", "--contention-threshold", "600")
    code, out = run_usage(capsys, *args)
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {r["contention_share"] for r in rows if r["model"] == "simgpu"} == {"0.000"}


def test_gpu_seconds_split_from_tritons_counter_over_every_replicas_work(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--gpu-from triton` (several replicas in front of one Triton): each step's compute
    increase is split over the work of all replicas in that step, so a mix that changes
    half-way is followed: heavy 3:1 in the first half, 1:1 in the second."""
    fake = FakePrometheus()
    first, second = (60, 1800), (1800, 3540)
    work = {
        ("heavy", "a"): {first: 2.0, second: 0.5},
        ("heavy", "b"): {first: 1.0, second: 0.5},
        ("light", "b"): {first: 1.0, second: 1.0},
    }
    for (tenant, instance), rates in work.items():
        series = _l(tenant, "simgpu", instance)
        fake.add("qos_usage_work_seconds_total", series, piecewise(rates))
    compute_us = piecewise({first: 500_000.0, second: 500_000.0})
    fake.add(
        "nv_inference_compute_infer_duration_us", {"model": "simgpu", "version": "1"}, compute_us
    )
    with serving(fake):
        code, out = run_usage(
            capsys, "--prometheus", fake.url, "--format", "csv", "--gpu-from", "triton"
        )
    assert code == 0
    rows = {r["tenant"]: r for r in csv.DictReader(io.StringIO(out))}
    assert float(rows["heavy"]["gpu_seconds"]) == pytest.approx(0.5 * 1740 * (0.75 + 0.5), abs=1e-2)
    assert float(rows["light"]["gpu_seconds"]) == pytest.approx(0.5 * 1740 * (0.25 + 0.5), abs=1e-2)
    assert "sum by (model) (increase(nv_inference_compute_infer_duration_us[60s]))" in fake.queries


def piecewise(rates: dict[tuple[int, int], float]) -> list[tuple[float, float]]:
    """A counter scraped every 15 s growing at `rates[(start, end)]` between T0+start and
    T0+end."""

    def value(t: float) -> float:
        return sum(rate * max(0.0, min(t, b) - a) for (a, b), rate in rates.items())

    return [(T0 + t, value(t)) for t in range(-60, 3661, 15)]


def test_the_queries_are_prometheus_queries(
    prometheus: FakePrometheus, capsys: pytest.CaptureFixture[str]
) -> None:
    run_usage(capsys, "--prometheus", prometheus.url)
    assert "sum by (tenant, model) (increase(qos_gpu_seconds_total[3600s]))" in prometheus.queries
    assert "max by (model) (qos_model_drain_rate)" in prometheus.queries


def test_an_unreachable_prometheus_is_an_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with serving(FakePrometheus()) as gone:
        url = gone.url
    code = main(["usage", "--prometheus", url, "--since", SINCE, "--until", UNTIL])
    assert code == 2
    assert "cannot ask" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("now", 1_000_000.0),
        ("24h", 1_000_000.0 - 86400),
        ("90m", 1_000_000.0 - 5400),
        ("1.5d", 1_000_000.0 - 129600),
        ("2026-12-01T10:00:00Z", T0),
        ("2026-12-01T11:00:00+01:00", T0),
    ],
)
def test_parse_time(text: str, expected: float) -> None:
    assert parse_time(text, now=1_000_000.0) == expected


@pytest.mark.parametrize("text", ["yesterday", "2026-12-01T10:00:00", "24x"])
def test_parse_time_refuses(text: str) -> None:
    with pytest.raises(UsageQueryError):
        parse_time(text, now=0.0)


def test_entitlement_is_the_tightest_bucket_for_every_class(policy_dir: Path) -> None:
    policy = load_policy([policy_dir])
    assert entitlement_per_s(policy.tenants["heavy"]) == 2.0
    assert entitlement_per_s(policy.tenants["light"]) == 2.0  # 120 per minute, batch only
    assert entitlement_per_s(policy.tenants["chat"]) is None
