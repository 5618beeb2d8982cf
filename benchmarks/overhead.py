"""What one decision costs: the sidecar against no-op servers of the same kind, in one run.

``python -m benchmarks.overhead`` (quick, under 10 minutes on 2 cores), ``--full``,
``--configs B,D``, ``--duration S``, ``--profile`` (cProfile of the sidecar in configuration D,
top 25 cumulative entries in the results). The configurations (A..H) are in
``benchmarks/overhead_stack.py``; the load comes from the compiled generator in
``benchmarks/cloadgen.py`` (a Python generator would be slower than what it measures).

Per configuration, in this order, each phase measured on its own:
1. warm-up (closed loop, not counted);
2. maximum rate: ``--repeats`` closed-loop runs of ``--duration`` s with ``--connections``
   connections; the median is the configuration's maximum, the spread is reported. A
   configuration no ratio reads (A, Envoy alone, or one run without its twin or sidecars)
   gets one run: its maximum is context, and the quick run stays within its 10 minutes;
3. latency at half that maximum and at the common rate (``--common-rate``, 1,000 req/s), open
   loop, timed from each request's scheduled send time (coordinated omission corrected). A
   configuration whose maximum is below the common rate runs it anyway and is marked over
   capacity; the 1 MiB pair (H0, H) uses half of H0's maximum when that is lower, and says so.
Around every phase: the server's CPU (``/proc/<pid>/stat`` utime+stime) and Valkey's
``INFO commandstats``, divided by the requests completed, taken once the phase's releases are
done (they are part of its cost). After every phase of a sidecar: the
release backlog (``qos_release_backlog``, ``qos_in_flight_requests`` on its admin
``/metrics``, the tenant's lease set ``ZCARD`` in Valkey) at the moment the load stops, and how
long until all are 0. The next phase starts only once they are.

Then the paired rounds (``--paired N``, default ``--repeats``; 0 skips them): each twin and its
sidecars are started together and measured at their maximum rate in alternation, N rounds, so
that each round's ratio compares runs made seconds apart; then, in the same round and order,
each at the common rate for ``--paired-latency`` s, so that each round's added p99 compares
runs made seconds apart too (the 1 MiB pair at its own rate, the one its phases ran at). The
ratio targets, and the added-p99 targets at the common rate and the 1 MiB pair's, are judged
on the median of the rounds (``overhead_report``); this host's speed has been seen
to change by 4x between configurations measured minutes apart, and the added p99 of one
configuration to change sides of its goal between two runs an hour apart.

Results: ``results/<stamp>-overhead/`` with ``results.json`` and ``report.md``; the table and
one ``TARGET`` line per target of issue 11 are printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import redis

from benchmarks import cloadgen, overhead_report, sidecar_gc
from benchmarks import overhead_stack as stack
from benchmarks.fleet_stack import metrics_text
from devstack.procs import ValkeyProcess

LEASES_KEY = f"qos:{{{stack.TENANT}}}:leases"  # sidecar.state.keys.build_key(tenant, LEASES)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of ``pid`` and of its live descendants (the workers of `serve
    --workers N`) in seconds; 0 without a process."""
    if pid is None:
        return 0.0
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        with contextlib.suppress(OSError):  # one that just exited counts nothing
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
    return total / CLOCK_TICKS


def host_cpu_ticks() -> tuple[int, int]:
    """The host's CPU time in clock ticks since boot, all cores: (all of it, idle + iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]


def redis_cpu_seconds(client: redis.Redis | None) -> float:
    """Valkey's own CPU (``INFO cpu``: user + system, main thread and all) in seconds."""
    if client is None:
        return 0.0
    info: dict[str, Any] = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def command_calls(client: redis.Redis | None) -> dict[str, int]:
    """Calls per command name from ``INFO commandstats`` (our own INFO left out)."""
    if client is None:
        return {}
    stats: dict[str, Any] = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name != "cmdstat_info"
    }


def admin_gauges(admin_url: str) -> dict[str, float]:
    """``qos_release_backlog`` and the sum of ``qos_in_flight_requests`` from /metrics."""
    gauges = {"release_backlog": 0.0, "in_flight": 0.0}
    for line in metrics_text(admin_url).splitlines():
        if line.startswith("qos_release_backlog "):
            gauges["release_backlog"] = float(line.split()[-1])
        elif line.startswith("qos_in_flight_requests{"):
            gauges["in_flight"] += float(line.split()[-1])
    return gauges


def backlog(running: stack.Running, client: redis.Redis | None) -> dict[str, float]:
    assert running.sidecar is not None
    values = admin_gauges(running.sidecar.admin_url)
    if client is not None:
        values["leases"] = float(client.zcard(LEASES_KEY))
    return values


def access_log_drops(running: stack.Running) -> float | None:
    """Envoy's access-log entries dropped so far (`access_logs.grpc_access_log.logs_dropped`):
    a dropped entry is a completion the sidecar never hears of, its lease left to renewal's
    cap and the TTL. None when Envoy's admin cannot be read."""
    if running.envoy is None:
        return None
    try:
        with urllib.request.urlopen(
            running.envoy.admin_url + "/stats?filter=grpc_access_log.logs_dropped", timeout=2
        ) as response:
            text = response.read().decode()
    except OSError:
        return None
    return sum(float(line.rsplit(":", 1)[1]) for line in text.splitlines() if ":" in line)


def wait_drained(
    running: stack.Running,
    client: redis.Redis | None,
    args: argparse.Namespace,
    baseline: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The backlog when the load stopped, and the seconds until each signal is back to
    ``baseline`` (its value before the phase: 0 unless an earlier phase left leases that were
    never released). Gives up after ``--drain-timeout`` s, or once nothing has moved for
    ``--drain-stall`` s (those leases are stuck until their TTL). The in-flight gauge is
    refreshed once a second, so it lags the lease set by up to that."""
    base = baseline or {}
    start = last_move = time.monotonic()
    at_stop = backlog(running, client)
    now = dict(at_stop)
    done_at = {k: 0.0 for k, v in at_stop.items() if v <= base.get(k, 0.0)}
    while len(done_at) < len(at_stop):
        elapsed = time.monotonic() - start
        if elapsed > args.drain_timeout or time.monotonic() - last_move > args.drain_stall:
            break
        time.sleep(0.05)
        values = backlog(running, client)
        if any(values[k] < now[k] for k in values):
            last_move = time.monotonic()
        now = values
        for name, value in values.items():
            if value <= base.get(name, 0.0) and name not in done_at:
                done_at[name] = round(time.monotonic() - start, 3)
    # The authoritative count: the lease set with Valkey; the gauge with the memory store.
    primary = "leases" if "leases" in at_stop else "in_flight"
    drained = primary in done_at and "release_backlog" in done_at
    waited = round(time.monotonic() - start, 3)
    return {
        "before": base,
        "at_stop": at_stop,
        "left": now,
        "back_to_before_after_s": done_at,
        "drain_s": max(done_at.get(primary, waited), done_at.get("release_backlog", waited)),
        "drained": drained,
    }


def run_phase(
    running: stack.Running,
    target: cloadgen.Target,
    client: redis.Redis | None,
    args: argparse.Namespace,
    rate: float,
) -> dict[str, Any]:
    """One load run with the CPU (the server's, Envoy's, Valkey's) and Redis commands it cost;
    then the backlog, for a sidecar."""
    pid = running.server.pid if running.server is not None else None
    envoy_pid = running.envoy.pid if running.envoy is not None else None
    before = backlog(running, client) if running.sidecar is not None else None
    gc0 = sidecar_gc.totals(running.sidecar.admin_url) if running.sidecar is not None else None
    drops0 = access_log_drops(running) if running.sidecar is not None else None
    cpu0, calls0 = cpu_seconds(pid), command_calls(client)
    envoy0, redis0 = cpu_seconds(envoy_pid), redis_cpu_seconds(client)
    host0 = host_cpu_ticks()
    result = cloadgen.run(target, duration_s=args.duration, rate=rate, connections=args.connections)
    host1 = host_cpu_ticks()
    # Idle CPU while the load ran: at the maximum rate, a share left idle means the
    # processes waited on each other, not on the CPU (benchmarks/README.md, issue 11).
    result["host_idle_share"] = round((host1[1] - host0[1]) / max(host1[0] - host0[0], 1), 3)
    if running.sidecar is not None:
        # Releases the load left behind are part of its cost: count CPU and Redis commands
        # once they are done (the drain's own /metrics and ZCARD polls add a few percent).
        result["backlog"] = wait_drained(running, client, args, before)
        drops1 = access_log_drops(running)
        if gc0 is not None:
            result["gc"] = sidecar_gc.during(gc0, sidecar_gc.totals(running.sidecar.admin_url))
        if drops0 is not None and drops1 is not None:
            result["backlog"]["access_log_entries_dropped"] = drops1 - drops0
    cpu1, calls1 = cpu_seconds(pid), command_calls(client)
    envoy1, redis1 = cpu_seconds(envoy_pid), redis_cpu_seconds(client)
    done = max(int(result["completed"]), 1)
    result["cpu_ms_per_request"] = round((cpu1 - cpu0) * 1000 / done, 4) if pid else None
    # Where the 2-core budget goes: Envoy's and Valkey's share beside the server's.
    result["envoy_cpu_ms_per_request"] = (
        round((envoy1 - envoy0) * 1000 / done, 4) if envoy_pid else None
    )
    result["redis_cpu_ms_per_request"] = (
        round((redis1 - redis0) * 1000 / done, 4) if client is not None else None
    )
    per_command = {
        name: round((calls - calls0.get(name, 0)) / done, 3)
        for name, calls in calls1.items()
        if calls != calls0.get(name, 0)
    }
    result["redis_calls_per_request"] = per_command if client is not None else None
    return result


def target_of(config: stack.Config, running: stack.Running) -> cloadgen.Target:
    return cloadgen.Target(
        running.port,
        f"/v2/models/{stack.MODEL}/infer",
        stack.request_headers(),
        stack.request_body(config.body_bytes),
    )


def warm_up(
    running: stack.Running,
    target: cloadgen.Target,
    client: redis.Redis | None,
    args: argparse.Namespace,
) -> None:
    cloadgen.run(target, duration_s=args.warmup, connections=args.connections)
    if running.sidecar is not None:
        wait_drained(running, client, args)


def paired_rounds(
    names: list[str],
    workdir: Path,
    redis_url: str,
    client: redis.Redis,
    args: argparse.Namespace,
    common_rates: dict[str, float],
) -> dict[str, Any]:
    """Each sidecar's maximum rate against its no-op twin's, measured in alternation: the twin
    and its sidecars are all started, and each round runs every one of them once, closed loop
    (the order rotates from round to round), then once each at the common rate, open loop.
    A host that speeds up or slows down during the run moves both sides of a round's ratio
    (and of its added p99) alike; the configurations measured one after the other above can
    be minutes apart. ``common_rates``: each configuration's rate at the common rate (the
    1 MiB pair's is its own, lower)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        config = stack.BY_NAME[name]
        if config.twin in names:
            groups.setdefault(config.twin, []).append(name)
    found: dict[str, Any] = {}
    for twin, sidecars in groups.items():
        members = [twin, *sidecars]
        log(f"paired rounds: {', '.join(members)}")
        with contextlib.ExitStack() as started:
            running, targets = {}, {}
            for name in members:
                config = stack.BY_NAME[name]
                where = workdir / "paired" / name
                running[name] = started.enter_context(stack.start(config, where, redis_url))
                targets[name] = target_of(config, running[name])
            stores = {n: client if stack.BY_NAME[n].store == "valkey" else None for n in members}
            for name in members:
                warm_up(running[name], targets[name], stores[name], args)
            rates: dict[str, list[float]] = {name: [] for name in members}
            p99s: dict[str, list[float]] = {name: [] for name in members}
            answers = {name: [0, 0] for name in members}  # failed, in all (report.invalid)
            # The common-rate runs are `--paired-latency` s long: args with that duration.
            latency = argparse.Namespace(**{**vars(args), "duration": args.paired_latency})
            # No target reads the 1 MiB pair's ratio: its rounds run at its rate only, which
            # keeps the quick run within its 10 minutes.
            ratio_read = not stack.BY_NAME[twin].body_bytes
            for round_ in range(args.paired):
                turn = round_ % len(members)
                order = members[turn:] + members[:turn]
                if ratio_read:
                    for name in order:
                        phase = run_phase(running[name], targets[name], stores[name], args, 0.0)
                        rates[name].append(float(phase["achieved_rps"]))
                        _count_answers(answers[name], phase)
                if args.paired_latency <= 0:
                    continue
                for name in order:
                    rate = common_rates[name]
                    phase = run_phase(running[name], targets[name], stores[name], latency, rate)
                    p99s[name].append(float(phase["latency_ms"]["p99"]))
                    _count_answers(answers[name], phase)
        for name in members:
            found.setdefault(name, {})["answers_failed"] = answers[name]
        for name in sidecars:
            result = _paired_result(twin, rates[name], rates[twin], p99s[name], p99s[twin])
            found[name].update(result, common_rate=common_rates[name])
            ratios = ", ".join(f"{r:.2f}" for r in found[name]["ratios"])
            added = ", ".join(f"{a:+.2f}" for a in found[name]["added_p99_ms_common_rounds"])
            log(f"{name}/{twin} paired: ratios {ratios or '-'}; added p99 ms {added or '-'}")
    return found


def _count_answers(tally: list[int], phase: dict[str, Any]) -> None:
    failed, total = overhead_report.failed_answers(phase)
    tally[0] += failed
    tally[1] += total


def _paired_result(
    twin: str, rps: list[float], twin_rps: list[float], p99: list[float], twin_p99: list[float]
) -> dict[str, Any]:
    """A sidecar's paired rounds against its twin: the ratio of maximum rates per round, and
    the p99 added at the common rate per round, each with its median."""
    ratios = [s / t for s, t in zip(rps, twin_rps, strict=True) if t > 0]
    added = [s - t for s, t in zip(p99, twin_p99, strict=True)]
    return {
        "twin": twin,
        "ratio": round(statistics.median(ratios), 3) if ratios else None,
        "ratios": [round(r, 3) for r in ratios],
        "rps": rps,
        "twin_rps": twin_rps,
        "added_p99_ms_common": round(statistics.median(added), 3) if added else None,
        "added_p99_ms_common_rounds": [round(a, 3) for a in added],
        "p99_ms_common": p99,
        "twin_p99_ms_common": twin_p99,
    }


def max_rate_runs(name: str, names: list[str], repeats: int) -> int:
    """How many maximum-rate runs configuration `name` gets among `names`: `repeats` where
    a ratio reads its maximum (a sidecar with its twin, or a twin with a sidecar), else one."""
    config = stack.BY_NAME[name]
    compared = config.twin in names or any(stack.BY_NAME[n].twin == name for n in names)
    return repeats if compared else 1


def measure(
    config: stack.Config,
    running: stack.Running,
    client: redis.Redis | None,
    args: argparse.Namespace,
    common_rate: float | None,
    sidecar_halves: dict[str, float],
    repeats: int,
) -> dict[str, Any]:
    """Every phase of one configuration. ``common_rate`` None: ``--common-rate``, lowered to
    half the maximum for a large body (1,000 req/s of 1 MiB is beyond these servers here).
    ``sidecar_halves``: for a no-op twin, the half-maximum rate of each sidecar compared with
    it, measured here too (``at_sidecar_half``), so added latency compares equal loads.
    ``repeats``: its maximum-rate runs (``max_rate_runs``)."""
    target = target_of(config, running)
    warm_up(running, target, client, args)
    runs = [run_phase(running, target, client, args, 0.0) for _ in range(repeats)]
    rates = [r["achieved_rps"] for r in runs]
    max_rps = statistics.median(rates)
    log(f"{config.name}: max {max_rps:.0f} req/s (runs {', '.join(f'{r:.0f}' for r in rates)})")
    half_rate = max(1.0, round(max_rps / 2))
    if common_rate is None:
        common_rate = min(args.common_rate, half_rate) if config.body_bytes else args.common_rate
    # A rate already run is not run again (the 1 MiB pair's rates coincide): the same phase.
    half = run_phase(running, target, client, args, half_rate)
    ran = {float(half_rate): half}
    if float(common_rate) not in ran:
        ran[float(common_rate)] = run_phase(running, target, client, args, common_rate)
    common = ran[float(common_rate)]
    at_sidecar_half = {}
    for name, rate in sidecar_halves.items():
        if float(rate) not in ran:
            ran[float(rate)] = run_phase(running, target, client, args, rate)
        at_sidecar_half[name] = ran[float(rate)]
    return {
        "label": config.label,
        "twin": config.twin or None,
        "body_bytes": len(target.body),
        "max_rps": max_rps,
        "max_rps_runs": rates,
        "max_rps_spread_pct": round((max(rates) - min(rates)) * 100 / max_rps, 1)
        if max_rps
        else None,
        "max_runs": runs,
        "half": half,
        "common": common,
        "common_rate": common_rate,
        "at_sidecar_half": at_sidecar_half,
        # Within 25% of its maximum, a server's queueing dominates its latency.
        "over_capacity_at_common": max_rps < common_rate * 1.25,
    }


def profile(workdir: Path, redis_url: str, args: argparse.Namespace, out: Path) -> list[str]:
    """Configuration ``--profile-config`` (D) again, its sidecar under cProfile, closed loop
    for ``--duration`` s; writes the top 25 cumulative entries to ``out/profile_<config>.txt``
    and returns them."""
    import io
    import pstats

    name = args.profile_config
    raw = out.resolve() / f"profile_{name}.prof"  # the sidecar runs in its own directory
    config = stack.BY_NAME[name]
    with stack.start(config, workdir / "profile", redis_url, profile_path=raw) as running:
        target = target_of(config, running)  # the request the measured phases send
        result = cloadgen.run(target, duration_s=args.duration, connections=args.connections)
    cumulative, own = io.StringIO(), io.StringIO()
    pstats.Stats(str(raw), stream=cumulative).sort_stats("cumulative").print_stats(25)
    pstats.Stats(str(raw), stream=own).sort_stats("tottime").print_stats(25)
    header = (
        f"cProfile of the sidecar, configuration {name}, closed loop,"
        f" {result['completed']} requests in {args.duration:g} s (profiled: slower than"
        " unprofiled)\n"
    )
    (out / f"profile_{name}.txt").write_text(
        header + "\n## by cumulative time\n" + cumulative.getvalue()
        + "\n## by own time\n" + own.getvalue()
    )  # fmt: skip
    return cumulative.getvalue().splitlines()


def run_all(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in stack.BY_NAME]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; known: {list(stack.BY_NAME)}")
    names.sort(key=stack.RUN_ORDER.index)
    cloadgen.build()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="qos-overhead-") as tmp:
        workdir = Path(tmp)
        with ValkeyProcess(workdir / "valkey") as valkey:
            client = redis.Redis.from_url(valkey.url)
            for name in names:
                config = stack.BY_NAME[name]
                log(f"{name}: {config.label}")
                with stack.start(config, workdir / name, valkey.url) as running:
                    store = client if config.store == "valkey" else None
                    sidecars = [s for s in results if stack.BY_NAME[s].twin == name]
                    halves = {s: float(results[s]["half"]["rate_target"]) for s in sidecars}
                    # The 1 MiB pair shares one rate: the sidecar's (half its maximum at most).
                    rate = (
                        results[sidecars[0]]["common_rate"]
                        if config.body_bytes and sidecars
                        else None
                    )
                    repeats = max_rate_runs(name, names, args.repeats)
                    results[name] = measure(config, running, store, args, rate, halves, repeats)
            if args.paired > 0:
                rates = {name: float(results[name]["common_rate"]) for name in names}
                results["_paired"] = paired_rounds(names, workdir, valkey.url, client, args, rates)
            if args.profile:
                log(f"profiling the sidecar in configuration {args.profile_config}")
                try:
                    results["_profile_D"] = profile(workdir, valkey.url, args, out)
                except Exception as exc:  # a failed profile must not lose the measurements
                    log(f"profile failed: {exc!r}")
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__)
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--quick", action="store_true", help="the default: 5 s phases, 3 repeats")
    speed.add_argument("--full", action="store_true", help="15 s phases, 5 repeats")
    parser.add_argument(
        "--configs",
        default=stack.DEFAULT_CONFIGS,
        help="default: all but EL, GL (gRPC and ext_proc in leased mode), DW (D with two"
        " workers), DC and DLC (D and DL with a class that counts its model, as every preset"
        " does): no target reads them",
    )
    parser.add_argument("--duration", type=float, help="seconds per phase (5 quick, 15 full)")
    parser.add_argument("--repeats", type=int, help="max-rate runs (3 quick, 5 full)")
    parser.add_argument(
        "--paired",
        type=int,
        help="rounds of alternated max-rate runs, sidecar and twin (default: --repeats; 0: none)",
    )
    parser.add_argument(
        "--paired-latency",
        type=float,
        help="seconds of each paired round's run at the common rate, sidecar and twin, which "
        "the added-p99 targets at that rate are judged on (3 quick, 10 full; 0: none)",
    )
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--common-rate", type=float, default=1000.0)
    parser.add_argument("--drain-timeout", type=float, default=60.0)
    parser.add_argument(
        "--drain-stall", type=float, default=10.0, help="stop waiting when nothing moved for this"
    )
    parser.add_argument(
        "--scrape-interval",
        type=float,
        default=15.0,
        help="the release backlog target: drained within this many seconds (default 15)",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile one sidecar config")
    parser.add_argument("--profile-config", default="D", help="which config --profile runs")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    config = stack.BY_NAME.get(args.profile_config)
    if config is None or not config.is_sidecar:
        parser.error(f"--profile-config: one of the sidecar configs, not {args.profile_config!r}")
    args.duration = args.duration or (15.0 if args.full else 5.0)
    args.repeats = args.repeats or (5 if args.full else 3)
    args.paired = args.repeats if args.paired is None else args.paired
    if args.paired_latency is None:
        args.paired_latency = 10.0 if args.full else 3.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    out = args.out / f"{stamp}-overhead"
    out.mkdir(parents=True, exist_ok=True)
    results = run_all(args, out)
    profile_lines = results.pop("_profile_D", None)
    paired = results.pop("_paired", {})
    meta = {
        "started": stamp,
        "command": " ".join(["python -m benchmarks.overhead", *(argv or sys.argv[1:])]),
        "duration_s": args.duration,
        "repeats": args.repeats,
        "paired_rounds": args.paired,
        "paired_latency_s": args.paired_latency,
        "connections": args.connections,
        "common_rate": args.common_rate,
        "scrape_interval_s": args.scrape_interval,
        "cpu_count": os.cpu_count(),
        "wall_s": round(time.monotonic() - started, 1),
    }
    report = overhead_report.build(meta, results, args.scrape_interval, paired)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    text = overhead_report.markdown(report, profile_lines)
    (out / "report.md").write_text(text)
    # The TARGET lines are printed once, last, where a reader (and the smoke test) looks.
    print("\n".join(line for line in text.splitlines() if not line.startswith("TARGET ")))
    print(f"results: {out}")
    for line in report["target_lines"]:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
