"""Issue 12's targets, judged on one QoS benchmark run: one ``TARGET`` line each, and the
frontier (every system's (interactive violation %, SLO-met throughput / C) point per load).

Every sidecar system of the run is judged (the shipped HTTP and ext_proc modes, and the
adaptive presets when they were run). A point is the pooled records of its seeds: the mean;
each seed's value gives the spread, printed beside it. The baselines are the systems without
a sidecar in the same run; "best baseline" is the one with the most SLO-met throughput at
that load.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks import usage_check
from benchmarks.policy import SHARE_ROW, share_of
from benchmarks.report import describe_last_over, noisy_worst, sweep_worst
from sidecar.core.protect import TARGET
from sidecar.policy.model import Protect

LOADS = (2.0, 3.0)
INTERACTIVE_MAX_PCT = {2.0: 1.0, 3.0: 5.0}
SLO_MET_SHARE_OF_BEST = 0.9
OTHER_TENANT_MAX_PCT = 1.0
RECOVERY_MAX_S = 3.0


def _at(system: Mapping[str, Any], m: float) -> Mapping[str, Any] | None:
    return next((p for p in system["points"] if abs(p["m"] - m) < 1e-9), None)


def _seed_values(point: Mapping[str, Any], key: str) -> list[float]:
    """Each seed's `key`, when the point has two seeds or more (one is no spread)."""
    seeds = point.get("seeds") or []
    return [s[key] for s in seeds if s[key] is not None] if len(seeds) >= 2 else []


def _spread(point: Mapping[str, Any], key: str, spec: str) -> str:
    values = _seed_values(point, key)
    return f", seeds {min(values):{spec}}-{max(values):{spec}}" if values else ""


def _straddles(point: Mapping[str, Any], key: str, goal: float) -> str:
    """Issue 12 §2: a target is judged on the mean, and a claim made only when the spread
    allows it. Seeds on both sides of the goal allow none: said beside the value."""
    values = _seed_values(point, key)
    if values and min(values) <= goal < max(values):
        return "; seeds on both sides of the goal: no claim either way"
    return ""


def _line(name: str, value: str, goal: str, met: bool) -> str:
    return f"TARGET {name}: {value} ({goal}) {'met' if met else 'missed'}"


def is_sidecar(name: str) -> bool:
    return name.startswith("sidecar")


def frontier(results: Mapping[str, Any]) -> dict[str, list[tuple[float, float, float]]]:
    """Per system, (m, interactive violation %, SLO-met / C) at every load of the run."""
    return {
        name: [
            (
                p["m"],
                p["classes"]["interactive"]["violation_pct"],
                p["overall"]["slo_met_over_c"] or 0.0,
            )
            for p in sorted(s["points"], key=lambda p: p["m"])
        ]
        for name, s in results["systems"].items()
    }


def _points_at(
    systems: Mapping[str, Mapping[str, Any]], m: float
) -> dict[str, tuple[float, float]]:
    """Each system's (interactive violation %, SLO-met / C) at load `m`, where it ran it."""
    found = {name: _at(system, m) for name, system in systems.items()}
    return {
        name: (p["classes"]["interactive"]["violation_pct"], p["overall"]["slo_met_over_c"])
        for name, p in found.items()
        if p is not None
    }


def dominated_by(
    point: tuple[float, float], others: Mapping[str, tuple[float, float]]
) -> list[str]:
    """The systems whose (violation %, SLO-met / C) is at least as good on both and better on
    one than `point`."""
    viol, met = point
    return [
        name for name, (v, s) in others.items() if v <= viol and s >= met and (v < viol or s > met)
    ]


def wilson_interval_pct(misses: int, sent: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% with the default z) of a miss share, in percent: where
    the share of a tenant's requests that miss may lie, given `misses` of `sent`."""
    if sent <= 0:
        return (0.0, 100.0)
    share = misses / sent
    centre = share + z * z / (2 * sent)
    half = z * math.sqrt(share * (1 - share) / sent + z * z / (4 * sent * sent))
    scale = 1 + z * z / sent
    return (100 * max(0.0, (centre - half) / scale), 100 * min(1.0, (centre + half) / scale))


def _count_claim(numbers: Mapping[str, Any], goal_pct: float, goal: str = "") -> str:
    """Issue 12 §2 for a share of a few dozen requests, where seeds give no spread (the
    tenant's requests are pooled): a count whose 95% interval holds the goal allows no claim
    either way, and the line says so beside the value it is judged on. `goal`: the goal's
    name in the line, where it is not the target's own."""
    low, high = wilson_interval_pct(int(numbers["violations"]), int(numbers["sent"]))
    if low <= goal_pct <= high:
        holds = f", which holds {goal} {goal_pct:g}%" if goal else ""
        return f"; 95% interval {low:.2f}-{high:.2f}%{holds}: the count allows no claim either way"
    return ""


def _how_ended(numbers: Mapping[str, Any]) -> str:
    """How a tenant's violations ended, where the results say: a quiet tenant's requests
    refused for load may be the policy's own trade (a preset that sheds a lower class near
    capacity) rather than the noisy tenant's doing, and the line lets a reader tell."""
    if not numbers.get("violations") or "shed_503" not in numbers:
        return ""
    s503, s429 = int(numbers["shed_503"]), int(numbers["shed_429"])
    late = int(numbers["violations"]) - s503 - s429
    return f": {s503} refused for load (503), {s429} over quota (429), {late} late or failed"


def _noisy_line(name: str, system: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """The worst other tenant, with its counts where the results have them: a tenant of a few
    dozen requests is over 1% with one miss, which its share alone does not show."""
    worst = noisy_worst(system, meta)
    if worst is None:
        return _line(f"noisy_tenant[{name}]", "not measured", "<= 1%", False)
    numbers = worst.numbers
    pct = numbers["violation_pct"]
    counts = (
        f" ({numbers['violations']} of {numbers['sent']}{_how_ended(numbers)})"
        if "sent" in numbers
        else ""
    )
    where = (
        f"in the noisy point (the noisy tenant at {worst.burst:g}x its rate, the others at"
        " their 1x rates)"
        if worst.burst is not None
        else f"at {worst.m:g}x"
    )
    claim = _count_claim(numbers, OTHER_TENANT_MAX_PCT) if "sent" in numbers else ""
    claim += _noisy_over_quota(worst.point, meta)
    claim += _quiet_pooled(worst.point, meta)
    if worst.burst is not None and (sweep := sweep_worst(system, meta)) is not None:
        # Beside it, where the noisy tenant sends its usual 40%: over its entitlement, within
        # its (oversubscribed) bucket.
        s = sweep.numbers
        claim += (
            f"; at {sweep.m:g}x, every tenant at its usual share, worst {sweep.tenant}"
            f" {s['violation_pct']:.2f}%"
            + (f" ({s['violations']} of {s['sent']})" if "sent" in s else "")
        )
    return _line(
        f"noisy_tenant[{name}]",
        f"worst other tenant {worst.tenant} {pct:.2f}%{counts} {where}{claim}",
        f"<= {OTHER_TENANT_MAX_PCT:g}%",
        pct <= OTHER_TENANT_MAX_PCT,
    )


def quiet_pooled(point: Mapping[str, Any], noisy_tenant: str) -> tuple[int, int] | None:
    """Every quiet tenant's misses together, and what they sent (None: a point without the
    per-tenant counts): the smallest send a few dozen requests a quick point, so one of them
    alone is a coarse reading."""
    quiet = [v for k, v in point["tenants"].items() if k != noisy_tenant]
    if not quiet or not all("sent" in v for v in quiet):
        return None
    return sum(v["violations"] for v in quiet), sum(v["sent"] for v in quiet)


def _quiet_pooled(point: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    pooled = quiet_pooled(point, meta["noisy_tenant"])
    if pooled is None:
        return ""
    missed, sent = pooled
    return f"; every quiet tenant together {missed} of {sent} ({100 * missed / max(sent, 1):.2f}%)"


def _noisy_over_quota(point: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """Whether the noisy tenant was over its quota where the line judges, as the sidecar
    told it (its 429s there): with none, it was a large tenant within its quota at that
    point, and what the quiet tenants missed is not its excess's doing."""
    noisy = point["tenants"].get(meta["noisy_tenant"], {})
    if "shed_429" not in noisy or "sent" not in noisy:
        return ""
    over, sent = int(noisy["shed_429"]), int(noisy["sent"])
    if over == 0:
        return f"; the noisy tenant got no 429 there (0 of {sent}): within its quota, untested"
    return f"; the noisy tenant got {over} of {sent} answered 429 there"


# The rows that run each shipped preset on the ext_authz HTTP transport.
PRESET_ROWS = {
    "sidecar-http": "balanced",
    "sidecar-http-latency": "latency",
    "sidecar-http-throughput": "throughput",
}


def _preset_lines(
    systems: Mapping[str, Mapping[str, Any]], baselines: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """Issue 12 §4's clause for a model where no one preset holds both targets: the presets
    form the frontier, and it holds when the interactive target is met by one of them, the
    SLO-met target by one of them, and no baseline point dominates any of them. Judged per
    load, when two presets or more were run, on the same means as the per-system lines."""
    run = {row: preset for row, preset in PRESET_ROWS.items() if row in systems}
    if len(run) < 2:
        return []
    lines = []
    for m in LOADS:
        base_points = _points_at(baselines, m)
        mine = _points_at({row: systems[row] for row in run}, m)
        name = f"presets_frontier_{m:g}x"
        goal = "a preset meets each target, no baseline dominates a preset"
        if len(mine) < len(run) or not base_points:
            lines.append(_line(name, "not measured", goal, False))
            continue
        best = max(v[1] for v in base_points.values())
        fast = [r for r, (v, _) in mine.items() if v <= INTERACTIVE_MAX_PCT[m]]
        full = [r for r, (_, met) in mine.items() if met >= SLO_MET_SHARE_OF_BEST * best]
        over = {r: dominated_by(mine[r], base_points) for r in mine}
        said = [
            f"{run[r]} {v:.2f}% interactive, {_times(met, best)} the best baseline"
            for r, (v, met) in mine.items()
        ]
        value = "; ".join(said)
        value += f"; interactive met by {', '.join(run[r] for r in fast) or 'none'}"
        value += f", SLO-met by {', '.join(run[r] for r in full) or 'none'}"
        dominated = [f"{run[r]} by {', '.join(b)}" for r, b in over.items() if b]
        value += f"; dominated: {'; '.join(dominated)}" if dominated else "; none dominated"
        lines.append(_line(name, value, goal, bool(fast) and bool(full) and not dominated))
    return lines


def target_lines(results: Mapping[str, Any]) -> list[str]:
    systems = results["systems"]
    baselines = {n: s for n, s in systems.items() if not is_sidecar(n)}
    lines: list[str] = _preset_lines(systems, baselines)
    for name, system in systems.items():
        if not is_sidecar(name):
            continue
        lines += _class_lines(name, system)
        lines += _throughput_lines(name, system, baselines)
        lines.append(_noisy_line(name, system, results["meta"]))
        step = system.get("step")
        if step is not None:
            rec = step["recovery_s"]
            value = _recovery_text(rec, step["after_s"]) + _recovery_seeds(step)
            if "last_over" in step:
                last = step["last_over"]
                value = f"{value}; {describe_last_over(last)}"
                # One or two misses in a window of a dozen requests: is it over its threshold?
                threshold = step.get("threshold_pct", {}).get(last["class"])
                if threshold is not None:
                    counts = {"violations": last["bad"], "sent": last["sent"]}
                    value += _count_claim(counts, threshold, "its class's threshold")
            met = rec is not None and rec <= RECOVERY_MAX_S
            lines.append(_line(f"recovery_after_step[{name}]", value, "<= 3 s", met))
        if "gpu_seconds" in system:  # issue 13 §5
            lines.append(usage_check.line(name, system["gpu_seconds"]))
    return lines


def _recovery_text(rec: float | None, after_s: float) -> str:
    return f"> {after_s:g} s" if rec is None else f"{rec:.1f} s"


def _recovery_seeds(step: Mapping[str, Any]) -> str:
    """Each seed's recovery beside the pooled one, and whether they straddle the goal (issue
    12 §2; a seed not back within the run counts as beyond it). Results written before the
    step ran once per seed have none."""
    seeds = step.get("seeds")
    if not seeds or len(seeds) < 2:
        return ""
    each = ", ".join(_recovery_text(s, step["after_s"]) for s in seeds)
    within = [s is not None and s <= RECOVERY_MAX_S for s in seeds]
    straddles = (
        "; seeds on both sides of the goal: no claim either way" if len(set(within)) > 1 else ""
    )
    return f" (seeds pooled; each alone: {each}){straddles}"


def _class_lines(name: str, system: Mapping[str, Any]) -> list[str]:
    lines = []
    for m in LOADS:
        p = _at(system, m)
        goal = f"<= {INTERACTIVE_MAX_PCT[m]:g}%"
        if p is None:
            lines.append(_line(f"interactive_viol_{m:g}x[{name}]", "not measured", goal, False))
            continue
        stats = p["classes"]["interactive"]
        v = stats["violation_pct"]
        value = f"{v:.2f}%{_spread(p, 'interactive_viol_pct', '.2f')}"
        if "infeasible" in stats:  # judged on all; those no scheduler could serve, apart
            value += (
                f"; {stats['infeasible']} infeasible alone on an idle GPU, of the feasible"
                f" {stats['feasible_violation_pct']:.2f}%"
            )
        value += _straddles(p, "interactive_viol_pct", INTERACTIVE_MAX_PCT[m])
        met = v <= INTERACTIVE_MAX_PCT[m]
        lines.append(_line(f"interactive_viol_{m:g}x[{name}]", value, goal, met))
    return lines


def _throughput_lines(
    name: str, system: Mapping[str, Any], baselines: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    lines = []
    for m in LOADS:
        p = _at(system, m)
        base_points = _points_at(baselines, m)
        tag = f"{m:g}x[{name}]"
        if p is None or not base_points:
            why = "not measured" if p is None else "no baseline in this run"
            lines.append(_line(f"slo_met_{tag}", why, ">= 0.9 x best baseline", False))
            continue
        best = max(base_points, key=lambda b: base_points[b][1])
        mine, theirs = p["overall"]["slo_met_over_c"], base_points[best][1]
        value = (
            f"{mine:.2f} C{_spread(p, 'slo_met_over_c', '.2f')}"
            f" = {_times(mine, theirs)} {best}'s {theirs:.2f} C"
        ) + _straddles(p, "slo_met_over_c", SLO_MET_SHARE_OF_BEST * theirs)
        value += _in_point(p, baselines, m)
        met = mine >= SLO_MET_SHARE_OF_BEST * theirs
        lines.append(_line(f"slo_met_{tag}", value, ">= 0.9 x best baseline", met))
        mine = (p["classes"]["interactive"]["violation_pct"], p["overall"]["slo_met_over_c"])
        over = dominated_by(mine, base_points)
        value = f"dominated by {', '.join(over)}" if over else "no baseline point dominates it"
        lines.append(_line(f"not_dominated_{tag}", value, "no baseline better on both", not over))
    return lines


def _times(mine: float, theirs: float) -> str:
    """`mine` as a multiple of a baseline's SLO-met; "above" one that met nothing (a heavy
    enough load times every request of a baseline out)."""
    return f"{mine / theirs:.2f} x" if theirs > 0 else "above"


def _in_point(
    point: Mapping[str, Any], baselines: Mapping[str, Mapping[str, Any]], m: float
) -> str:
    """What of it ended within the point, against the baseline that ended most there: said
    beside the judged value, which also counts what ended in the drain after the point's last
    request (`report._met_by`). Empty when the run did not measure it."""
    mine = point["overall"].get("slo_met_in_point_over_c")
    theirs = {
        name: value
        for name, system in baselines.items()
        if (p := _at(system, m)) is not None
        and (value := p["overall"].get("slo_met_in_point_over_c"))
    }
    if mine is None or not theirs:
        return ""
    best = max(theirs, key=lambda name: theirs[name])
    return (
        f"; ended within the point {mine:.2f} C{_spread(point, 'slo_met_in_point_over_c', '.2f')}"
        f" = {mine / theirs[best]:.2f} x {best}'s {theirs[best]:.2f} C"
    )


def knob_share(name: str) -> float | None:
    """The protect_share a sidecar-http row runs: a shipped preset's (PRESET_ROWS), or a
    sweep row's (`sidecar-http-share-X`); None for any other system."""
    if name in PRESET_ROWS:
        return TARGET[Protect(PRESET_ROWS[name])]
    if name.startswith(SHARE_ROW):
        return share_of(name.removeprefix("sidecar-http-"))
    return None


def curve(results: Mapping[str, Any]) -> list[tuple[float, str]]:
    """The knob's curve: (protect_share, row) of every sidecar-http row run, by share."""
    return sorted(
        (share, name) for name in results["systems"] if (share := knob_share(name)) is not None
    )


def curve_md(results: Mapping[str, Any]) -> str:
    """The sidecar-http rows by protect_share (presets at theirs), when two or more ran: what
    moving the knob trades, per load."""
    rows = curve(results)
    if len(rows) < 2:
        return ""
    points = frontier(results)
    loads = sorted({m for _, name in rows for m, _, _ in points[name]})
    lines = ["| protect_share | row | " + _load_heads(loads), "|---|---|" + "---|" * len(loads)]
    lines += [f"| {share:g} | {name} | " + _cells(points[name], loads) for share, name in rows]
    return "\n".join(lines)


def _load_heads(loads: Sequence[float]) -> str:
    return " | ".join(f"{m:g}x: viol %, SLO-met/C" for m in loads) + " |"


def _cells(pts: Sequence[tuple[float, float, float]], loads: Sequence[float]) -> str:
    """One system's (violation %, SLO-met / C) per load, "—" where it did not run it."""
    by_m = {m: (v, met) for m, v, met in pts}
    cells = [f"{by_m[m][0]:.1f}, {by_m[m][1]:.2f}" if m in by_m else "—" for m in loads]
    return " | ".join(cells) + " |"


def frontier_md(results: Mapping[str, Any]) -> str:
    """The frontier as a table: one row per system, (violation %, SLO-met / C) per load."""
    points = frontier(results)
    loads = sorted({m for pts in points.values() for m, _, _ in pts})
    lines = ["| system | " + _load_heads(loads), "|---|" + "---|" * len(loads)]
    lines += [f"| {name} | " + _cells(pts, loads) for name, pts in points.items()]
    return "\n".join(lines)


def plot_frontier(results: Mapping[str, Any], out: Path) -> Path:
    """frontier.png: at 2x and 3x, each system a point (interactive violation %, SLO-met / C);
    better is up and to the left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(LOADS), figsize=(6 * len(LOADS), 4.5), squeeze=False)
    for ax, m in zip(axes[0], LOADS, strict=True):
        for name, pts in frontier(results).items():
            xs = [v for mm, v, _ in pts if abs(mm - m) < 1e-9]
            ys = [s for mm, _, s in pts if abs(mm - m) < 1e-9]
            if xs:
                ax.scatter(xs, ys, marker="o" if is_sidecar(name) else "s", label=name)
                ax.annotate(name, (xs[0], ys[0]), fontsize=7)
        knob = [
            pt
            for _, name in curve(results)
            for pt in frontier(results)[name]
            if abs(pt[0] - m) < 1e-9
        ]
        if len(knob) > 1:  # the knob's curve, by protect_share
            ax.plot([v for _, v, _ in knob], [s for _, _, s in knob], "k--", lw=0.8)
        ax.set_xlabel("interactive SLO violations (%)")
        ax.set_ylabel("SLO-met throughput / C")
        ax.set_title(f"{m:g}x C")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    path = out / "frontier.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def print_targets(lines: Sequence[str]) -> None:
    for line in lines:
        print(line)
