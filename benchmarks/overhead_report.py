"""The overhead benchmark's table, ratios and TARGET lines (issue 11, section 3).

Ratios and added latencies compare a sidecar configuration with its no-op twin of the same
kind from the same run: C, D and DL with B, E with E0, G with F, H with H0, always at the same
rate: the common rate, or half of the sidecar's maximum (the twin is run at that rate too).

A ratio target is judged on the paired rounds when the run has them (`paired`: the median of
the per-round ratios of runs made in alternation, see `overhead.paired_rounds`), else on the
maxima measured one configuration after the other. Both are printed, with the rounds' spread.
So is an added-p99 target at the common rate: the median of the rounds' added p99 (each round
runs the sidecar and its twin at that rate seconds apart), else the phases measured one after
the other. At half the maximum there are no rounds: each sidecar's half is its own rate.

Every answer must be 200: the overhead policy admits everything. A configuration whose runs
(its phases and its paired rounds) got more than INVALID_SHARE of other answers or errors
measured a failure, not a cost (a sidecar answering Envoy with a protocol error got 503
`sidecar_unavailable` for every request at 1.5 times its twin's rate), so every target that
reads it, or its twin, says "invalid" and is missed.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from benchmarks import sidecar_gc
from benchmarks.overhead_stack import BY_NAME, CONFIGS

ORDER = [c.name for c in CONFIGS]  # the issue's order, for the table

# (target name, sidecar configuration, its twin, goal as a ratio of maximum rates)
RATIO_TARGETS = (
    ("http_valkey_vs_noop", "D", 0.66),
    ("grpc_valkey_vs_noop", "E", 0.6),
    ("extproc_valkey_vs_noop", "G", 0.6),
)
# Configurations whose added p99 is held to ADDED_P99_GOAL_MS, by mode name.
MODES = {"http_memory": "C", "http_valkey": "D", "grpc_valkey": "E", "extproc_valkey": "G"}
ADDED_P99_GOAL_MS = 1.0
# Script calls: each is one round trip. INFO commandstats also counts every command a script
# runs (TIME, ZADD, ...), so "commands in all" is not the number of round trips.
SCRIPT_COMMANDS = {"evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro"}
BIG_BODY_GOAL_MS = 2.0
LEASED_CALLS_GOAL = 0.2  # store calls per decision in leased mode
INVALID_SHARE = 0.001  # of a configuration's answers: other than 200, or errors


def _answers(phase: dict[str, Any]) -> tuple[dict[str, int], int, int]:
    """Of one load run: the count of each answer other than 200, the errors, and all
    (answers plus errors)."""
    errors = int(phase.get("errors", 0)) + int(phase.get("connect_errors", 0))
    other = {str(c): int(n) for c, n in phase.get("status", {}).items() if str(c) != "200"}
    return other, errors, int(phase.get("completed", 0)) + errors


def failed_answers(phase: dict[str, Any]) -> tuple[int, int]:
    """(answers other than 200 plus errors, answers plus errors) of one load run."""
    other, errors, total = _answers(phase)
    return sum(other.values()) + errors, total


def invalid(configs: dict[str, Any], paired: dict[str, Any], name: str) -> str | None:
    """Why `name`'s measurements are no measurement (module comment), or None."""
    row = configs.get(name)
    if row is None:
        return None
    phases = [*row["max_runs"], row["half"], row["common"], *row["at_sidecar_half"].values()]
    in_rounds, total_in_rounds = (paired.get(name) or {}).get("answers_failed", (0, 0))
    seen: dict[str, int] = {}
    errors, total = 0, total_in_rounds
    for phase in phases:
        other, phase_errors, phase_total = _answers(phase)
        for code, n in other.items():
            seen[code] = seen.get(code, 0) + n
        errors, total = errors + phase_errors, total + phase_total
    failed = sum(seen.values()) + errors + in_rounds
    if failed <= INVALID_SHARE * total:
        return None
    kinds = [f"{n} {code}" for code, n in sorted(seen.items())]
    if errors:
        kinds.append(f"{errors} errors")
    if in_rounds:
        kinds.append(f"{in_rounds} in the paired rounds")
    return f"invalid: {failed} of {total} answers of {name} were not 200 ({', '.join(kinds)})"


def _invalid_pair(configs: dict[str, Any], paired: dict[str, Any], name: str) -> str | None:
    """`invalid` of a sidecar configuration or of its twin."""
    row = configs.get(name)
    twin = row["twin"] if row else None
    return invalid(configs, paired, name) or (invalid(configs, paired, twin) if twin else None)


def _added_p99(configs: dict[str, Any], name: str, phase: str) -> float | None:
    """p99 over the twin's at the same rate: the common rate, or the sidecar's half maximum
    (the twin ran that rate too: ``at_sidecar_half``)."""
    row = configs.get(name)
    twin = configs.get(row["twin"]) if row and row["twin"] else None
    if row is None or twin is None:
        return None
    twin_phase = twin["common"] if phase == "common" else twin["at_sidecar_half"].get(name)
    if twin_phase is None:
        return None
    added = float(row[phase]["latency_ms"]["p99"]) - float(twin_phase["latency_ms"]["p99"])
    return round(added, 3)


def _judged_added_p99(
    configs: dict[str, Any], paired: dict[str, Any], name: str, phase: str
) -> tuple[float | None, str]:
    """The added p99 a target is judged on, and how it reads: at the common rate, the paired
    rounds' median with every round and the sequential value beside it; else sequential."""
    sequential = _added_p99(configs, name, phase)
    rounds = paired.get(name) if phase == "common" else None
    if rounds is None or rounds.get("added_p99_ms_common") is None:
        return sequential, "not measured" if sequential is None else f"{sequential:.3f} ms"
    each = ", ".join(f"{r:.2f}" for r in rounds["added_p99_ms_common_rounds"])
    after = "" if sequential is None else f"; one after the other {sequential:.2f}"
    median = rounds["added_p99_ms_common"]
    return median, f"{median:.3f} ms (median of paired rounds {each}{after})"


def _ratio(configs: dict[str, Any], name: str) -> float | None:
    row = configs.get(name)
    twin = configs.get(row["twin"]) if row and row["twin"] else None
    if row is None or twin is None or not twin["max_rps"]:
        return None
    return round(float(row["max_rps"]) / float(twin["max_rps"]), 3)


def _judged_ratio(
    configs: dict[str, Any], paired: dict[str, Any], name: str
) -> tuple[float | None, str]:
    """The ratio a target is judged on, and how it reads: the paired rounds' median with
    every round, and the sequential ratio beside it. The judged value has the three decimals
    it is compared with, so that one a hair under its goal does not read as the goal."""
    sequential = _ratio(configs, name)
    rounds = paired.get(name)
    if rounds is None or rounds["ratio"] is None:
        return sequential, "not measured" if sequential is None else f"{sequential:.3f}"
    each = ", ".join(f"{r:.2f}" for r in rounds["ratios"])
    after = "" if sequential is None else f"; one after the other {sequential:.2f}"
    return rounds["ratio"], f"{rounds['ratio']:.3f} (median of paired rounds {each}{after})"


def _line(name: str, value: str, goal: str, met: bool) -> str:
    return f"TARGET {name}: {value} ({goal}) {'met' if met else 'missed'}"


def _max_drain(configs: dict[str, Any]) -> tuple[float | None, str]:
    """The longest drain of any sidecar phase (inf when one never drained), and where."""
    worst: tuple[float | None, str] = (None, "")
    for name, row in configs.items():
        for phase in [*row["max_runs"], row["half"], row["common"]]:
            backlog = phase.get("backlog")
            if backlog is None:
                continue
            drain = backlog["drain_s"] if backlog["drained"] else float("inf")
            if worst[0] is None or drain > worst[0]:
                left = backlog["left"].get("leases", backlog["left"]["in_flight"])
                where = name if backlog["drained"] else f"{name}: {left:.0f} leases never freed"
                worst = (drain, where)
    return worst


def target_lines(
    configs: dict[str, Any], scrape_interval_s: float, paired: dict[str, Any] | None = None
) -> list[str]:
    """One line per target, ``TARGET <name>: <value> (<goal>) met|missed``."""
    lines = []
    paired = paired or {}

    def judged(name: str, config: str, value: str, goal: str, met: bool) -> None:
        why = _invalid_pair(configs, paired, config)
        lines.append(
            _line(name, value, goal, met) if why is None else _line(name, why, goal, False)
        )

    for name, config, least in RATIO_TARGETS:
        ratio, value = _judged_ratio(configs, paired, config)
        judged(name, config, value, f">= {least}", ratio is not None and ratio >= least)
    ratio, value = _judged_ratio(configs, paired, "DL")
    judged("http_valkey_leased_vs_noop", "DL", value, ">= 0.85", (ratio or 0) >= 0.85)
    calls = _script_calls(configs["DL"]["max_runs"][-1]) if "DL" in configs else None
    value = "not measured" if calls is None else f"{calls:.3f} per decision"
    met = calls is not None and calls <= LEASED_CALLS_GOAL
    judged("leased_redis_calls", "DL", value, f"<= {LEASED_CALLS_GOAL:g}", met)
    for phase, label in (("common", "at_common_rate"), ("half", "at_half_max")):
        for mode, config in MODES.items():
            added, value = _judged_added_p99(configs, paired, config, phase)
            met = added is not None and added <= ADDED_P99_GOAL_MS
            judged(f"added_p99_{label}_{mode}", config, value, f"<= {ADDED_P99_GOAL_MS:g} ms", met)
    added, value = _judged_added_p99(configs, paired, "H", "common")
    if added is not None:
        value = f"{value} at {configs['H']['common_rate']:g} req/s"
    met = added is not None and added <= BIG_BODY_GOAL_MS
    judged("extproc_1mib_added_p99", "H", value, f"<= {BIG_BODY_GOAL_MS:g} ms", met)
    drain, where = _max_drain(configs)
    value = "not measured" if drain is None else f"{drain:.2f} s to drain ({where})"
    if drain == float("inf"):
        value = f"not drained ({where})"
    met = drain is not None and drain <= scrape_interval_s
    lines.append(_line("release_backlog_drain", value, f"<= {scrape_interval_s:g} s", met))
    return lines


def build(
    meta: dict[str, Any],
    configs: dict[str, Any],
    scrape_interval_s: float,
    paired: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """results.json: the meta, every configuration's phases, ratios and target lines."""
    paired = paired or {}
    for name, row in configs.items():
        row["vs_noop"] = _ratio(configs, name)
        row["paired"] = paired.get(name)
        row["added_p99_ms_common"] = _added_p99(configs, name, "common")
        row["added_p99_ms_half"] = _added_p99(configs, name, "half")
        row["invalid"] = invalid(configs, paired, name)
    return {
        "meta": meta,
        "configs": configs,
        "target_lines": target_lines(configs, scrape_interval_s, paired),
    }


def _lat(phase: dict[str, Any]) -> str:
    lat = phase["latency_ms"]
    rate = phase["rate_target"]
    return f"{lat['p50']:.2f} / {lat['p90']:.2f} / {lat['p99']:.2f} @ {rate:g}"


def _script_calls(phase: dict[str, Any]) -> float | None:
    calls = phase.get("redis_calls_per_request")
    if calls is None:
        return None
    return float(sum(v for k, v in calls.items() if k in SCRIPT_COMMANDS))


def _calls(phase: dict[str, Any]) -> str:
    calls = phase.get("redis_calls_per_request")
    if calls is None:
        return "—"
    scripts = _script_calls(phase)
    return f"{scripts:.2f} EVALSHA ({sum(calls.values()):.1f} commands in all)"


def _cpu(phase: dict[str, Any]) -> str:
    values = (phase[f"{who}cpu_ms_per_request"] for who in ("", "envoy_", "redis_"))
    return " / ".join("—" if v is None else f"{v:.3f}" for v in values)


def _backlog(row: dict[str, Any]) -> str:
    last = row["max_runs"][-1].get("backlog")
    if last is None:
        return "—"
    stop = last["at_stop"]
    count = stop.get("leases", stop.get("in_flight", 0))
    if not last["drained"]:
        left = last["left"].get("leases", last["left"]["in_flight"])
        return f"{count:.0f} / never ({left:.0f} left)"
    return f"{count:.0f} / {last['drain_s']:.2f} s"


def table(configs: dict[str, Any]) -> list[str]:
    lines = [
        "| configuration | max req/s (spread) | vs its no-op | p50 / p90 / p99 ms @ half max"
        " | p50 / p90 / p99 ms @ common rate | added p99 ms (half / common)"
        " | CPU ms per request: server / Envoy / Valkey | Redis calls per request"
        " | leases left at max-rate stop / drain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in sorted(configs.items(), key=lambda item: ORDER.index(item[0])):
        ratio = "—" if row["vs_noop"] is None else f"{row['vs_noop']:.2f}"
        rounds = row.get("paired")
        if rounds is not None and rounds.get("ratio") is not None:
            spread = f"{min(rounds['ratios']):.2f}-{max(rounds['ratios']):.2f}"
            ratio = f"{ratio}; paired {rounds['ratio']:.2f} ({spread})"
        added = "—"
        if row["added_p99_ms_common"] is not None:
            added = f"{row['added_p99_ms_half']:+.2f} / {row['added_p99_ms_common']:+.2f}"
        if rounds is not None and rounds.get("added_p99_ms_common") is not None:
            each = rounds["added_p99_ms_common_rounds"]
            added += f"; paired {rounds['added_p99_ms_common']:+.2f} ({min(each):+.2f}"
            added += f" to {max(each):+.2f})"
        if row.get("invalid"):
            ratio = f"{ratio}; **{row['invalid']}**"
        over = " (over capacity)" if row["over_capacity_at_common"] else ""
        cpu = _cpu(row["max_runs"][-1])
        runs = len(row["max_runs"])
        spread = f"±{row['max_rps_spread_pct']}%" if runs > 1 else "one run"
        lines.append(
            f"| {name}: {row['label']} | {row['max_rps']:,.0f} ({spread})"
            f" | {ratio} | {_lat(row['half'])} | {_lat(row['common'])}{over} | {added}"
            f" | {cpu} | {_calls(row['max_runs'][-1])}"
            f" | {_backlog(row)} |"
        )
    return lines


def gc_lines(configs: dict[str, Any]) -> list[str]:
    """Python's collector in each sidecar, per latency phase (`qos_gc_pause_seconds`): a
    pause is time no decision is made, so it bounds what the added p99 can be."""
    lines = []
    for name, row in sorted(configs.items(), key=lambda item: ORDER.index(item[0])):
        parts = []
        for phase in ("half", "common"):
            gc = (row.get(phase) or {}).get("gc")
            if gc is None:
                continue
            parts.append(f"@ {phase}: {sidecar_gc.describe(gc)}")
        if parts:
            lines.append(f"- {name}: " + "; ".join(parts))
    if not lines:
        return []
    return ["Garbage collector pauses in the sidecar (`qos_gc_pause_seconds`):", "", *lines, ""]


def idle_lines(configs: dict[str, Any], cores: int) -> list[str]:
    """How busy the host was at each configuration's maximum rate: idle CPU there means the
    rate was set by the processes waiting on each other (one request crosses the generator,
    Envoy, the server and Valkey in turn), not by the CPU. The cores each process kept busy
    are from the last run (its CPU per request, releases included, times its rate)."""
    lines = []
    for name, row in sorted(configs.items(), key=lambda item: ORDER.index(item[0])):
        runs = row["max_runs"]
        shares = [r["host_idle_share"] for r in runs if r.get("host_idle_share") is not None]
        if not shares:
            continue
        last = runs[-1]
        busy = [
            f"{label} {last[key] * last['achieved_rps'] / 1000:.2f}"
            for label, key in (
                ("server", "cpu_ms_per_request"),
                ("Envoy", "envoy_cpu_ms_per_request"),
                ("Valkey", "redis_cpu_ms_per_request"),
            )
            if last.get(key)
        ]
        lines.append(
            f"- {name}: {statistics.median(shares) * 100:.0f}% idle"
            f" (runs {', '.join(f'{s * 100:.0f}' for s in shares)}%); cores busy in the last"
            f" run: {', '.join(busy) or 'none measured'}"
        )
    if not lines:
        return []
    head = (
        f"The host's CPU at the maximum rate (of its {cores} cores, while the load ran): a"
        " configuration with idle CPU there waits between its processes, not on the CPU."
    )
    return [head, "", *lines, ""]


def store_lines(configs: dict[str, Any]) -> list[str]:
    """What the shared store spends per decision, as fleet sizing reads it: every replica's
    decisions land on the same Redis, so one core of it serves about 1 / (its CPU per
    decision) decisions a second, whatever the replicas. From each configuration's last
    maximum-rate run; only where a decision calls the store (not leased mode). The script
    calls per request may be well under 1: a tick's acquires of one tenant share a call."""
    lines = []
    for name, row in sorted(configs.items(), key=lambda item: ORDER.index(item[0])):
        phase = row["max_runs"][-1]
        cpu_ms, scripts = phase.get("redis_cpu_ms_per_request"), _script_calls(phase)
        if cpu_ms is None or scripts is None or BY_NAME[name].leased or cpu_ms <= 0:
            continue
        lines.append(
            f"- {name}: {cpu_ms:.3f} ms of Valkey's CPU and {scripts:.2f} script calls per"
            f" request: one Valkey core would serve about {1000 / cpu_ms:,.0f} such decisions"
            " a second, shared by every replica"
        )
    if not lines:
        return []
    head = "The shared store's share (this host's speed, loopback, no TLS):"
    return [head, "", *lines, ""]


def _generator_line(configs: dict[str, Any]) -> list[str]:
    """The generator's speed: A is Envoy alone, so the generator went at least that fast."""
    if "A" not in configs:
        return []
    return [
        f"The load generator (benchmarks/loadgen_c) drove A at {configs['A']['max_rps']:,.0f}"
        " req/s: it is faster than every configuration it measures."
    ]


def markdown(report: dict[str, Any], profile_lines: Sequence[str] | None) -> str:
    meta = report["meta"]
    out = [
        f"# Overhead benchmark, {meta['started']}",
        "",
        f"Command: `{meta['command']}` ({meta['cpu_count']} CPUs, wall {meta['wall_s']} s).",
        f"{meta['duration_s']:g} s per phase, max rate = median of {meta['repeats']} closed-loop"
        f" runs with {meta['connections']} connections; latency open loop from scheduled send"
        ' times. CPU and Redis calls are from the last max-rate run. "paired": the median (and'
        f" range) of {meta.get('paired_rounds', 0)} rounds of max-rate runs made in alternation"
        " with the twin, which the ratio targets are judged on; in the added p99 column, of the"
        f" same rounds' runs at the common rate ({meta.get('paired_latency_s', 0):g} s each),"
        " which the added-p99 targets at that rate are judged on.",
        *_generator_line(report["configs"]),
        "",
        *table(report["configs"]),
        "",
        *gc_lines(report["configs"]),
        *idle_lines(report["configs"], int(meta["cpu_count"])),
        *store_lines(report["configs"]),
        *report["target_lines"],
    ]
    if profile_lines:
        out += ["", "## Profile of the sidecar", "", "```", *profile_lines, "```"]
    return "\n".join(out) + "\n"
