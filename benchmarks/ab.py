"""Paired QoS runs of two versions of the code: the working tree against a git revision.

    python -m benchmarks.ab --base HEAD~1 --seeds 3,5,7 -- --quick --capacity 59.05 \\
        --systems sidecar-http --loads 2,3 --seeds 2 --step-systems none

On these shared 2-core machines one run of one seed moves SLO-met by 0.1 C and interactive
violations by several points from one run to the next (benchmarks/README.md), so a change
is judged on runs of both versions made side by side, on the same seeds. For each seed this
runs `python -m benchmarks.qos ARGS --seed S` once in the working tree (uncommitted changes
included: try a change before committing it) and once in a temporary git worktree of
`--base`, alternating which goes first, with the same interpreter. It then prints, for each
sidecar system and load, both versions' interactive violation % and SLO-met / C (and what of
it ended within the point, where both versions report it) per seed, their means, and the
new-minus-base difference per seed: a claim needs differences that agree in sign, not one
mean beside another. Where the runs had a step, each sidecar system's recovery per seed too,
and in how many pairs the new version came back sooner or later; where they had a noisy
point, each sidecar system's quiet tenants' misses pooled there, per seed.

Nothing here is a benchmark of its own: the numbers are `benchmarks.qos`'s, from each run's
results.json, kept under `--out` (`new-S/`, `base-S/`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from benchmarks.qos_targets import quiet_pooled

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = ("new", "base")
V = TypeVar("V")


# Per system and load: interactive violation %, SLO-met / C, and what of it ended within the
# point (None from a version whose report did not measure it: `report._met_by`).
Headline = tuple[float, float, float | None]
MEASURES = (("interactive viol", "%"), ("SLO-met", " C"), ("SLO-met ended in the point", " C"))


def headline(results: Mapping[str, Any]) -> dict[tuple[str, float], Headline]:
    """Each sidecar system's `Headline` at each load of a run."""
    found: dict[tuple[str, float], Headline] = {}
    for name, system in results["systems"].items():
        if not name.startswith("sidecar"):
            continue
        for point in system["points"]:
            violation = point["classes"]["interactive"]["violation_pct"]
            met = point["overall"]["slo_met_over_c"] or 0.0
            in_point = point["overall"].get("slo_met_in_point_over_c")
            found[(name, float(point["m"]))] = (violation, met, in_point)
    return found


def compare(runs: Mapping[str, Mapping[int, Mapping[tuple[str, float], Headline]]]) -> list[str]:
    """The table of the module comment, one line per system, load and measure (a measure one
    of the versions did not report is left out)."""
    seeds = sorted(set(runs["new"]) & set(runs["base"]))
    keys = sorted(
        {k for seed in seeds for k in runs["new"][seed]}
        & {k for seed in seeds for k in runs["base"][seed]}
    )
    lines = []
    for system, m in keys:
        for index, (label, unit) in enumerate(MEASURES):
            got = [
                (runs["new"][s][(system, m)][index], runs["base"][s][(system, m)][index])
                for s in seeds
            ]
            pairs = [(a, b) for a, b in got if a is not None and b is not None]
            if len(pairs) < len(got):
                continue
            new = [a for a, _ in pairs]
            base = [b for _, b in pairs]
            lines.append(_paired_line(f"{system} {m:g}x {label}", new, base, unit))
    return lines


def recoveries(results: Mapping[str, Any]) -> dict[str, float | None]:
    """Each sidecar system's recovery after the step, where the run had one (None: not back
    within the seconds observed)."""
    return {
        name: system["step"]["recovery_s"]
        for name, system in results["systems"].items()
        if name.startswith("sidecar") and system.get("step")
    }


def compare_recovery(runs: Mapping[str, Mapping[int, Mapping[str, float | None]]]) -> list[str]:
    """One line per system that ran the step in both versions: each seed's recovery, and in
    how many pairs the new version came back sooner or later (not back counts as latest)."""
    lines = []
    for name, new, base in _by_system(runs):
        order = [_later(a, b) for a, b in zip(new, base, strict=True)]
        lines.append(
            f"{name} recovery: new {_seconds(new)} | base {_seconds(base)} | new sooner in"
            f" {order.count(-1)}, later in {order.count(1)}, the same in {order.count(0)}"
            f" of {len(new)} pairs"
        )
    return lines


def _by_system(
    runs: Mapping[str, Mapping[int, Mapping[str, V]]],
) -> Iterator[tuple[str, list[V], list[V]]]:
    """Per system found in both versions: its values in the new and the base runs, over
    the seeds both ran it with, in seed order."""
    seeds = sorted(set(runs["new"]) & set(runs["base"]))
    systems = sorted(
        {n for s in seeds for n in runs["new"][s]} & {n for s in seeds for n in runs["base"][s]}
    )
    for name in systems:
        paired = [s for s in seeds if name in runs["new"][s] and name in runs["base"][s]]
        yield name, [runs["new"][s][name] for s in paired], [runs["base"][s][name] for s in paired]


def noisy_quiet(results: Mapping[str, Any]) -> dict[str, float]:
    """Each sidecar system's quiet tenants' misses pooled in the noisy point, in %, where
    the run had one (`--noisy-burst`, qos_targets.quiet_pooled)."""
    noisy_tenant = results.get("meta", {}).get("noisy_tenant")
    found: dict[str, float] = {}
    for name, system in results["systems"].items():
        point = system.get("noisy")
        if not name.startswith("sidecar") or not point or noisy_tenant is None:
            continue
        pooled = quiet_pooled(point, noisy_tenant)
        if pooled is not None and pooled[1] > 0:
            found[name] = 100 * pooled[0] / pooled[1]
    return found


def compare_noisy(runs: Mapping[str, Mapping[int, Mapping[str, float]]]) -> list[str]:
    """One line per system with a noisy point in both versions: the quiet tenants' misses
    pooled, seed by seed, as `compare` gives a point's measures."""
    return [
        _paired_line(f"{name} noisy point, quiet tenants pooled", new, base, "%")
        for name, new, base in _by_system(runs)
    ]


def _paired_line(label: str, new: Sequence[float], base: Sequence[float], unit: str) -> str:
    """Both versions' values seed by seed, their means, and the new-minus-base differences
    with whether they agree in sign."""
    diff = [a - b for a, b in zip(new, base, strict=True)]
    signs = {(d > 0) - (d < 0) for d in diff}
    agree = "all one sign" if len(signs) == 1 and 0 not in signs else "signs differ"
    return (
        f"{label}: new {_values(new, unit)} | base {_values(base, unit)}"
        f" | new-base {', '.join(f'{d:+.2f}' for d in diff)}"
        f" (mean {statistics.fmean(diff):+.2f}, {agree})"
    )


def _later(new: float | None, base: float | None) -> int:
    """1 when `new` came back later than `base`, -1 sooner, 0 the same (None: never)."""
    a, b = (float("inf") if v is None else v for v in (new, base))
    return (a > b) - (a < b)


def _seconds(values: Sequence[float | None]) -> str:
    return ", ".join("not back" if v is None else f"{v:g} s" for v in values)


def _values(values: Sequence[float], unit: str) -> str:
    each = ", ".join(f"{v:.2f}" for v in values)
    return f"{each} (mean {statistics.fmean(values):.2f}{unit})"


def _run(where: Path, args: Sequence[str], seed: int, out: Path) -> dict[str, Any]:
    """One `benchmarks.qos` run of the code in `where`; its results.json. PYTHONPATH names
    `where` for every process the run starts: the harness puts its own checkout first since
    a8ef4e7 (`devstack.procs.python_environment`), but a base older than that starts its
    sidecar from a work directory, which would import the package the virtual environment
    installed (this tree)."""
    out.mkdir(parents=True)
    command = [
        sys.executable,
        "-m",
        "benchmarks.qos",
        *args,
        "--seed",
        str(seed),
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(where)}
    done = subprocess.run(command, cwd=where, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{where}: {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return dict(json.loads((folder / "results.json").read_text()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__)
    parser.add_argument("--base", required=True, help="the git revision to compare against")
    parser.add_argument("--seeds", default="3,5,7", help="comma-separated; one pair each")
    parser.add_argument("--out", type=Path, default=ROOT / "results", help="results root")
    parser.add_argument("qos_args", nargs=argparse.REMAINDER, help="-- then benchmarks.qos's")
    args = parser.parse_args(argv)
    qos_args = [a for a in args.qos_args if a != "--"]
    if "--seed" in qos_args or "--out" in qos_args:
        parser.error("--seed and --out are set per run; leave them out of the qos arguments")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = args.out / (time.strftime("%Y-%m-%d-%H%M%S") + "-ab")
    runs: dict[str, dict[int, Any]] = {v: {} for v in VERSIONS}
    steps: dict[str, dict[int, dict[str, float | None]]] = {v: {} for v in VERSIONS}
    noisy: dict[str, dict[int, dict[str, float]]] = {v: {} for v in VERSIONS}
    with tempfile.TemporaryDirectory(prefix="qos-ab-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(base), args.base],
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
        try:
            for index, seed in enumerate(seeds):
                order = VERSIONS if index % 2 == 0 else VERSIONS[::-1]
                for version in order:
                    where = ROOT if version == "new" else base
                    results = _run(where, qos_args, seed, out / f"{version}-{seed}")
                    runs[version][seed] = headline(results)
                    steps[version][seed] = recoveries(results)
                    noisy[version][seed] = noisy_quiet(results)
                    print(f"ran {version} with --seed {seed}", file=sys.stderr, flush=True)
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False
            )
    print(f"paired runs, new = working tree, base = {args.base}; results in {out}")
    for line in compare(runs) + compare_recovery(steps) + compare_noisy(noisy):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
