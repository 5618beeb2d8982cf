"""The fleet benchmark's scenarios (issue 10 §5). Each runs load through a started `Fleet`,
measures, and returns its numbers and its targets.

Every scenario's load is split over the replicas by `Ctx.split` unless it says otherwise, and
every scenario that sends load ends by waiting for every lease set in the store to empty
(`leaked_leases`). How each number is measured is in benchmarks/README.md "Fleet benchmark".
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.fleet_load import (
    CAPPED_CONCURRENCY,
    INTERACTIVE_OBJECTIVE_MS,
    METERED,
    POD_CAP,
    POOL_CAP,
    PROBE_TENANT,
    QUIET,
    WEIGHTED,
    Flow,
    Sent,
    admitted_per_tenant,
    api_key,
    max_min_shares,
    run_in_background,
    run_split,
    schedule,
    statuses,
)
from benchmarks.fleet_stack import (
    Fleet,
    Prober,
    Store,
    decision_histogram,
    decision_reasons,
    histogram_quantile,
    histogram_share_within,
    metric_sum,
    wait_no_leases,
    wait_until,
    zcard_sampler,
)
from devstack.procs import ValkeyProcess
from devstack.valkey_cluster import ValkeyCluster

# Quick / full phase lengths in seconds (before --scale).
PHASES = {
    "quick": {"warmup": 3, "rate": 60, "fair": 30, "base": 4, "outage": 8, "after": 4, "pod": 10,
              "failover": 10},
    "full": {"warmup": 5, "rate": 120, "fair": 60, "base": 5, "outage": 20, "after": 8, "pod": 30,
             "failover": 20},
}  # fmt: skip
LEASE_DRAIN_S = 5.0  # how long the load's last completions may take to release their leases
LEASE_TTL_S = 10.0  # the policy's lease_ttl_s (the default)


@dataclass(frozen=True)
class Target:
    name: str
    value: str
    goal: str
    met: bool

    def line(self) -> str:
        return f"TARGET {self.name}: {self.value} ({self.goal}) {'met' if self.met else 'missed'}"


@dataclass
class Ctx:
    fleet: Fleet
    store: Store
    split: Sequence[float]
    phases: dict[str, float]
    seed: int
    redis_timeout_ms: int
    valkey: ValkeyProcess | None = None
    cluster: ValkeyCluster | None = None
    label: str = "single"  # which store: single | cluster


@dataclass
class Outcome:
    metrics: dict[str, Any] = field(default_factory=dict)
    series: dict[str, Any] = field(default_factory=dict)  # for plots
    targets: list[Target] = field(default_factory=list)


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def check_leaks(ctx: Ctx, out: Outcome, scenario: str) -> None:
    """The load's leases left once it ended (LEASE_DRAIN_S for the last completions); if any
    are, also whether the lease TTL clears them (reported, not the target)."""
    sets, probes, waited = wait_no_leases(ctx.store, LEASE_DRAIN_S)
    left = sum(sets.values())
    out.metrics.update(
        leaked_leases=left, leaked_lease_sets=sets, probe_leases_left_to_ttl=probes,
        lease_drain_s=round(waited, 2),
    )  # fmt: skip
    if left:
        after_ttl, _, _ = wait_no_leases(ctx.store, LEASE_TTL_S + 1.0)
        out.metrics["leaked_leases_after_ttl"] = sum(after_ttl.values())
    out.targets.append(
        Target(
            f"leaked_leases_{scenario}",
            f"{left} leases left {waited:.1f}s after the load ended"
            + (f" ({out.metrics['leaked_leases_after_ttl']} after the lease TTL)" if left else ""),
            f"0 within {LEASE_DRAIN_S:.0f}s, no TTL wait",
            left == 0,
        )
    )


def envoy_urls(ctx: Ctx) -> list[str]:
    return [r.envoy_url for r in ctx.fleet.replicas]


# -- rate and concurrency ---------------------------------------------------------------------


def rate(ctx: Ctx) -> Outcome:
    """Metered tenants offered 1.6x their rates, and a concurrency-capped tenant, all spread
    by the split; admitted rate per tenant over the window, the cap's lease set every 10 ms."""
    warmup, window = ctx.phases["warmup"], ctx.phases["rate"]
    flows = [Flow(t, "standard", 1.6 * r) for t, (r, _) in METERED.items()]
    flows.append(Flow("capped", "standard", 60.0))
    plan = schedule(flows, ctx.split, warmup + window, delay_ms=40, seed=ctx.seed)
    with zcard_sampler(ctx.store, ["qos:{capped}:leases"]) as sampler:
        t0 = time.monotonic() + 0.05
        sent = run_split(envoy_urls(ctx), plan)
    out = Outcome()
    start = t0 + warmup
    thirds = [start + window * i / 3 for i in range(4)]
    for tenant, (policy_rate, burst) in METERED.items():
        parts = [
            admitted_per_tenant(sent, a, b).get(tenant, 0) / (b - a) / policy_rate
            for a, b in itertools.pairwise(thirds)
        ]
        ratio = admitted_per_tenant(sent, start, start + window).get(tenant, 0) / window
        ratio /= policy_rate
        out.metrics[f"{tenant}_rate_ratio"] = round(ratio, 4)
        out.metrics[f"{tenant}_ratio_thirds"] = [round(p, 3) for p in parts]
        out.targets.append(
            Target(
                f"tenant_rate_{ctx.label}_{tenant}",
                f"{ratio * policy_rate:.2f} req/s = {ratio:.3f}x over {window:.0f}s"
                f" (thirds {min(parts):.3f}-{max(parts):.3f}x)",
                f"within ±5% of {policy_rate:g} req/s",
                abs(ratio - 1.0) <= 0.05,
            )
        )
        over = most_over_bucket(sent, tenant, policy_rate, burst)
        out.metrics[f"{tenant}_most_over_bucket"] = round(over, 2)
        out.targets.append(
            Target(
                f"bucket_bound_{ctx.label}_{tenant}",
                f"at most {over:+.2f} requests over what its bucket allows since the first",
                f"<= {BOUND_SLACK_S * policy_rate:.1f}: the rate x {BOUND_SLACK_S:g} s from send"
                " to decision",
                over <= BOUND_SLACK_S * policy_rate,
            )
        )
    # Leased mode's store calls, over the fleet: a slice serves several requests.
    out.metrics["leased_slice_calls"] = sum(
        metric_sum(url, "qos_slice_calls_total") for url in ctx.fleet.admin_urls
    )
    counts = [v[0] for _, v in sampler.samples]
    peak = max(counts, default=0)
    out.metrics.update(
        cap_samples=len(counts), cap_peak=peak, cap_sample_errors=sampler.errors,
        cap_samples_above=sum(1 for c in counts if c > CAPPED_CONCURRENCY),
        capped_refused=sum(1 for s in sent if s.record.tenant == "capped" and not s.ok),
        sent=len(sent), split=list(ctx.split),
    )  # fmt: skip
    out.series["cap"] = [(t - t0, v[0]) for t, v in sampler.samples]
    out.targets.append(
        Target(
            f"concurrency_cap_{ctx.label}",
            f"peak {peak} of {CAPPED_CONCURRENCY} in {len(counts)} samples",
            f"never above {CAPPED_CONCURRENCY}, ZCARD every 10 ms",
            len(counts) > 0 and peak <= CAPPED_CONCURRENCY,
        )
    )
    check_leaks(ctx, out, f"rate_{ctx.label}")
    return out


# A request is counted at its send time, a little before the sidecar decides it: at most this
# long (Envoy and the sidecar on this host), which is what the bucket bound allows for.
BOUND_SLACK_S = 0.05


def most_over_bucket(sent: Sequence[Sent], tenant: str, rate: float, burst: float) -> float:
    """The most `tenant`'s admitted requests ever ran ahead of its bucket: over every prefix
    of the run from its first request, admitted - (burst + rate x time since the first).
    No replica, exact or leased, may admit past the bucket, so this stays at or under the
    requests of BOUND_SLACK_S at the rate (send times precede the decisions)."""
    first = min((s.sent_at for s in sent if s.record.tenant == tenant), default=None)
    admitted = sorted(s.sent_at for s in sent if s.record.tenant == tenant and s.ok)
    if first is None or not admitted:
        return 0.0
    return max(n - (burst + rate * (t - first)) for n, t in enumerate(admitted, start=1))


# -- per-pod max_in_flight ---------------------------------------------------------------------


def pod(ctx: Ctx) -> Outcome:
    """The pod topology: one tenant's requests spread by the split, a class capped at
    POD_CAP in flight; each pod's model lease set sampled every 10 ms."""
    pods = ctx.fleet.pod_ids
    keys = [f"qos:{{=simgpu@{p}}}:model_leases" for p in pods]
    plan = schedule(
        [Flow("podload", "pod", 120.0)], ctx.split, ctx.phases["pod"], delay_ms=200, seed=ctx.seed
    )
    with zcard_sampler(ctx.store, keys) as sampler:
        t0 = time.monotonic() + 0.05
        sent = run_split(envoy_urls(ctx), plan)
    out = Outcome()
    peaks = [max((v[i] for _, v in sampler.samples), default=0) for i in range(len(pods))]
    above = [sum(1 for _, v in sampler.samples if v[i] > POD_CAP) for i in range(len(pods))]
    out.metrics.update(
        pod_peaks=dict(zip(pods, peaks, strict=True)),
        samples_above_cap=dict(zip(pods, above, strict=True)), samples=len(sampler.samples),
        admitted=sum(1 for s in sent if s.ok), sent=len(sent), statuses=statuses(sent),
    )  # fmt: skip
    out.series["pods"] = [(t - t0, list(v)) for t, v in sampler.samples]
    out.targets.append(
        Target(
            "pod_max_in_flight",
            "peaks " + "/".join(str(p) for p in peaks) + f" with split {_split_text(ctx.split)}",
            f"each pod reaches its own cap {POD_CAP}, none above",
            all(p == POD_CAP for p in peaks),
        )
    )
    check_leaks(ctx, out, "pod")
    return out


def _split_text(split: Sequence[float]) -> str:
    return "/".join(f"{s:g}" for s in split)


# -- fairness across replicas (gateway) --------------------------------------------------------


@dataclass
class _Shares:
    """What a fairness window measured: per tenant, requests sent and admitted in it, and
    the (weighted) max-min fair share of the admitted total, with each one's relative error."""

    inside: list[Sent]
    demands: dict[str, float]
    admitted: dict[str, float]
    entitled: dict[str, float]
    errors: dict[str, float]
    pool_counts: list[int]

    def metrics(self, ctx: Ctx, window: float) -> dict[str, Any]:
        total = sum(self.admitted.values())
        return dict(
            window_s=window, demand=self.demands, admitted=self.admitted, entitled=self.entitled,
            share_error=self.errors, admitted_rps=total / window,
            statuses=statuses(self.inside), pool_peak_in_flight=max(self.pool_counts, default=0),
            pool_samples_above_cap=sum(1 for c in self.pool_counts if c > POOL_CAP),
            reasons=decision_reasons(ctx.fleet.admin_urls, list(self.demands)),  # warmup incl.
        )  # fmt: skip

    def share_target(self, name: str, window: float, goal: str) -> Target:
        worst = max(self.errors, key=lambda t: self.errors[t])
        return Target(
            name,
            f"worst {worst} {self.admitted[worst]:.0f} admitted vs {self.entitled[worst]:.0f}"
            f" entitled ({self.errors[worst] * 100:.1f}% off) over {window:.0f}s",
            goal,
            self.errors[worst] <= 0.10,
        )


def _shares(
    ctx: Ctx, flows: Sequence[Flow], weights: dict[str, float] | None = None
) -> tuple[_Shares, float]:
    """Run `flows` against the pool (capped at POOL_CAP in flight) and measure the window
    after the warm-up; with the window's length."""
    warmup, window = ctx.phases["warmup"], ctx.phases["fair"]
    plan = schedule(flows, ctx.split, warmup + window, delay_ms=100, seed=ctx.seed)
    with zcard_sampler(ctx.store, ["qos:{=simgpu}:model_leases"]) as pool:
        t0 = time.monotonic() + 0.05
        sent = run_split(envoy_urls(ctx), plan)
    start, end = t0 + warmup, t0 + warmup + window
    inside = [s for s in sent if start <= s.sent_at < end]
    tenants = dict.fromkeys(f.tenant for f in flows)
    demands = {t: float(sum(1 for s in inside if s.record.tenant == t)) for t in tenants}
    admitted = {t: float(sum(1 for s in inside if s.ok and s.record.tenant == t)) for t in demands}
    entitled = max_min_shares(demands, sum(admitted.values()), weights)
    errors = {t: abs(admitted[t] - entitled[t]) / entitled[t] for t in demands if entitled[t]}
    pool_counts = [v[0] for _, v in pool.samples]
    return _Shares(inside, demands, admitted, entitled, errors, pool_counts), window


def fairness(ctx: Ctx) -> Outcome:
    """A noisy tenant through every replica (2x the pool's capacity, by the split) against
    one quiet tenant on each replica; the pool is capped at POOL_CAP in flight, so the
    sidecars hold and choose. Shares against the max-min fair entitlement (equal weights)."""
    capacity = POOL_CAP / 0.1  # batches of POOL_CAP every 100 ms
    flows = [Flow("noisy", "interactive", 2.0 * capacity)]
    flows += [Flow(q, "interactive", 0.075 * capacity, replica=i) for i, q in enumerate(QUIET)]
    shares, window = _shares(ctx, flows)
    violations = {
        q: _violation_pct([s for s in shares.inside if s.record.tenant == q]) for q in QUIET
    }
    worst_quiet = max(violations, key=lambda q: violations[q])
    out = Outcome()
    out.metrics.update(shares.metrics(ctx, window), quiet_violation_pct=violations)
    out.targets += [
        shares.share_target(
            "fairness_share",
            window,
            "every tenant within 10% of its max-min fair share, equal weights",
        ),
        Target(
            "fairness_quiet_violations",
            f"worst {worst_quiet} {violations[worst_quiet]:.2f}%",
            f"no quiet tenant's interactive requests over {INTERACTIVE_OBJECTIVE_MS} ms"
            " or refused above 1%",
            violations[worst_quiet] <= 1.0,
        ),
    ]
    check_leaks(ctx, out, "fairness")
    return out


def weights(ctx: Ctx) -> Outcome:
    """Two tenants of policy weights 3 and 1 (WEIGHTED), each at the pool's capacity and each
    through replicas of its own (heavy through the first half, light through the rest): no
    replica holds both, so only the fleet's shared counters can weigh one against the other.
    Shares against the weighted max-min fair entitlement."""
    capacity = POOL_CAP / 0.1
    half = len(ctx.split) // 2
    flows = [
        Flow(tenant, "interactive", capacity / half, replica=replica)
        for tenant, replicas in (("heavy", range(half)), ("light", range(half, len(ctx.split))))
        for replica in replicas
    ]
    shares, window = _shares(ctx, flows, WEIGHTED)
    out = Outcome()
    out.metrics.update(shares.metrics(ctx, window), weights=WEIGHTED)
    out.targets.append(
        shares.share_target(
            "weights_share",
            window,
            "each tenant within 10% of its weighted max-min fair share (weights "
            + ", ".join(f"{t} {w:g}" for t, w in WEIGHTED.items())
            + "), no replica holding both",
        )
    )
    check_leaks(ctx, out, "weights")
    return out


def _violation_pct(sent: Sequence[Sent]) -> float:
    """Requests not answered 200 within the interactive objective, in percent."""
    if not sent:
        return 0.0
    late = sum(
        1 for s in sent if not s.ok or (s.record.latency or 0.0) * 1000 > INTERACTIVE_OBJECTIVE_MS
    )
    return 100.0 * late / len(sent)


# -- the store down -----------------------------------------------------------------------------


def outage(ctx: Ctx, repeats: int = 2) -> Outcome:
    """Valkey stopped (SIGSTOP: every call hangs to the timeout) under load, `repeats` times:
    admitted against the policy rate while it is down (local share), decision latency once
    every circuit is open."""
    assert ctx.valkey is not None
    urls = ctx.fleet.admin_urls
    wait_until(lambda: all(metric_sum(u, "qos_replicas") == len(urls) for u in urls), 15,
               "every replica counts the fleet")  # fmt: skip
    runs = [_one_outage(ctx, i) for i in range(repeats)]
    out = Outcome()
    out.metrics["runs"] = runs
    out.series["outage"] = runs[0].pop("timeline")
    out.series["marks"] = runs[0]["marks"]
    for run in runs[1:]:
        run.pop("timeline")
    ratios = [r["admitted_over_policy"] for r in runs]
    p99s = [r["decision_p99_ms_histogram"] for r in runs]
    out.targets += [
        Target(
            "over_admission_local_share",
            f"{max(ratios):.3f}x the policy rate (runs {', '.join(f'{x:.3f}' for x in ratios)})",
            "at most 1.1x while Redis is down",
            max(ratios) <= 1.1,
        ),
        Target(
            "decision_latency_redis_down",
            f"p99 <= {max(p99s):g} ms (sidecar histogram bucket; p50 <= "
            f"{max(r['decision_p50_ms_histogram'] for r in runs):g} ms;"
            f" {min(r['decisions_within_1ms_pct'] for r in runs):g}% within 1 ms;"
            f" client-side p99 {max(r['probe_p99_ms'] for r in runs):.2f} ms)",
            "under 1 ms once the circuit is open",
            max(p99s) <= 1.0,
        ),
    ]
    check_leaks(ctx, out, "outage")
    return out


def _one_outage(ctx: Ctx, seed_offset: int) -> dict[str, Any]:
    assert ctx.valkey is not None and ctx.valkey.pid is not None
    base, down, after = ctx.phases["base"], ctx.phases["outage"], ctx.phases["after"]
    policy_rate = METERED["metered-a"][0]
    plan = schedule([Flow("metered-a", "standard", 2 * policy_rate)], ctx.split,
                    base + down + after, delay_ms=20, seed=ctx.seed + seed_offset)  # fmt: skip
    urls = ctx.fleet.admin_urls
    prober = Prober([r.sidecar for r in ctx.fleet.replicas], api_key(PROBE_TENANT), 0.01)
    with prober.running():
        t0 = time.monotonic() + 0.05
        thread, sent = run_in_background(envoy_urls(ctx), plan)
        time.sleep(base)
        stopped = time.monotonic()
        os.kill(ctx.valkey.pid, signal.SIGSTOP)
        try:
            opened = wait_until(
                lambda: all(metric_sum(u, "qos_degraded") == 1 for u in urls), down, "open"
            )
            time.sleep(0.2)
            before = decision_histogram(urls)
            time.sleep(max(0.0, stopped + down - time.monotonic()))
            after_h = decision_histogram(urls)
        finally:
            os.kill(ctx.valkey.pid, signal.SIGCONT)
        resumed = time.monotonic()
        closed = wait_until(
            lambda: all(metric_sum(u, "qos_degraded") == 0 for u in urls), 10, "closed"
        )
        thread.join()
    probes = [p.latency_s * 1000 for p in prober.probes if opened + 0.2 <= p.t < stopped + down]
    admitted = admitted_per_tenant(sent, stopped, resumed).get("metered-a", 0)
    after_n = admitted_per_tenant(sent, closed, closed + 3.0).get("metered-a", 0)
    return {
        "outage_s": round(resumed - stopped, 2),
        "circuit_open_after_s": round(opened - stopped, 3),
        "circuit_closed_after_resume_s": round(closed - resumed, 3),
        "admitted_over_policy": round(admitted / (policy_rate * (resumed - stopped)), 4),
        "after_recovery_3s_over_policy": round(after_n / (policy_rate * 3.0), 4),
        "decision_p50_ms_histogram": histogram_quantile(before, after_h, 0.5) * 1000,
        "decision_p99_ms_histogram": histogram_quantile(before, after_h, 0.99) * 1000,
        "decisions_within_1ms_pct": round(100 * histogram_share_within(before, after_h, 0.001), 2),
        "probe_p50_ms": round(_pct(probes, 50), 3),
        "probe_p99_ms": round(_pct(probes, 99), 3),
        "timeline": _admitted_timeline(sent, "metered-a", t0),
        "marks": {"stopped": stopped - t0, "resumed": resumed - t0},
    }


def _admitted_timeline(sent: Sequence[Sent], tenant: str, t0: float) -> list[float]:
    """Admitted `tenant` requests per 1 s bin from t0."""
    times = [s.sent_at - t0 for s in sent if s.ok and s.record.tenant == tenant]
    if not times:
        return []
    counts = np.bincount(np.floor(np.asarray(times)).astype(int).clip(min=0))
    return [float(c) for c in counts]


# -- a cluster primary killed --------------------------------------------------------------------

ScenarioFn = Callable[[Ctx], Outcome]
