"""The fleet benchmark's failover scenario: a Valkey Cluster primary killed under load.

Decision latency is measured client-side: a probe thread asks each sidecar's ext_authz HTTP
listener in turn (benchmarks/fleet_stack.py `Prober`). The failover window runs from the
SIGKILL to the moment decisions are normal again, judged in 250 ms bins: a bin is normal when
no sidecar reported itself degraded in it (`qos_degraded`, read every 50 ms), no probe in it
was refused, and its probes' median is within the baseline's p99 (measured before the kill, at
least 2 ms); decisions are normal again from the first bin after which every bin is normal.
One slow probe does not make a bin abnormal: the baseline has those too (this machine is
shared and noisy).
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.fleet_load import METERED, PROBE_TENANT, Flow, api_key, run_in_background
from benchmarks.fleet_load import schedule as make_schedule
from benchmarks.fleet_scenarios import Ctx, Outcome, Target, check_leaks, envoy_urls
from benchmarks.fleet_stack import Prober, degraded_sampler

RECOVERY_GOAL_S = 2.0


def failover(ctx: Ctx) -> Outcome:
    """Kill the primary that serves the probe tenant's slot while the fleet takes load."""
    cluster = ctx.cluster
    assert cluster is not None
    base, after = ctx.phases["base"], ctx.phases["failover"]
    rate = METERED["metered-a"][0]
    plan = make_schedule(
        [Flow("metered-a", "standard", 1.5 * rate), Flow("capped", "standard", 30.0)],
        ctx.split,
        base + after,
        delay_ms=20,
        seed=ctx.seed,
    )
    victim = cluster.primary_for(f"qos:{{{PROBE_TENANT}}}:leases")
    heir = cluster.replicas[cluster.primaries.index(victim)]
    prober = Prober([r.sidecar for r in ctx.fleet.replicas], api_key(PROBE_TENANT), 0.005)
    with prober.running(), degraded_sampler(ctx.fleet.admin_urls) as degraded:
        t0 = time.monotonic()
        thread, sent = run_in_background(envoy_urls(ctx), plan)
        time.sleep(base)
        killed = time.monotonic()
        cluster.kill(victim)
        promoted = killed + cluster.wait_promoted(heir, timeout_s=after)
        thread.join()
    out = Outcome()
    _measure(ctx, out, prober, degraded.samples, t0, killed, promoted)
    out.metrics["sent"] = len(sent)
    out.metrics["admitted"] = sum(1 for s in sent if s.ok)
    check_leaks(ctx, out, "failover")
    return out


BIN_S = 0.25


def _last_degraded(
    degraded: list[tuple[float, list[float]]], killed: float, promoted: float
) -> list[float | None]:
    """Per replica, the last time after the kill it reported itself degraded, in seconds
    after the promotion (None: never)."""
    count = len(degraded[0][1]) if degraded else 0
    return [
        max((round(t - promoted, 3) for t, v in degraded if t >= killed and v[i]), default=None)
        for i in range(count)
    ]


def _normal_from(
    prober: Prober, degraded: list[tuple[float, list[float]]], killed: float, bound_ms: float
) -> float:
    """The start of the first bin after the kill from which every bin is normal (module
    rule); the kill itself when none was abnormal."""
    bins: dict[int, list[float]] = {}
    bad: set[int] = set()
    for p in prober.probes:
        if p.t >= killed:
            index = int((p.t - killed) / BIN_S)
            bins.setdefault(index, []).append(p.latency_s * 1000)
            if p.status != 200:
                bad.add(index)
    bad |= {i for i, values in bins.items() if float(np.median(values)) > bound_ms}
    bad |= {int((t - killed) / BIN_S) for t, values in degraded if t >= killed and any(values)}
    return killed + (max(bad) + 1) * BIN_S if bad else killed


def _measure(
    ctx: Ctx,
    out: Outcome,
    prober: Prober,
    degraded: list[tuple[float, list[float]]],
    t0: float,
    killed: float,
    promoted: float,
) -> None:
    probes = prober.probes
    baseline = [p.latency_s * 1000 for p in probes if t0 + 1.0 <= p.t < killed]
    base_p99 = float(np.percentile(baseline, 99))
    bound_ms = max(base_p99, 2.0)
    normal_at = _normal_from(prober, degraded, killed, bound_ms)
    degraded_at = [t for t, values in degraded if t >= killed and any(values)]
    window = [p.latency_s * 1000 for p in probes if killed <= p.t <= normal_at]
    p50 = float(np.percentile(window, 50)) if window else float("nan")
    p99 = float(np.percentile(window, 99)) if window else float("nan")
    recovery = max(0.0, normal_at - promoted)
    goal_ms = ctx.redis_timeout_ms + 5
    out.metrics.update(
        baseline_p50_ms=round(float(np.percentile(baseline, 50)), 3),
        baseline_p99_ms=round(base_p99, 3),
        normal_bound_ms=round(bound_ms, 3),
        promoted_after_kill_s=round(promoted - killed, 3),
        window_s=round(normal_at - killed, 3),
        window_probes=len(window),
        window_p50_ms=round(p50, 3),
        window_p99_ms=round(p99, 3),
        window_max_ms=round(max(window, default=float("nan")), 3),
        refused_probes=sum(1 for p in probes if p.status != 200),
        probe_statuses={
            str(c): sum(1 for p in probes if p.status == c)
            for c in sorted({p.status for p in probes})
        },
        normal_after_promotion_s=round(recovery, 3),
        circuits_closed_after_promotion_s=round(max(degraded_at, default=killed) - promoted, 3),
        last_degraded_after_promotion_s=_last_degraded(degraded, killed, promoted),
    )
    out.series["probes"] = [(p.t - t0, p.latency_s * 1000, p.replica) for p in probes]
    out.series["marks"] = {"killed": killed - t0, "promoted": promoted - t0}
    out.targets += [
        Target(
            "decision_latency_failover",
            f"p50 {p50:.2f} ms p99 {p99:.2f} ms over {len(window)} decisions in"
            f" {normal_at - killed:.2f}s (client-side probes)",
            f"p99 <= redis timeout {ctx.redis_timeout_ms} + 5 = {goal_ms} ms",
            p99 <= goal_ms,
        ),
        Target(
            "failover_back_to_normal",
            f"{recovery:.2f}s after the promotion ({normal_at - killed:.2f}s after the kill,"
            f" promoted after {promoted - killed:.2f}s)",
            f"normal within {RECOVERY_GOAL_S:g}s",
            recovery <= RECOVERY_GOAL_S,
        ),
    ]
