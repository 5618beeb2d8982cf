"""The QoS benchmark: ``python -m benchmarks.qos [--quick|--full] [--policy DIR] [--trace FILE]``.

Procedure (see benchmarks/README.md and ../shared/QOS-BENCHMARK.md):

1. Build a model repository with the simulated model at the chosen speed (plus one slower
   copy per class for the siloed baseline); start Triton and Valkey once.
2. Measure the capacity C with the passthrough system: raise the Poisson load step by step
   until the worst class has more than 1% SLO violations, and interpolate.
3. Write the benchmark policy (tenant quotas as shares of C) unless ``--policy`` is given.
4. For each system and each load multiple m of C: run the workload (warm-up excluded),
   collect every request's record, then wait until Triton's queue is empty.
5. The step workload (1x -> 3x -> 1x) on some systems, for recovery.
6. The noisy point on every system: the quiet tenants at 1x, the noisy tenant at
   ``--noisy-burst`` times its rate, for the noisy_tenant target.
7. Write results.json, records.csv.gz, report.md and the plots into
   ``results/<date>-<mode>/``, and print the table.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import gzip
import itertools
import json
import math
import signal
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import demand_probe, device_log, qos_targets, report, sidecar_gc, usage_check
from benchmarks.loadgen import Record, RunResult
from benchmarks.models import MODELS, ModelKind, default_model, make_model_repo, stream_classes
from benchmarks.policy import (
    DEFAULT,
    INTERACTIVE_QUOTAS,
    MAX_IN_FLIGHT,
    TENANT_WEIGHTS,
    tenant_quotas,
    write_policy,
)
from benchmarks.runner import (
    SYSTEMS,
    SYSTEMS_BY_NAME,
    Backend,
    SystemSpec,
    run_point,
    sidecar_decisions,
    start_system,
    system_named,
    wait_idle,
)
from benchmarks.triton_stalls import attach_batch_log, read_batches
from benchmarks.workload import (
    CLASS_NAMES,
    PAPER_DEADLINES_S,
    Arrival,
    WorkloadConfig,
    default_tenants,
    generate,
    load_trace,
    noisy_burst,
    sample_sizes,
)
from devstack.procs import ValkeyProcess
from devstack.stack import ROOT
from devstack.triton import TritonProcess

SEED_STRIDE = 1000  # seed k of a point: --seed + the point's index + k * SEED_STRIDE


@dataclass(frozen=True)
class Mode:
    name: str
    loads: tuple[float, ...]
    duration_s: float
    warmup_s: float
    patience: float  # a request is abandoned after deadline * patience
    probe_s: float  # each capacity-search probe
    step_phases: tuple[tuple[float, float], ...]  # (seconds, multiple of C)
    step_systems: tuple[str, ...] | None  # None: all
    seeds: int = 1  # each point repeated with this many seeds (--seeds), pooled: their mean
    noisy_burst: float = 3.0  # the noisy point: the noisy tenant at this many times its rate


MODES: dict[str, Mode] = {
    "quick": Mode(
        "quick",
        (0.5, 1.0, 2.0, 3.0),
        duration_s=10.0,
        warmup_s=1.5,
        patience=1.0,
        probe_s=8.0,
        step_phases=((4.0, 1.0), (6.0, 3.0), (10.0, 1.0)),
        step_systems=("passthrough", "sidecar-http"),
        seeds=2,
    ),
    "full": Mode(
        "full",
        (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0),
        duration_s=30.0,
        warmup_s=5.0,
        patience=2.0,
        probe_s=15.0,
        step_phases=((15.0, 1.0), (60.0, 3.0), (30.0, 1.0)),
        step_systems=None,
        seeds=3,
    ),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def slo_scale_for(model: ModelKind, config: WorkloadConfig, speed: float, ratio: float) -> float:
    """Scale so that the interactive deadline is ``ratio`` times the cost-model service time of
    a lone median request; two significant digits."""
    prompt, output = sample_sizes(config, 2000, seed=11)
    lone_ms = model.batch_ms([int(np.median(prompt))], [int(np.median(output))], speed)
    raw = ratio * lone_ms / 1000.0 / PAPER_DEADLINES_S["interactive"]
    digits = 1 - math.floor(math.log10(raw))
    return round(raw, digits)


def measure_lone_ms(url: str, model: ModelKind, config: WorkloadConfig, n: int = 15) -> float:
    import urllib.request

    prompt, output = sample_sizes(config, 2000, seed=11)
    body = model.body(int(np.median(prompt)), int(np.median(output)), None)
    times = []
    for _ in range(n):
        req = urllib.request.Request(
            f"{url}/v2/models/{model.name}/{model.endpoint}",
            data=body,
            headers={"content-type": "application/json"},
        )
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=10) as response:
            response.read()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1000.0


def _measured(records: Sequence[Record], warmup_s: float) -> list[Record]:
    return [r for r in records if r.scheduled >= warmup_s]


def run_load(
    url: str,
    spec: SystemSpec,
    backend: Backend,
    config: WorkloadConfig,
    rate: float,
    duration_s: float,
    arrival: Arrival,
    seed: int,
    patience: float,
) -> tuple[RunResult, float]:
    schedule = generate(config, rate, duration_s, arrival, seed)
    result = run_point(url, spec, backend, schedule, config.classes, patience)
    drained = wait_idle(backend.triton)
    return result, drained


def _step(
    url: str,
    spec: SystemSpec,
    backend: Backend,
    config: WorkloadConfig,
    capacity: float,
    mode: Mode,
    seeds: int,
    seed: int,
    model_name: str,
) -> tuple[dict[str, Any], list[Record]]:
    """The step workload (1x -> 3x -> 1x), once per seed as a point is: recovery from every
    seed's records pooled (`report.recovery_s`), each seed's own as its spread; the sidecar's
    autoscaling signal and caps sampled through the first."""
    phases = mode.step_phases
    run_s = sum(p[0] for p in phases)
    step_start, step_end = phases[0][0], phases[0][0] + phases[1][0]
    runs: list[list[Record]] = []
    drained_s: list[float] = []
    seen: dict[str, Any] = {}
    for k in range(seeds):
        with (
            demand_probe.sampling(backend.sidecar_admin_url, model_name)
            if k == 0  # the first seed's run only
            else contextlib.nullcontext()
        ) as sampler:
            res, drained = run_load(
                url,
                spec,
                backend,
                config,
                capacity,
                run_s,
                Arrival("step", phases=phases),
                seed + 500 + SEED_STRIDE * k,
                mode.patience,
            )
        runs.append(res.records)
        drained_s.append(drained)
        if sampler is not None:  # the autoscaling signal (demand_probe.py)
            signal_seen = demand_probe.step_signal(sampler.samples, res.start_monotonic, phases)
            seen = {
                "demand_signal": signal_seen,
                "demand_signal_text": demand_probe.describe(signal_seen, phases),
                "caps": [  # (s since the run started, caps and counts)
                    (round(t - res.start_monotonic, 2), caps) for t, caps in sampler.caps
                ],
            }
            log(f"{spec.name:>20} step: {seen['demand_signal_text']}")
    pooled = [r for records in runs for r in records]
    rec = report.recovery_s(pooled, config.classes, step_start, step_end, run_s)
    per_seed = [
        report.recovery_s(records, config.classes, step_start, step_end, run_s)["recovery_s"]
        for records in runs
    ]
    rec |= {
        "phases": phases,
        "after_s": phases[2][0],
        "drain_s": round(max(drained_s), 2),
        "seeds": per_seed,
    } | seen
    last = rec.get("last_over")
    log(
        f"{spec.name:>20} step: recovery {rec['recovery_s']} s over {seeds} seed(s), each"
        f" {per_seed} (thresholds {rec['threshold_pct']} %), drain {max(drained_s):.1f}s"
        + (f"; {report.describe_last_over(last)}" if last else "")
    )
    return rec, pooled


def _noisy_point(
    url: str,
    spec: SystemSpec,
    backend: Backend,
    config: WorkloadConfig,
    capacity: float,
    mode: Mode,
    arrival: Arrival,
    seeds: int,
    seed: int,
) -> tuple[dict[str, Any], list[Record]]:
    """The noisy point: every quiet tenant at its 1x rate, the noisy tenant at
    `mode.noisy_burst` times its own, once per seed. The quiet tenants are within their quotas
    and the noisy one is far over its own, so what the quiet tenants miss here is what the
    noisy tenant's excess costs them (the noisy_tenant target). Returns the stats of the
    measured records and every record (for records.csv.gz and the GPU-seconds check)."""
    tenants, load = noisy_burst(config.tenants, mode.noisy_burst)
    noisy = replace(config, tenants=tenants)
    recs: list[Record] = []
    rows: list[Record] = []
    for k in range(seeds):
        res, _ = run_load(
            url,
            spec,
            backend,
            noisy,
            load * capacity,
            mode.warmup_s + mode.duration_s,
            arrival,
            seed + 700 + SEED_STRIDE * k,
            mode.patience,
        )
        recs += _measured(res.records, mode.warmup_s)
        rows += res.records
    stats = report.point_stats(
        recs, config.classes, tenants, backend.quotas, mode.duration_s * seeds, capacity
    )
    stats |= {"m": round(load, 3), "burst": mode.noisy_burst}
    return stats, rows


def find_capacity(
    url: str,
    backend: Backend,
    config: WorkloadConfig,
    estimate_rps: float,
    mode: Mode,
    arrival: Arrival,
    seed: int,
) -> tuple[float, list[dict[str, Any]]]:
    """Goodput of passthrough in requests/s (`search_capacity`), each probe a Poisson load of
    `mode.probe_s` seconds after the warm-up."""
    spec = SYSTEMS_BY_NAME["passthrough"]
    probes: list[dict[str, Any]] = []

    def probe(rate: float, i: int) -> float:
        res, _ = run_load(
            url,
            spec,
            backend,
            config,
            rate,
            mode.warmup_s + mode.probe_s,
            arrival,
            seed + i,
            mode.patience,
        )
        stats = report.point_stats(
            _measured(res.records, mode.warmup_s),
            config.classes,
            config.tenants,
            {},
            mode.probe_s,
            rate,
        )
        worst = float(stats["overall"]["worst_class_violation_pct"])
        probes.append({"rate_rps": round(rate, 3), "worst_class_violation_pct": worst})
        log(f"  capacity probe {rate:7.2f} req/s: worst class {worst:.2f}% violations")
        return worst

    return search_capacity(probe, 0.3 * estimate_rps), probes


def search_capacity(probe: Callable[[float, int], float], start_rps: float) -> float:
    """The highest rate whose worst class stays within the SLO target, from probes
    (`probe(rate, i)`: the worst class's violation %, `i` a fresh seed offset each call):
    down by halves from `start_rps` until a rate passes, then up by 1.25x until one fails;
    interpolated between the last pass and the first failure.

    A failure must reproduce: a rate over the target is probed again with another seed, and
    its value is the lower of the two. At 10 req/s a probe holds about 100 requests, so one
    late request in a host's hiccup is over 1%, and a single such probe ended the search at
    C = 7.9 and 10.2 req/s on a host where 24 req/s had no violation at all."""
    calls = itertools.count()
    target = report.SLO_TARGET_PCT

    def judged(rate: float) -> float:
        first = probe(rate, next(calls))
        return first if first <= target else min(first, probe(rate, next(calls)))

    points: list[tuple[float, float]] = []
    rate, steps = start_rps, 0
    while (value := judged(rate)) > target and steps < 4:
        points.append((rate, value))
        rate /= 2.0
        steps += 1
    points.append((rate, value))
    while steps < 14 and value <= target:  # `rate` passed: the highest yet
        steps += 1
        rate *= 1.25
        value = judged(rate)
        points.append((rate, value))
    passed = [(r, v) for r, v in points if v <= target]
    if not passed:
        return min(points)[0]
    low = max(passed)
    above = [(r, v) for r, v in points if r > low[0] and v > target]
    if not above:
        return low[0]
    (r0, v0), (r1, v1) = low, min(above)
    return r0 + (target - v0) / (v1 - v0) * (r1 - r0)


def write_records(path: Path, rows: list[tuple[str, str, Record]]) -> None:
    with gzip.open(path, "wt", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(
            [
                "system",
                "run",
                "tenant",
                "class",
                "scheduled_s",
                "sent_s",
                "status",
                "ttfb_s",
                "latency_s",
                "retry_after_s",
                "reason",
                "error",
                "prompt_tokens",
                "output_tokens",
                "tpot_s",
                "trace",
                "request_id",
            ]
        )
        for system, run, r in rows:
            w.writerow(
                [
                    system,
                    run,
                    r.tenant,
                    r.klass,
                    f"{r.scheduled:.4f}",
                    f"{r.sent:.4f}",
                    r.status,
                    "" if r.ttfb is None else f"{r.ttfb:.4f}",
                    "" if r.latency is None else f"{r.latency:.4f}",
                    "" if r.retry_after is None else r.retry_after,
                    r.reason,
                    r.error,
                    r.prompt_tokens,
                    r.output_tokens,
                    "" if r.tpot is None else f"{r.tpot:.5f}",
                    r.trace,
                    r.request_id,
                ]
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.qos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = parser.add_mutually_exclusive_group()
    g.add_argument(
        "--quick", action="store_true", help="about 23 minutes on 2 cores, 8 systems (default)"
    )
    g.add_argument("--full", action="store_true", help="the whole sweep; much longer")
    parser.add_argument("--policy", type=Path, help="sidecar policy dir (default: generated)")
    parser.add_argument("--trace", type=Path, help="Azure-format trace for sizes (and arrivals)")
    parser.add_argument("--out", type=Path, default=ROOT / "results", help="results root")
    parser.add_argument("--model", choices=sorted(MODELS), default=default_model())
    parser.add_argument("--arrival", choices=("poisson", "gamma", "trace"), default="poisson")
    parser.add_argument("--cv", type=float, default=2.0, help="gap CV for --arrival gamma")
    parser.add_argument(
        "--no-client-wait",
        action="store_true",
        help="clients do not state their timeout (x-qos-timeout-ms), so the sidecar holds "
        "requests as their class says however long the client waits",
    )
    parser.add_argument(
        "--explain-refusals",
        action="store_true",
        help="run every sidecar with QOS_EXPLAIN_REFUSALS: records.csv.gz keeps each refusal's "
        "decision steps (column trace)",
    )
    parser.add_argument(
        "--device-log",
        action="store_true",
        help="the llm model logs its batches (device.log): each point then says where its "
        "classes' latency went, waiting or in their batch, and how long the device sat idle "
        "while a request waited (benchmarks/device_log.py)",
    )
    parser.add_argument(
        "--target-throughput",
        type=float,
        default=100.0,
        help="sets the model speed: saturated throughput in req/s",
    )
    parser.add_argument(
        "--deadline-ratio",
        type=float,
        default=8.0,
        help="interactive deadline / lone median service time",
    )
    parser.add_argument("--slo-scale", type=float, help="override the deadline scale factor")
    parser.add_argument("--noisy-share", type=float, default=0.4)
    parser.add_argument(
        "--noisy-burst",
        type=float,
        help="the noisy point: the noisy tenant at this many times its rate while the others "
        "send their 1x rates (default 3; 0: no noisy point)",
    )
    parser.add_argument(
        "--quota-oversubscription",
        type=float,
        default=1.5,
        help="tenant quotas sum to this many times C (generated policy only)",
    )
    parser.add_argument("--mix", default="1,1,1", help="interactive,standard,batch weights")
    parser.add_argument(
        "--stream",
        default="interactive",
        help="classes whose requests are streamed (generate_stream: time to first token and"
        " time per output token reported), on a model that streams (llm_ifb); 'none' for none",
    )
    parser.add_argument(
        "--overload-scale",
        type=float,
        default=1.0,
        help="multiply the generated policy's Triton queue thresholds (admit_below, shed_above)",
    )
    parser.add_argument(
        "--max-in-flight",
        type=float,
        default=MAX_IN_FLIGHT,
        help="the static policy (sidecar-http-static): admit standard and batch at once only "
        "below this many batches of requests in flight per model (0: no cap)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        help="repeat each point with this many seeds (quick: 2, full: 3); the point is their "
        "pooled records (the mean), each seed's headline numbers give the spread",
    )
    parser.add_argument(
        "--protect",
        choices=("none", "latency", "balanced", "throughput"),
        default="none",
        help="the static policy (sidecar-http-static) with adaptive caps on standard and batch "
        "(overload.protect), --max-in-flight their floor",
    )
    parser.add_argument(
        "--infeasible",
        choices=("admit", "relegate", "refuse"),
        default="refuse",
        help="the sidecar policy's tokens.infeasible for the LLM models (ext_proc rows read "
        "token counts; ext_authz rows never see a body): what becomes of a request whose "
        "max tokens its class's deadline cannot hold even alone, at the pace the sidecar saw "
        "(default refuse: judged by responses as long, from prompts no longer, so only "
        "requests that would miss anyway are refused, and they stop holding batches)",
    )
    parser.add_argument(
        "--interactive-quota",
        choices=INTERACTIVE_QUOTAS,
        default="none",
        help="what bounds a tenant's interactive requests in the sidecar rows: none (its "
        "bucket covers its other classes only), refuse (a bucket of its own at the tenant's "
        "rate, 429 beyond it), excess (the same bucket, served as batch beyond it)",
    )
    parser.add_argument(
        "--tenant-weights",
        choices=TENANT_WEIGHTS,
        default="equal",
        help="each tenant's policy weight, its share of the turns among held requests: "
        "equal (none written, every tenant 1) or entitlement (its bucket's rate)",
    )
    parser.add_argument(
        "--preset-floor",
        type=float,
        default=0.0,
        help="the adaptive caps' floor in the sidecar rows (balanced; sidecar-http-latency and "
        "-throughput), in batches of requests in flight per model (default 0: none, a cap of 1)",
    )
    parser.add_argument(
        "--instances",
        type=int,
        default=1,
        help="simulated devices (Triton instances) of the shared model; the siloed baseline "
        "splits the same devices among the classes (3: one full-speed device per class, as "
        "QoServe compares)",
    )
    parser.add_argument(
        "--triton-timeout",
        choices=("objective", "none"),
        default="objective",
        help="each class's triton_timeout_ms in the generated policy: its deadline (ext_proc "
        "writes it into the body; Triton then drops a request still queued past it), or none",
    )
    parser.add_argument(
        "--systems",
        help="comma-separated subset of: "
        + ",".join(s.name for s in SYSTEMS)
        + "; and sidecar-http-share-X (0 < X <= 1): sidecar-http with overload.protect_share X, "
        "a point of the knob's curve on the frontier",
    )
    parser.add_argument("--loads", help="comma-separated multiples of C")
    parser.add_argument("--duration", type=float, help="seconds per load point")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per point (excluded)")
    parser.add_argument("--capacity", type=float, help="use this C (req/s), skip the search")
    parser.add_argument("--step-systems", help="systems for the step run ('' for none)")
    parser.add_argument("--step", help="step phases 's1,s2,s3' seconds at 1x,3x,1x")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    mode = MODES["full" if args.full else "quick"]
    if args.loads:
        mode = replace(mode, loads=tuple(float(x) for x in args.loads.split(",")))
    if args.duration:
        mode = replace(mode, duration_s=args.duration, probe_s=args.duration)
    if args.warmup is not None:
        mode = replace(mode, warmup_s=args.warmup)
    if args.seeds:
        mode = replace(mode, seeds=args.seeds)
    seeds = mode.seeds
    if args.step_systems is not None:
        mode = replace(mode, step_systems=tuple(s for s in args.step_systems.split(",") if s))
    if args.noisy_burst is not None:
        mode = replace(mode, noisy_burst=args.noisy_burst)
    if args.step:
        secs = [float(x) for x in args.step.split(",")]
        mode = replace(mode, step_phases=((secs[0], 1.0), (secs[1], 3.0), (secs[2], 1.0)))
    if args.systems:
        systems = [system_named(n) for n in args.systems.split(",")]
    else:
        systems = [s for s in SYSTEMS if s.quick or args.full]
    step_systems = [s for s in systems if mode.step_systems is None or s.name in mode.step_systems]

    started = time.monotonic()
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    out = args.out.resolve() / f"{stamp}-{mode.name}"  # the sidecar and Triton run elsewhere
    out.mkdir(parents=True, exist_ok=True)

    model = MODELS[args.model]
    if args.device_log and model.name != "llm":
        parser.error("--device-log: only the llm model logs its batches")
    streamed = stream_classes(args.stream, model)
    if not set(streamed) <= set(CLASS_NAMES):
        parser.error(f"--stream {args.stream}: classes are {', '.join(CLASS_NAMES)}")
    trace = load_trace(args.trace) if args.trace else None
    weights = [float(x) for x in args.mix.split(",")]
    config = WorkloadConfig(
        tenants=default_tenants(noisy_share=args.noisy_share),
        class_mix=dict(zip(CLASS_NAMES, weights, strict=True)),
        trace=trace,
    )
    arrival = Arrival(args.arrival, cv=args.cv)
    prompt, output = sample_sizes(config, 4000, seed=5)
    speed1 = model.saturated_throughput(prompt, output, 1.0)
    speed = args.target_throughput / speed1
    scale = args.slo_scale or slo_scale_for(model, config, speed, args.deadline_ratio)
    config = replace(config, slo_scale=scale)
    deadlines = {n: c.deadline_s for n, c in config.classes.items()}
    log(
        f"model {model.name} at speed {speed:.3f}, {args.instances} instance(s) (saturated"
        f" throughput about {args.target_throughput:.0f} req/s each); SLO scale factor"
        f" {scale:g}: deadlines " + ", ".join(f"{n} {d:g}s" for n, d in deadlines.items())
    )
    log(f"results in {out}")

    results: dict[str, Any] = {"systems": {}}
    all_rows: list[tuple[str, str, Record]] = []
    cdf_2x: dict[str, dict[str, list[float]]] = {}

    with tempfile.TemporaryDirectory(prefix="qos-bench-") as tmp_name:
        tmp = Path(tmp_name)
        repo = make_model_repo(
            model, tmp / "models", speed, silo_classes=CLASS_NAMES, instances=args.instances
        )
        device = out / "device.log" if args.device_log else None
        if device is not None:
            attach_batch_log(repo, model.name, device)
        need_valkey = any(s.sidecar_mode for s in systems)
        with (
            TritonProcess(repo, tmp / "work") as triton,
            ValkeyProcess(tmp / "work") if need_valkey else _null() as valkey,
        ):
            backend = Backend(
                tmp / "work",
                triton,
                valkey,
                model,
                tenants=config.tenants,
                stream_classes=streamed,
                sidecar_env={"QOS_EXPLAIN_REFUSALS": "true"} if args.explain_refusals else {},
                client_wait=not args.no_client_wait,
            )
            log(f"Triton ready ({triton.http_url}); Valkey: {valkey.url if valkey else 'none'}")

            # -- capacity ------------------------------------------------------------------
            with start_system(SYSTEMS_BY_NAME["passthrough"], backend) as url:
                lone_ms = measure_lone_ms(url, model, config)
                log(f"lone median request through passthrough: {lone_ms:.1f} ms measured")
                probes: list[dict[str, Any]] = []
                if args.capacity:
                    capacity = args.capacity
                else:
                    estimate = model.saturated_throughput(prompt, output, speed)
                    capacity, probes = find_capacity(
                        url, backend, config, estimate, mode, arrival, args.seed + 1000
                    )
            log(f"capacity C = {capacity:.2f} req/s (passthrough goodput)")

            if args.policy:
                policy_dir = backend.policy_dir = args.policy
            else:
                variants = {s.policy_variant for s in systems if s.sidecar_mode} | {DEFAULT}
                for variant in sorted(variants):
                    backend.policy_dirs[variant] = write_policy(
                        out / "policy" / variant,
                        config.tenants,
                        config.classes,
                        capacity,
                        oversubscription=args.quota_oversubscription,
                        variant=variant,
                        batch_size=model.max_batch,
                        overload_scale=args.overload_scale,
                        max_in_flight=args.max_in_flight,
                        protect=args.protect,
                        triton_timeout=args.triton_timeout == "objective",
                        preset_floor=args.preset_floor,
                        model=model.name if model.llm_like else None,
                        infeasible=args.infeasible,
                        interactive_quota=args.interactive_quota,
                        tenant_weights=args.tenant_weights,
                    )
                policy_dir = backend.policy_dirs[DEFAULT]
            quotas = tenant_quotas(policy_dir, config.tenants)
            backend.quotas = quotas

            # -- sweep ---------------------------------------------------------------------
            for spec in systems:
                sys_res: dict[str, Any] = {"description": spec.description, "points": []}
                results["systems"][spec.name] = sys_res
                with start_system(spec, backend) as url:
                    gpu = (  # issue 13 §5: attributed GPU-seconds against Triton's counter
                        usage_check.GpuSecondsCheck(
                            backend.triton.metrics_url, backend.sidecar_admin_url
                        ).start()
                        if backend.sidecar_admin_url is not None
                        else None
                    )
                    for i, m in enumerate(mode.loads):
                        rate = m * capacity
                        before = sidecar_decisions(backend)
                        admin = backend.sidecar_admin_url
                        gc0 = sidecar_gc.totals(admin) if admin is not None else None
                        recs, per_seed, lags, drained, wall_s = [], [], [], 0.0, 0.0
                        seeds_run: list[tuple[RunResult, list[Record]]] = []
                        for k in range(seeds):  # each seed: the same seed for every system
                            res, drained = run_load(
                                url,
                                spec,
                                backend,
                                config,
                                rate,
                                mode.warmup_s + mode.duration_s,
                                arrival,
                                args.seed + i + SEED_STRIDE * k,
                                mode.patience,
                            )
                            seed_recs = _measured(res.records, mode.warmup_s)
                            per_seed.append(
                                report.headline(
                                    report.point_stats(
                                        seed_recs,
                                        config.classes,
                                        config.tenants,
                                        quotas,
                                        mode.duration_s,
                                        capacity,
                                        ends_s=mode.warmup_s + mode.duration_s,
                                    )
                                )
                            )
                            recs += seed_recs
                            lags.append(res)
                            seeds_run.append((res, seed_recs))
                            wall_s += res.wall_s
                            all_rows += [(spec.name, f"{m:g}x", r) for r in res.records]
                        after = sidecar_decisions(backend)
                        # The sidecar's own collector in the point: no decision while it runs.
                        gc = (
                            sidecar_gc.during(gc0, sidecar_gc.totals(admin))
                            if gc0 is not None and admin is not None
                            else None
                        )
                        decisions = (
                            {k: v - before.get(k, 0.0) for k, v in after.items()}
                            if before is not None and after is not None
                            else None
                        )
                        # Every seed's records pooled over seeds x duration: the mean.
                        stats = report.point_stats(
                            recs,
                            config.classes,
                            config.tenants,
                            quotas,
                            mode.duration_s * seeds,
                            capacity,
                            decisions=decisions,
                            decisions_window_s=wall_s,
                            lone_s=lambda r: model.lone_s(r.prompt_tokens, r.output_tokens, speed),
                            ends_s=mode.warmup_s + mode.duration_s,
                        )
                        res = max(lags, key=lambda r: r.lag_p99_ms)
                        stats |= {
                            "m": m,
                            "rate_rps": round(rate, 3),
                            "seeds": per_seed,
                            "loadgen": {
                                "lag_p50_ms": round(res.lag_p50_ms, 2),
                                "lag_p99_ms": round(res.lag_p99_ms, 2),
                                "lag_max_ms": round(res.lag_max_ms, 2),
                            },
                            "drain_s": round(drained, 2),
                        }
                        if gc is not None:
                            stats["sidecar_gc"] = gc
                        if device is not None and not spec.gen.siloed:  # its own models
                            stats["device"] = device_log.point(
                                read_batches(device), seeds_run, deadlines
                            )
                        sys_res["points"].append(stats)
                        if abs(m - 2.0) < 1e-9:
                            per: dict[str, list[float]] = defaultdict(list)
                            for r in recs:
                                if report.is_admitted(r) and r.latency is not None:
                                    per[r.klass].append(r.latency)
                            cdf_2x[spec.name] = per
                        o = stats["overall"]
                        iv = stats["classes"]["interactive"]["violation_pct"]
                        log(
                            f"{spec.name:>20} {m:4g}x: sent {o['sent']:5d} worst-class viol"
                            f" {o['worst_class_violation_pct']:6.2f}% interactive {iv:6.2f}%"
                            f" SLO-met/C {o['slo_met_over_c']:.2f} shed {o['shed_429']}/"
                            f"{o['shed_503']} lag p99 {res.lag_p99_ms:.1f} ms"
                            f" drain {drained:.1f}s"
                        )
                        if gc is not None:
                            log(f"{'':>20}       sidecar's collector: {sidecar_gc.describe(gc)}")
                        if "device" in stats:
                            log(f"{'':>20}       {device_log.describe(stats['device'])}")
                    g_m, note = report.goodput(
                        [
                            (p["m"], p["overall"]["worst_class_scheduler_violation_pct"])
                            for p in sys_res["points"]
                        ]
                    )
                    sys_res["goodput_over_c"] = round(g_m, 3)
                    sys_res["goodput_note"] = note

                    # -- step ------------------------------------------------------------------
                    if spec in step_systems:
                        rec, step_rows = _step(
                            url, spec, backend, config, capacity, mode, seeds, args.seed, model.name
                        )
                        sys_res["step"] = rec
                        all_rows += [(spec.name, "step", r) for r in step_rows]
                    # -- noisy -----------------------------------------------------------------
                    if mode.noisy_burst > 0:
                        noisy, noisy_rows = _noisy_point(
                            url, spec, backend, config, capacity, mode, arrival, seeds, args.seed
                        )
                        sys_res["noisy"] = noisy
                        all_rows += [(spec.name, "noisy", r) for r in noisy_rows]
                        said = report.describe_noisy(noisy, config.tenants[0].name)
                        log(f"{spec.name:>20} noisy: {said}")
                    if gpu is not None:
                        served: dict[str, float] = defaultdict(float)  # service time per tenant
                        for name, _, r in all_rows:
                            if name == spec.name and report.is_admitted(r):
                                lone = model.lone_s(r.prompt_tokens, r.output_tokens, speed)
                                served[r.tenant] += lone
                        sys_res["gpu_seconds"] = gpu.finish(served)
                        log(usage_check.line(spec.name, sys_res["gpu_seconds"]))

    wall = time.monotonic() - started
    results["meta"] = {
        "mode": mode.name,
        "started": stamp,
        "wall_s": round(wall, 1),
        "model": model.name,
        "streamed_classes": list(streamed),
        "model_speed": round(speed, 4),
        "model_instances": args.instances,
        "target_saturated_throughput_rps": args.target_throughput,
        "lone_request_ms_measured": round(lone_ms, 2),
        "slo_scale": scale,
        "classes": list(CLASS_NAMES),
        "deadlines_s": deadlines,
        "class_mix": dict(config.class_mix),
        "capacity_rps": round(capacity, 3),
        "capacity_probes": probes,
        "loads": list(mode.loads),
        "duration_s": mode.duration_s,
        "seeds": seeds,
        "warmup_s": mode.warmup_s,
        "patience": mode.patience,
        "client_wait": not args.no_client_wait,
        "arrival": {"kind": arrival.kind, "cv": arrival.cv},
        "trace": str(args.trace) if args.trace else None,
        "policy": str(policy_dir),
        "noisy_tenant": config.tenants[0].name,
        "noisy_burst": mode.noisy_burst,
        "tenants": [
            {
                "name": t.name,
                "share": round(t.share, 4),
                "quota_weight": round(t.quota_weight, 4),
                "classes": list(t.classes),
                "quota_rps": quotas[t.name].rate_per_s,
            }
            for t in config.tenants
        ],
        "seed": args.seed,
    }
    results = {"meta": results["meta"], "systems": results["systems"]}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_records(out / "records.csv.gz", all_rows)
    table = report.markdown_table(results)
    if streamed_md := report.streamed_table(results):
        table += "\n\nStreamed (time to first token, time per output token):\n\n" + streamed_md
    report.plot(results, cdf_2x, out)
    qos_targets.plot_frontier(results, out)
    targets = qos_targets.target_lines(results)
    frontier = qos_targets.frontier_md(results)
    knob = qos_targets.curve_md(results)
    if knob:
        frontier += "\n\nThe knob's curve: sidecar-http by overload.protect_share\n\n" + knob
    (out / "report.md").write_text(_report_md(results, table, frontier, targets))
    print()
    print(table)
    print()
    print(frontier)
    print(f"\nC = {capacity:.2f} req/s; wall time {wall:.0f}s; results in {out}")
    qos_targets.print_targets(targets)  # last: a run is checked by its tail
    return 0


def _report_md(
    results: Mapping[str, Any], table: str, frontier: str, targets: Sequence[str]
) -> str:
    meta = results["meta"]
    return (
        f"# QoS benchmark, {meta['mode']} mode ({meta['started']})\n\n"
        f"Model `{meta['model']}` (simulated) at speed {meta['model_speed']}"
        f" x {meta.get('model_instances', 1)} instance(s), "
        f"C = {meta['capacity_rps']} req/s (passthrough goodput), SLO scale factor "
        f"{meta['slo_scale']} (deadlines "
        + ", ".join(f"{k} {v:g}s" for k, v in meta["deadlines_s"].items())
        + f"), loads {meta['loads']} x C, {meta['duration_s']:g}s per point, "
        f"wall time {meta['wall_s']:.0f}s.\n\n"
        + table
        + "\n\n## Frontier (interactive violation %, SLO-met / C)\n\n"
        + frontier
        + "\n\n![frontier](frontier.png)\n\n```\n"
        + "\n".join(targets)
        + "\n```\n\n![violations](violations_vs_load.png)\n\n![latency](latency_cdf_2x.png)\n"
        + demand_probe.report_md(results)
    )


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    # `kill` (SIGTERM) must stop Triton, Envoy, Valkey and the sidecar too: exiting through
    # SystemExit runs the context managers that own them, where the default handler would not.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
