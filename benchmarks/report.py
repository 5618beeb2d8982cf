"""From per-request records to the numbers, the markdown table and the plots.

Definitions (QOS-BENCHMARK.md):

* a request **meets its SLO** when it got a 2xx answer within its class's deadline (measured
  from when it was sent); late, failed, timed-out and shed requests are **violations**;
* **shed** = 429 (over quota) or 503 (overload) answers; **refused infeasible** = 422 answers
  (the sidecar's `tokens.infeasible: refuse`: max tokens its class's deadline cannot hold even
  alone), violations too; **errors** = everything else that is not 2xx (other statuses,
  timeouts, connection errors); admitted + shed + refused infeasible + errors = sent;
* **goodput** = the highest load multiple m at which the worst class's violation rate is at
  most 1%, linearly interpolated between the two sweep points around the first crossing
  (from (0, 0%) when the lowest point already exceeds 1%);
* **SLO-met/C** = requests meeting their SLO per second, over C;
* **Jain's fairness** per class over the tenants sending that class: x_i = SLO-met rate of
  tenant i / min(its demand, its entitlement), the entitlement being its quota split over its
  classes in proportion to its demand; J = (sum x)^2 / (n * sum x^2). 1 is perfectly fair;
  a tenant getting more than its due (x > 1) lowers it as much as one getting less;
* **recovery** after the step: seconds from the end of the 3x phase until the rolling
  (by send time) violation rate of every class is back at or below max(1%, that class's own
  level before the step) and stays there; with it, the last window over, the class
  furthest over and how its requests missed (refused with a status, timed out, or late).
  A class's own level is that of its requests whose deadline had passed when the step began
  (sent in the BEFORE_S seconds before that): one sent just before the step runs into it, and
  its miss is the step's, not the class's level (a class whose deadline is longer than the
  time before the step has no level of its own there, and is held to 1%). The step is run
  once per seed and every seed's records are pooled, as a point's are; each seed's recovery
  is the spread.

Only records sent after the warm-up count. Every number here is computed from the records.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.loadgen import Record
from benchmarks.policy import Quota
from benchmarks.workload import ClassSpec, TenantSpec

SLO_TARGET_PCT = 1.0
BEFORE_S = 4.0  # how long before the step a class's own level is taken from (`recovery_s`)


def is_shed(r: Record) -> bool:
    return r.status in (429, 503)


def is_admitted(r: Record) -> bool:
    return 200 <= r.status < 300


def met(r: Record, deadline_s: float) -> bool:
    """Answered in time, and whole: a stream that ended in an error event failed."""
    return is_admitted(r) and not r.error and r.latency is not None and r.latency <= deadline_s


def _pct(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole else 0.0


def _quantiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    arr = np.asarray(values) * 1000.0
    return {
        "p50": round(float(np.percentile(arr, 50)), 2),
        "p95": round(float(np.percentile(arr, 95)), 2),
        "p99": round(float(np.percentile(arr, 99)), 2),
    }


def class_stats(
    records: Sequence[Record],
    deadline_s: float,
    duration_s: float,
    lone_s: Callable[[Record], float] | None = None,
) -> dict[str, Any]:
    """`lone_s`: a request's time alone on an idle device (the cost model); requests whose
    deadline is below it are infeasible: counted on their own, and left out of
    `feasible_violation_pct`."""
    sent = len(records)
    admitted = sum(1 for r in records if is_admitted(r))
    s429 = sum(1 for r in records if r.status == 429)
    s503 = sum(1 for r in records if r.status == 503)
    s422 = sum(1 for r in records if r.status == 422)
    errors = sent - admitted - s429 - s503 - s422
    good = sum(1 for r in records if met(r, deadline_s))
    ok = [r for r in records if is_admitted(r) and r.latency is not None]
    return {
        "sent": sent,
        "admitted": admitted,
        "shed_429": s429,
        "shed_503": s503,
        "refused_infeasible": s422,
        "errors": errors,
        "timeouts": sum(1 for r in records if r.error == "timeout"),
        "slo_met": good,
        "violation_pct": round(_pct(sent - good, sent), 3),
        # The scheduler's own: a 429 refuses what the tenant's entitlement does not cover,
        # so it is neither a violation nor a request the system owed (goodput uses this).
        "scheduler_violation_pct": round(_pct(sent - s429 - good, sent - s429), 3),
        "slo_met_rps": round(good / duration_s, 3),
        **_feasibility(records, deadline_s, lone_s),
        "latency_ms": _quantiles([r.latency for r in ok if r.latency is not None]),
        "ttft_ms": _quantiles([r.ttfb for r in ok if r.ttfb is not None]),
        **_per_token(ok),
    }


def _per_token(ok: Sequence[Record]) -> dict[str, Any]:
    """Time per output token of a streamed class's answered requests (none: not streamed)."""
    tpot = [r.tpot for r in ok if r.tpot is not None]
    return {"tpot_ms": _quantiles(tpot)} if tpot else {}


def _feasibility(
    records: Sequence[Record], deadline_s: float, lone_s: Callable[[Record], float] | None
) -> dict[str, Any]:
    if lone_s is None:
        return {}
    feasible = [r for r in records if lone_s(r) <= deadline_s]
    good = sum(1 for r in feasible if met(r, deadline_s))
    return {
        "infeasible": len(records) - len(feasible),
        "feasible_violation_pct": round(_pct(len(feasible) - good, len(feasible)), 3),
    }


def _decision_rps(
    decisions: Mapping[str, float] | None, reason: str, window_s: float | None
) -> float | None:
    """Decisions of `reason` per second (None: no sidecar, nothing to report)."""
    if decisions is None or not window_s:
        return None
    return round(decisions.get(reason, 0.0) / window_s, 3)


def _met_by(records: Sequence[Record], classes: Mapping[str, ClassSpec], ends_s: float) -> int:
    """Requests that met their deadline and had ended by `ends_s`. SLO-met counts every request
    sent in the point that met its deadline, whenever it ended; once the point's last request is
    sent, the device serves what the scheduler held or queued with nothing new arriving, and at
    overload most of a long-deadline class (batch: 18 s, against 10 s points in quick mode)
    ends in that drain. What ended within the point is the useful work done while the overload
    lasted, close to what a sustained overload gets (issue 12 §2: an honest instrument)."""
    return sum(
        1
        for r in records
        if met(r, classes[r.klass].deadline_s)
        and r.latency is not None
        and r.sent + r.latency <= ends_s
    )


def headline(stats: Mapping[str, Any]) -> dict[str, float]:
    """The numbers a point is judged on, for one seed's spread."""
    return {
        "interactive_viol_pct": stats["classes"]["interactive"]["violation_pct"],
        "worst_class_viol_pct": stats["overall"]["worst_class_violation_pct"],
        "slo_met_over_c": stats["overall"]["slo_met_over_c"],
        "slo_met_in_point_over_c": stats["overall"]["slo_met_in_point_over_c"],
    }


def point_stats(
    records: Sequence[Record],
    classes: Mapping[str, ClassSpec],
    tenants: Sequence[TenantSpec],
    quotas: Mapping[str, Quota],
    duration_s: float,
    capacity_rps: float,
    decisions: Mapping[str, float] | None = None,
    decisions_window_s: float | None = None,
    lone_s: Callable[[Record], float] | None = None,
    ends_s: float | None = None,
) -> dict[str, Any]:
    """`decisions`: the sidecar's decisions by reason during the point (the change in its
    `qos_decisions_total` over `decisions_window_s`, warm-up included: the sidecar cannot tell
    warm-up requests apart); None for a system without a sidecar. `ends_s`: when the point's
    last request was due, on the records' clock (each seed's run starts at 0), for
    `slo_met_in_point_over_c`; None: not reported."""
    by_class: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_class[r.klass].append(r)
    per_class = {
        name: class_stats(by_class.get(name, []), c.deadline_s, duration_s, lone_s)
        for name, c in classes.items()
    }
    sent = len(records)
    good = sum(v["slo_met"] for v in per_class.values())
    s429 = sum(v["shed_429"] for v in per_class.values())
    s503 = sum(v["shed_503"] for v in per_class.values())
    s422 = sum(v["refused_infeasible"] for v in per_class.values())
    admitted = sum(v["admitted"] for v in per_class.values())
    in_point = None if ends_s is None else _met_by(records, classes, ends_s)
    overall = {
        "sent": sent,
        "admitted": admitted,
        "shed_429": s429,
        "shed_503": s503,
        "refused_infeasible": s422,
        "errors": sent - admitted - s429 - s503 - s422,
        "offered_rps": round(sent / duration_s, 3),
        "slo_met_rps": round(good / duration_s, 3),
        "slo_met_over_c": round(good / duration_s / capacity_rps, 4) if capacity_rps else None,
        "slo_met_in_point_over_c": (
            round(in_point / duration_s / capacity_rps, 4)
            if in_point is not None and capacity_rps
            else None
        ),
        "shed_429_rps": round(s429 / duration_s, 3),
        "shed_503_rps": round(s503 / duration_s, 3),
        "deferred_rps": _decision_rps(decisions, "admitted_deferred", decisions_window_s),
        "relegated_rps": _decision_rps(decisions, "admitted_relegated", decisions_window_s),
        "sidecar_decisions": dict(decisions) if decisions is not None else None,
        "violation_pct": round(_pct(sent - good, sent), 3),
        "worst_class_scheduler_violation_pct": max(
            (v["scheduler_violation_pct"] for v in per_class.values() if v["sent"]), default=0.0
        ),
        "worst_class_violation_pct": max(
            (v["violation_pct"] for v in per_class.values() if v["sent"]), default=0.0
        ),
    }
    per_tenant: dict[str, Any] = {}
    demand: dict[tuple[str, str], int] = defaultdict(int)
    good_tc: dict[tuple[str, str], int] = defaultdict(int)
    for r in records:
        demand[(r.tenant, r.klass)] += 1
        if met(r, classes[r.klass].deadline_s):
            good_tc[(r.tenant, r.klass)] += 1
    for t in tenants:
        mine = [r for r in records if r.tenant == t.name]
        n = len(mine)
        admitted_t = sum(1 for r in mine if is_admitted(r))
        good_t = sum(good_tc[(t.name, c)] for c in classes)
        quota = quotas.get(t.name, Quota(None, None)).rate_per_s
        per_tenant[t.name] = {
            "offered_rps": round(n / duration_s, 3),
            "admitted_rps": round(admitted_t / duration_s, 3),
            "slo_met_rps": round(good_t / duration_s, 3),
            "violation_pct": round(_pct(n - good_t, n), 3),
            "sent": n,
            "violations": n - good_t,
            # How they ended: refused for load, refused over quota; the rest late or failed.
            "shed_503": sum(1 for r in mine if r.status == 503),
            "shed_429": sum(1 for r in mine if r.status == 429),
            "quota_rps": round(quota, 3) if quota is not None else None,
            "admitted_over_quota": round(admitted_t / duration_s / quota, 3) if quota else None,
        }
    fairness: dict[str, float | None] = {}
    for name in classes:
        xs = []
        for t in tenants:
            d = demand[(t.name, name)] / duration_s
            if d <= 0:
                continue
            total = sum(demand[(t.name, c)] for c in classes) / duration_s
            quota = quotas.get(t.name, Quota(None, None)).rate_per_s
            entitled = quota * d / total if quota is not None and total > 0 else math.inf
            xs.append(good_tc[(t.name, name)] / duration_s / min(d, entitled))
        fairness[name] = (
            round(sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)), 4)
            if xs and sum(x * x for x in xs) > 0
            else None
        )
    return {"classes": per_class, "overall": overall, "tenants": per_tenant, "jain": fairness}


def goodput(points: Sequence[tuple[float, float]]) -> tuple[float, str]:
    """(m, worst-class violation %) pairs -> (goodput as a multiple of C, note)."""
    pts = sorted(points)
    prev_m, prev_v = 0.0, 0.0
    for m, v in pts:
        if v > SLO_TARGET_PCT:
            if prev_v > SLO_TARGET_PCT:  # cannot happen: loop stops at the first crossing
                return prev_m, ""
            frac = (SLO_TARGET_PCT - prev_v) / (v - prev_v) if v != prev_v else 0.0
            note = "below the lowest load" if prev_m == 0.0 else ""
            return prev_m + frac * (m - prev_m), note
        prev_m, prev_v = m, v
    return prev_m, "at least (never above 1%)"


def how_missed(r: Record) -> str:
    """How a request missed its deadline: the refusal's status, the client's error, or late."""
    if r.status and not is_admitted(r):
        return str(r.status)
    return r.error or "late"


def _tally(
    records: Sequence[Record],
    classes: Mapping[str, ClassSpec],
    t0: float,
    t1: float,
    settled: bool = False,
) -> dict[str, dict[str, Any]]:
    """Each class with at least 3 requests sent in [t0, t1): its violation %, how many of how
    many missed, and how (`how_missed`). `settled`: each class's window ends its deadline
    earlier, so that every request in it was over (met or missed) by t1."""
    sent: dict[str, int] = defaultdict(int)
    how: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in records:
        shift = classes[r.klass].deadline_s if settled else 0.0
        if t0 - shift <= r.scheduled < t1 - shift:
            sent[r.klass] += 1
            if not met(r, classes[r.klass].deadline_s):
                how[r.klass][how_missed(r)] += 1
    out = {}
    for k, n in sent.items():
        if n >= 3:
            bad = sum(how[k].values())
            out[k] = {"class": k, "pct": _pct(bad, n), "bad": bad, "sent": n, "how": dict(how[k])}
    return out


def _worst_pct(tally: Mapping[str, Mapping[str, Any]]) -> float:
    return max((t["pct"] for t in tally.values()), default=0.0)


def _over(
    tally: Mapping[str, Mapping[str, Any]], thresholds: Mapping[str, float]
) -> Mapping[str, Any] | None:
    """The class furthest over its own threshold, or None when none is over."""
    over = [t for k, t in tally.items() if t["pct"] > thresholds[k]]
    return max(over, key=lambda t: t["pct"] - thresholds[t["class"]], default=None)


def recovery_s(
    records: Sequence[Record],
    classes: Mapping[str, ClassSpec],
    step_start: float,
    step_end: float,
    run_end: float,
    window_s: float = 1.0,
    hop_s: float = 0.25,
) -> dict[str, Any]:
    """Recovery after the step (see the module docstring); None when not recovered. Each class
    is held to its own level before the step (at least 1%): a class already refused before it
    does not excuse another, and a request the step itself made late does not count in that
    level. With it, the last window over (`last_over`): when it began after the step, the
    class furthest over, and how its requests missed. `records` may pool several runs of the
    same step (their times from each run's start)."""

    before = _tally(records, classes, step_start - BEFORE_S, step_start, settled=True)
    thresholds = {k: max(SLO_TARGET_PCT, before[k]["pct"] if k in before else 0.0) for k in classes}
    series = []
    t = step_end
    last: tuple[float, Mapping[str, Any]] | None = None
    while t + window_s <= run_end + 1e-9:
        tally = _tally(records, classes, t, t + window_s)
        series.append((round(t - step_end, 3), round(_worst_pct(tally), 2)))
        over = _over(tally, thresholds)
        if over is not None:
            last = (t, over)
        t += hop_s
    out: dict[str, Any] = {
        "recovery_s": None,
        "threshold_pct": {k: round(v, 3) for k, v in thresholds.items()},
        "violation_before_pct": {k: round(v["pct"], 3) for k, v in before.items()},
        "worst_violation_during_pct": round(
            _worst_pct(_tally(records, classes, step_start, step_end)), 3
        ),
        "series": series,
    }
    if not series:
        return out
    if last is None:
        out["recovery_s"] = 0.0
    elif last[0] + hop_s + window_s <= run_end - 1e-9:  # else still over at the run's end
        out["recovery_s"] = round(last[0] + hop_s - step_end, 3)
    if last is not None:
        out["last_over"] = {"at_s": round(last[0] - step_end, 3)} | dict(last[1])
    return out


def describe_last_over(last: Mapping[str, Any]) -> str:
    """`recovery_s`'s last window over the threshold, in words."""
    how = ", ".join(f"{n} {k}" for k, n in sorted(last["how"].items(), key=lambda kv: -kv[1]))
    return (
        f"last over at +{last['at_s']:g} s: {last['class']} {last['bad']} of {last['sent']}"
        f" missed ({how})"
    )


# -- table and plots ----------------------------------------------------------------------------


def _at(system: Mapping[str, Any], m: float) -> Mapping[str, Any] | None:
    for p in system["points"]:
        if abs(p["m"] - m) < 1e-9:
            found: Mapping[str, Any] = p
            return found
    return None


def _fmt(v: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


@dataclass(frozen=True)
class NoisyWorst:
    """The quiet tenant that missed most where the noisy tenant is judged."""

    tenant: str
    numbers: Mapping[str, Any]  # that tenant's numbers at the point
    m: float  # the point's load, a multiple of C
    point: Mapping[str, Any]  # the point itself
    burst: float | None  # the noisy point's burst; None: a sweep point


def _worst_quiet(point: Mapping[str, Any], noisy: str) -> str | None:
    """The tenant other than `noisy` that missed most at `point`; None when there is none."""
    quiet = [k for k in point["tenants"] if k != noisy]
    return max(quiet, key=lambda k: point["tenants"][k]["violation_pct"]) if quiet else None


def noisy_worst(system: Mapping[str, Any], meta: Mapping[str, Any]) -> NoisyWorst | None:
    """Where the noisy tenant is judged: the noisy point (every quiet tenant at its 1x rate, the
    noisy tenant at `burst` times its own) when the run has one; otherwise, for results
    without it, the highest sweep load where every other tenant's expected demand (its share of
    m * C) is within its quota. None when neither exists."""
    noisy = system.get("noisy")
    if noisy is None:
        return sweep_worst(system, meta)
    name = _worst_quiet(noisy, meta["noisy_tenant"])
    if name is None:
        return None
    return NoisyWorst(name, noisy["tenants"][name], noisy["m"], noisy, noisy["burst"])


def sweep_worst(system: Mapping[str, Any], meta: Mapping[str, Any]) -> NoisyWorst | None:
    """The worst quiet tenant at the highest sweep load where every quiet tenant's expected
    demand (its share of m * C) is within its quota; None when no load qualifies."""
    quiet = [t for t in meta["tenants"] if t["name"] != meta["noisy_tenant"]]
    capacity = meta["capacity_rps"]
    best: NoisyWorst | None = None
    for p in sorted(system["points"], key=lambda p: p["m"]):
        if quiet and all(
            t["quota_rps"] is None or t["share"] * p["m"] * capacity <= t["quota_rps"]
            for t in quiet
        ):
            name = _worst_quiet(p, meta["noisy_tenant"])
            if name is not None:
                best = NoisyWorst(name, p["tenants"][name], p["m"], p, None)
    return best


def describe_noisy(point: Mapping[str, Any], noisy: str) -> str:
    """The noisy point in words: what the noisy tenant sent and was refused, and the worst
    quiet tenant."""
    n = point["tenants"][noisy]
    text = (
        f"{noisy} at {point['burst']:g}x its rate (load {point['m']:g}x): sent {n['sent']},"
        f" 429 {n['shed_429']}, 503 {n['shed_503']}"
    )
    if (name := _worst_quiet(point, noisy)) is not None:
        q = point["tenants"][name]
        text += f"; worst quiet tenant {name} {q['violation_pct']:.2f}% ({q['violations']} of"
        text += f" {q['sent']})"
    return text


def markdown_table(results: Mapping[str, Any]) -> str:
    lines = [
        "| system | goodput/C | interactive viol % @2x | @3x | SLO-met/C @2x | @3x "
        "| ended in the point @2x | @3x "
        "| worst other-tenant viol % (at m) | shed 429/503 % @3x | recovery s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in results["systems"].items():
        p2, p3 = _at(s, 2.0), _at(s, 3.0)
        iv2 = p2["classes"]["interactive"]["violation_pct"] if p2 else None
        iv3 = p3["classes"]["interactive"]["violation_pct"] if p3 else None
        sm2 = p2["overall"]["slo_met_over_c"] if p2 else None
        sm3 = p3["overall"]["slo_met_over_c"] if p3 else None
        in2 = p2["overall"].get("slo_met_in_point_over_c") if p2 else None
        in3 = p3["overall"].get("slo_met_in_point_over_c") if p3 else None
        judged = noisy_worst(s, results["meta"])
        if judged is None:
            other = "n/a"
        elif judged.burst is not None:
            other = f"{_fmt(judged.numbers['violation_pct'])} (noisy at {judged.burst:g}x)"
        else:
            other = f"{_fmt(judged.numbers['violation_pct'])} ({judged.m:g}x)"
        if p3:
            o = p3["overall"]
            shed = f"{_pct(o['shed_429'], o['sent']):.0f}/{_pct(o['shed_503'], o['sent']):.0f}"
        else:
            shed = "n/a"
        step = s.get("step")
        if step is None:
            rec = "—"
        elif step["recovery_s"] is None:
            rec = f"> {step['after_s']:g}"
        else:
            rec = f"{step['recovery_s']:.1f}"
        g = s.get("goodput_over_c")
        gtxt = _fmt(g, ".2f") + (" (≥)" if s.get("goodput_note", "").startswith("at least") else "")
        lines.append(
            f"| {name} | {gtxt} | {_fmt(iv2)} | {_fmt(iv3)} | {_fmt(sm2, '.2f')} "
            f"| {_fmt(sm3, '.2f')} | {_fmt(in2, '.2f')} | {_fmt(in3, '.2f')} "
            f"| {other} | {shed} | {rec} |"
        )
    return "\n".join(lines)


def streamed_table(results: Mapping[str, Any]) -> str:
    """Time to first token and per output token of each streamed class (empty: none)."""
    streamed = results["meta"].get("streamed_classes") or []
    loads = results["meta"]["loads"]
    if not streamed:
        return ""
    lines = [
        "| system | class | "
        + " | ".join(f"{m:g}x: TTFT p50/p99, TPOT p50/p99 ms" for m in loads)
        + " |",
        "|---|---|" + "---|" * len(loads),
    ]
    for name, s in results["systems"].items():
        for klass in streamed:
            cells = []
            for m in loads:
                c = (_at(s, m) or {}).get("classes", {}).get(klass, {})
                ttft, tpot = c.get("ttft_ms") or {}, c.get("tpot_ms") or {}
                cells.append(
                    f"{_fmt(ttft.get('p50'))}/{_fmt(ttft.get('p99'))}, "
                    f"{_fmt(tpot.get('p50'), '.2f')}/{_fmt(tpot.get('p99'), '.2f')}"
                )
            lines.append(f"| {name} | {klass} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(
    results: Mapping[str, Any], records_at_2x: Mapping[str, Mapping[str, list[float]]], out: Path
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = list(results["meta"]["classes"])
    paths: list[Path] = []

    fig, axes = plt.subplots(
        1, len(classes) + 1, figsize=(5 * (len(classes) + 1), 4), squeeze=False
    )
    for i, name in enumerate([*classes, "SLO-met/C"]):
        ax = axes[0][i]
        for sys_name, s in results["systems"].items():
            pts = sorted(s["points"], key=lambda p: p["m"])
            xs = [p["m"] for p in pts]
            if name == "SLO-met/C":
                ys = [p["overall"]["slo_met_over_c"] or 0.0 for p in pts]
            else:
                ys = [p["classes"][name]["violation_pct"] for p in pts]
            ax.plot(xs, ys, marker="o", label=sys_name)
        ax.set_xlabel("offered load (multiple of C)")
        if name == "SLO-met/C":
            ax.set_title("SLO-met throughput / C")
        else:
            ax.set_title(f"{name}: SLO violations")
            ax.set_ylabel("violations %")
            ax.axhline(SLO_TARGET_PCT, color="grey", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = out / "violations_vs_load.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)

    fig, axes = plt.subplots(1, len(classes), figsize=(5 * len(classes), 4), squeeze=False)
    deadlines = results["meta"]["deadlines_s"]
    for i, name in enumerate(classes):
        ax = axes[0][i]
        for sys_name, per_class in records_at_2x.items():
            lat = sorted(per_class.get(name, []))
            if lat:
                frac = np.arange(1, len(lat) + 1) / len(lat)
                ax.plot(np.asarray(lat) * 1000.0, frac, label=sys_name)
        ax.axvline(deadlines[name] * 1000.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_title(f"{name}: latency CDF of admitted requests at 2x")
        ax.set_xlabel("latency ms (log)")
        ax.set_ylabel("fraction")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = out / "latency_cdf_2x.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
    return paths
