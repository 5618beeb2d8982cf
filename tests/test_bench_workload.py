"""The QoS benchmark's arrival times (benchmarks/workload.py): a renewal process (Poisson or
gamma) holds the point's count exactly and keeps its gaps' burstiness."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.workload import Arrival, Trace, arrival_times, default_tenants, noisy_burst

BURSTY = Arrival("gamma", cv=4.0)


@pytest.mark.parametrize("arrival", [Arrival(), BURSTY], ids=["poisson", "gamma-cv4"])
def test_a_point_holds_its_rate_times_its_duration_in_order_within_the_window(
    arrival: Arrival,
) -> None:
    for seed in range(20):
        for rate in (11.84, 23.68, 47.36):
            times, rows = arrival_times(np.random.default_rng(seed), arrival, rate, 11.5)
            assert rows is None
            assert len(times) in (int(rate * 11.5), int(rate * 11.5) + 1)
            assert np.all(np.diff(times) >= 0)
            assert times[0] >= 0.0 and times[-1] < 11.5


def test_a_point_at_twice_the_rate_never_holds_fewer_requests() -> None:
    """Drawn freely, gamma cv 4 gaps gave a quick point fewer requests than the point at
    half its rate (issue 12). Each point has its own seed, as in the benchmark."""
    for seed in range(50):
        counts = [
            len(arrival_times(np.random.default_rng(10 * seed + i), BURSTY, m * 23.68, 11.5)[0])
            for i, m in enumerate((0.5, 1, 2, 3))
        ]
        assert counts == sorted(counts) and counts[0] < counts[-1]


def test_the_fractional_part_of_the_count_is_kept_on_average() -> None:
    counts = [
        len(arrival_times(np.random.default_rng(s), Arrival(), 2.5, 1.0)[0]) for s in range(400)
    ]
    assert set(counts) == {2, 3}
    assert abs(np.mean(counts) - 2.5) < 0.1


@pytest.mark.parametrize(("arrival", "low", "high"), [(Arrival(), 0.9, 1.1), (BURSTY, 3.0, 5.0)])
def test_the_gaps_keep_their_coefficient_of_variation(
    arrival: Arrival, low: float, high: float
) -> None:
    cvs = []
    for seed in range(10):
        gaps = np.diff(arrival_times(np.random.default_rng(seed), arrival, 50.0, 100.0)[0])
        cvs.append(gaps.std() / gaps.mean())
    assert low < float(np.median(cvs)) < high


def test_bursty_arrivals_come_in_clusters_that_poisson_ones_do_not() -> None:
    """Counts per 100 ms at 50 req/s: gamma cv 4 leaves many windows empty, Poisson few."""

    def empty_share(arrival: Arrival) -> float:
        times = arrival_times(np.random.default_rng(3), arrival, 50.0, 100.0)[0]
        counts = np.bincount((times / 0.1).astype(int), minlength=1000)
        return float(np.mean(counts == 0))

    assert empty_share(Arrival()) < 0.05  # e^-5 of them
    assert empty_share(BURSTY) > 0.3


def bursty_trace() -> Trace:
    """Clusters of ten rows 1 ms apart, a quiet second between clusters, 100 clusters."""
    offsets = np.asarray([c * 1.0 + i * 0.001 for c in range(100) for i in range(10)])
    sizes = np.arange(len(offsets), dtype=np.int64)
    return Trace(Path("synthetic.csv"), offsets, sizes, sizes)


def test_a_trace_window_holds_the_points_count_and_the_traces_shape() -> None:
    trace = bursty_trace()
    for seed in range(20):
        times, rows = arrival_times(
            np.random.default_rng(seed), Arrival("trace"), 30.0, 10.0, trace
        )
        assert rows is not None and len(times) == len(rows) == 300
        assert np.all(np.diff(times) >= 0) and times[0] == 0.0 and times[-1] < 10.0
        # Consecutive rows (round the end), and their gaps in the trace's proportions.
        assert np.all(np.diff(rows) % len(trace.offsets_s) == 1)
        gaps = np.diff(times)
        assert np.isclose(gaps.max() / gaps[gaps > 0].min(), 0.991 / 0.001, rtol=1e-6)


def test_a_trace_point_at_a_higher_rate_never_holds_fewer_requests() -> None:
    """Before, each point held what its stretch of the trace held: a quiet stretch gave 3x
    fewer requests than 2x."""
    trace = bursty_trace()
    for seed in range(20):
        counts = [
            len(
                arrival_times(
                    np.random.default_rng(seed + m), Arrival("trace"), m * 17.5, 10.0, trace
                )[0]
            )
            for m in (1, 2, 3)
        ]
        assert counts == sorted(counts) and counts[0] >= 174


def test_a_client_with_identity_headers_states_its_classs_timeout() -> None:
    """The sidecar rows' clients say how long they wait (x-qos-timeout-ms, what the sidecar
    bounds holds by); the baselines' send nothing of the kind, nor does a run without it."""
    from benchmarks.loadgen import GenOptions, prepare
    from benchmarks.models import MODELS
    from benchmarks.workload import WorkloadConfig, generate

    config = WorkloadConfig()
    schedule = generate(config, 20.0, 5.0, seed=3)
    timeouts = {name: c.deadline_s * 2 for name, c in config.classes.items()}
    model, tenants, classes = MODELS["llm"], config.tenants, config.classes
    stated = prepare(schedule, model, tenants, classes, GenOptions(), timeouts)
    assert {p.request.klass for p in stated} == set(config.classes)
    for p in stated:
        assert p.headers["x-qos-timeout-ms"] == str(round(timeouts[p.request.klass] * 1000))
    plain = prepare(schedule, model, tenants, classes, GenOptions(identity_headers=False), timeouts)
    assert not any("x-qos-timeout-ms" in p.headers for p in plain)
    unstated = prepare(schedule, model, tenants, classes, GenOptions())
    assert not any("x-qos-timeout-ms" in p.headers for p in unstated)


def test_each_request_carries_an_id_unique_across_runs_where_the_model_logs_batches() -> None:
    """`llm`'s requests carry a KServe v2 id in the body, unique within a run and across runs
    (which share the point's batch log: benchmarks/device_log.py joins on it); the generate
    extension's bodies carry none."""
    import json

    from benchmarks.loadgen import GenOptions, prepare
    from benchmarks.models import MODELS
    from benchmarks.workload import WorkloadConfig, generate

    config = WorkloadConfig()
    schedule = generate(config, 20.0, 2.0, seed=3)
    runs = [
        prepare(schedule, MODELS["llm"], config.tenants, config.classes, GenOptions())
        for _ in range(2)
    ]
    ids = [p.request_id for run in runs for p in run]
    assert len(set(ids)) == len(ids) == 2 * len(schedule) and all(ids)
    assert all(json.loads(p.body)["id"] == p.request_id for p in runs[0])
    ifb = prepare(schedule, MODELS["llm_ifb"], config.tenants, config.classes, GenOptions())
    assert all(p.request_id == "" and "id" not in json.loads(p.body) for p in ifb)


def test_the_noisy_point_raises_the_noisy_tenant_alone() -> None:
    """At the noisy point's load, every quiet tenant sends what it sends at 1x and the noisy
    tenant three times as much; quotas are those of the policy, unchanged."""
    tenants = default_tenants()
    burst, load = noisy_burst(tenants, 3.0)
    assert load == pytest.approx(0.4 * 3 + 0.6)
    assert burst[0].share * load == pytest.approx(3 * tenants[0].share)
    for before, after in zip(tenants[1:], burst[1:], strict=True):
        assert after.share * load == pytest.approx(before.share)
        assert after.quota_weight == before.quota_weight
    assert sum(t.share for t in burst) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        noisy_burst(tenants, 0.0)
