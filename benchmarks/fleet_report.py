"""The fleet benchmark's output: results.json, report.md, plots, the printed table, and the
`TARGET` lines, which are always the last lines printed (so a run is checked by its tail)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks.fleet_scenarios import Outcome


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def table(results: Mapping[str, Outcome]) -> str:
    rows = ["| scenario | target | measured | goal | result |", "|---|---|---|---|---|"]
    for name, outcome in results.items():
        for t in outcome.targets:
            result = "met" if t.met else "**missed**"
            rows.append(f"| {name} | {t.name} | {t.value} | {t.goal} | {result} |")
    return "\n".join(rows)


def write(out: Path, meta: Mapping[str, Any], results: Mapping[str, Outcome]) -> None:
    """Write everything under `out`, then print the table and the TARGET lines."""
    document = {
        "meta": dict(meta),
        "scenarios": {name: {"metrics": o.metrics} for name, o in results.items()},
        "targets": [
            {"scenario": name, "name": t.name, "value": t.value, "goal": t.goal, "met": t.met}
            for name, o in results.items()
            for t in o.targets
        ],
    }
    (out / "results.json").write_text(json.dumps(_clean(document), indent=2) + "\n")
    plots = plot(out, results)
    text = table(results)
    (out / "report.md").write_text(_markdown(meta, results, text, plots))
    print()
    print(text)
    print(f"\nwall time {meta['wall_s']:.0f}s; results in {out}")
    for o in results.values():
        for t in o.targets:
            print(t.line())


def _markdown(
    meta: Mapping[str, Any], results: Mapping[str, Outcome], text: str, plots: list[str]
) -> str:
    lines = [
        f"# Fleet benchmark, {meta['mode']} mode ({meta['started']})",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Four replicas, split {meta['split']}, Redis timeout {meta['redis_timeout_ms']} ms,"
        f" phases {meta['phases_s']} s, wall time {meta['wall_s']:.0f}s.",
        "",
        text,
        "",
    ]
    for name, outcome in results.items():
        lines += [f"## {name}", "", "```json", json.dumps(_clean(outcome.metrics), indent=1)]
        lines += ["```", ""]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def plot(out: Path, results: Mapping[str, Outcome]) -> list[str]:
    """The plots that the scenarios run have data for; their file names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the bench extra
        return []
    written = []
    panels = [
        (name, key, o.series[key])
        for name, o in results.items()
        for key in ("cap", "pods", "probes", "outage")
        if o.series.get(key)
    ]
    for name, key, series in panels:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        _draw(ax, key, series, results[name].series.get("marks"))
        ax.set_title(f"{name}: {key}")
        file = f"{name}_{key}.png"
        fig.tight_layout()
        fig.savefig(out / file, dpi=90)
        plt.close(fig)
        written.append(file)
    return written


def _draw(ax: Any, key: str, series: Any, marks: Mapping[str, float] | None) -> None:
    if key == "cap":
        ax.step([t for t, _ in series], [v for _, v in series], where="post")
        ax.set_ylabel("tenant leases (ZCARD)")
    elif key == "pods":
        for i in range(len(series[0][1])):
            ax.step([t for t, _ in series], [v[i] for _, v in series], where="post",
                    label=f"pod-{i}")  # fmt: skip
        ax.set_ylabel("model leases per pod")
        ax.legend()
    elif key == "probes":
        ax.scatter([t for t, _, _ in series], [ms for _, ms, _ in series], s=2)
        ax.set_yscale("log")
        ax.set_ylabel("decision latency, ms (client)")
    else:
        ax.bar(range(len(series)), series, width=1.0)
        ax.set_ylabel("admitted per second")
    for label, t in (marks or {}).items():
        ax.axvline(t, color="red", linestyle="--")
        ax.text(t, ax.get_ylim()[1], label, fontsize=7, va="top")
    ax.set_xlabel("s")
