"""Does Triton leave queued requests waiting while its model instance is idle? Triton alone.

``python -m benchmarks.triton_stalls`` (about 6 minutes) starts Triton with the simulated
``llm`` model of the QoS benchmark (same speed: ``--target-throughput``), sends it bursty
traffic straight over HTTP (no Envoy, no sidecar; gamma arrivals, ``--cv``), and reads the
model's own log of its batches (``batch_log``, examples/triton/llm/1/model.py). A **stall** is
a stretch in which the instance ran nothing although a request was waiting for it: between
two batches, from the later of the first batch's end and the first request sent after the
first batch had started (it cannot have been in it) to the start of the next batch. Requests
are never cancelled here (the client waits for every answer), so a stall is Triton's alone.

Three model configurations, seeds in alternation:
- ``shipped``: ``examples/triton/llm/config.pbtxt`` as it is, with ``priority_levels`` (what
  the sidecar's priorities need) and a ``default_queue_policy``;
- ``no-priority``: the same without either, every request sent without a priority;
- ``two-instances``: as shipped, with two instances that Triton's rate limiter runs one at a
  time (one ``DEVICE`` resource, ``--rate-limit=execution_count``): still one device;
- ``nudged``: as shipped, with the sidecar's nudger (``sidecar/backends/nudge.py``, ticking
  every 10 ms, the ``triton_nudge_ms`` default) running beside the client: busy while the
  client has a request unanswered, told of each answer as the sidecar is of each request's
  end, so a nudge follows each batch's end: what the sidecar does for the stall.

Why they differ (Triton core, ``src/scheduler_utils.cc`` and ``src/dynamic_batch_scheduler.cc``
at the time of writing): a queue with priority levels, or with a timeout policy a request may
override, does not support prefetching. Then the dynamic batcher forms the next batch only once
the instance waits for one, and it waits for that on a condition variable with a 500 ms
timeout. The instance's end of a batch notifies it before the instance is back waiting; if the
batcher looks in between, it sees no waiting instance and sleeps again, until the next
request arrives (its enqueue notifies), a request is cancelled, or the 500 ms pass. Without
priorities the batcher prepares the next batch while the current one runs, and nothing waits;
with a second instance waiting, it finds one waiting whenever it looks.

The table also says how many stalls ended within 10 ms after a request was sent (its enqueue
woke the batcher). Results: ``results/<stamp>-triton-stalls/`` (``results.json``,
``report.md``); the table is printed at the end. No target of an issue reads it: it says what
part of a QoS run's misses Triton's own scheduling can cause, whatever sits in front of it.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import datetime as dt
import itertools
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from benchmarks.models import MODELS, make_model_repo
from benchmarks.workload import CLASS_PRIORITY, Arrival, WorkloadConfig, generate, sample_sizes
from devstack.triton import TritonProcess
from sidecar.backends.nudge import TritonNudger
from sidecar.backends.triton import TritonEndpoint
from sidecar.metrics import Metrics

VARIANTS = ("shipped", "no-priority", "two-instances", "nudged")
# Two instances of the model that share one device: Triton's rate limiter lets one run at a time.
RATE_LIMITED = ["--rate-limit=execution_count", "--rate-limit-resource=DEVICE:1"]
GRACE_S = 0.002  # a request's way from the client into Triton's queue, on loopback
MIN_STALL_S = 0.020
WAKE_S = 0.010  # a send this close before a stall's end is taken to have ended it


@dataclass(frozen=True, slots=True)
class Batch:
    start: float  # time.monotonic(), the host's clock
    end: float
    rows: int
    ids: tuple[str, ...] = ()  # its requests' ids, "-" for one without; () when none had one


@dataclass(frozen=True, slots=True)
class Stall:
    start: float  # when the instance could have started a waiting request
    end: float  # when it started the next batch
    waiting_since: float  # the first waiting request's send time
    woken_by_send: bool  # a request was sent within WAKE_S before it ended

    @property
    def seconds(self) -> float:
        return self.end - self.start


def find_stalls(
    batches: Sequence[Batch], sends: Sequence[float], min_s: float = MIN_STALL_S
) -> list[Stall]:
    """The stalls of at least ``min_s`` between consecutive ``batches`` (in start order), given
    every request's send time (module docstring). A request sent before a batch started may
    or may not be in it, so only those sent after it started count as waiting at its end:
    a stall can be missed this way, never invented."""
    ordered = sorted(sends)
    stalls = []
    for before, after in itertools.pairwise(batches):
        first = bisect.bisect_right(ordered, before.start)
        if first >= len(ordered) or ordered[first] >= after.start:
            continue  # nothing sent while `before` ran or in the gap: the instance was idle
        ready = max(before.end, ordered[first] + GRACE_S)
        if after.start - ready >= min_s:
            last = bisect.bisect_left(ordered, after.start) - 1  # the last send before its end
            woken = ordered[last] > max(ready, after.start - WAKE_S)
            stalls.append(Stall(ready, after.start, ordered[first], woken))
    return stalls


def read_batches(path: Path) -> list[Batch]:
    """The model's batch log (``<start> <end> <rows> [<id>,...]`` a line), in start order."""
    if not path.exists():
        return []
    batches = []
    for line in path.read_text().splitlines():
        start, end, rows, *ids = line.split()
        batches.append(
            Batch(float(start), float(end), int(rows), tuple(ids[0].split(",")) if ids else ())
        )
    return sorted(batches, key=lambda b: b.start)


def attach_batch_log(repo: Path, model: str, log: Path) -> None:
    """Make ``model`` in ``repo`` log its batches to ``log`` (replacing any earlier path)."""
    config = repo / model / "config.pbtxt"
    text = re.sub(r'\nparameters \{ key: "batch_log"[^\n]*', "", config.read_text())
    param = f'parameters {{ key: "batch_log" value: {{ string_value: "{log}" }} }}'
    config.write_text(text.rstrip() + "\n" + param + "\n")


def configure(repo: Path, variant: str, log: Path) -> None:
    """Point the model's batch log at ``log``; for ``no-priority`` drop its priority levels
    and queue policy too."""
    attach_batch_log(repo, "llm", log)
    config = repo / "llm" / "config.pbtxt"
    text = config.read_text()
    if variant == "no-priority":
        text = re.sub(r"\n\s*(priority_levels|default_priority_level): \d+", "", text)
        text = re.sub(r"\n\s*default_queue_policy \{[^}]*\}", "", text)
    if variant == "two-instances":
        text, found = re.subn(
            r"instance_group \[ \{ kind: KIND_CPU, count: 1 \} \]",
            "instance_group [ { kind: KIND_CPU, count: 2,"
            ' rate_limiter { resources [ { name: "DEVICE", count: 1 } ] } } ]',
            text,
        )
        if found != 1:
            raise ValueError(f"{config}: expected one single-instance instance_group line")
    config.write_text(text)


async def _send_all(
    triton: TritonProcess, schedule: Sequence[Any], priorities: bool, nudged: bool
) -> tuple[list[float], dict[str, float]]:
    """Send every request at its time; the send times of those answered 200, and the
    nudger's answers by outcome (when ``nudged``)."""
    url = triton.http_url
    sent: list[float] = []
    waiting = [0]
    timeout = aiohttp.ClientTimeout(total=120)
    metrics = Metrics(CollectorRegistry())
    endpoint = TritonEndpoint("triton-0", url, triton.metrics_url)
    nudger = TritonNudger(
        [endpoint], metrics, busy=lambda: [("triton-0", "llm")] if waiting[0] else []
    )
    nudging = asyncio.create_task(nudger.run()) if nudged else None
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(request: Any, at: float) -> None:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            body = MODELS["llm"].body(
                request.prompt_tokens,
                request.output_tokens,
                CLASS_PRIORITY[request.klass] if priorities else None,
            )
            started = time.monotonic()
            waiting[0] += 1
            try:
                async with session.post(
                    f"{url}/v2/models/llm/infer", data=body, timeout=timeout
                ) as response:
                    await response.read()
                    if response.status == 200:
                        sent.append(started)
            finally:
                waiting[0] -= 1
                nudger.ended("llm")  # as the sidecar is told of a request's end

        begin = time.monotonic() + 0.2
        await asyncio.gather(*(one(r, begin + r.t) for r in schedule))
    if nudging is not None:
        nudging.cancel()
        await asyncio.gather(nudging, return_exceptions=True)
    outcomes = {
        s.labels["outcome"]: s.value
        for m in metrics.registry.collect()
        if m.name == "qos_triton_nudges"
        for s in m.samples
        if s.name.endswith("_total")
    }
    return sent, outcomes


def run_once(args: argparse.Namespace, variant: str, seed: int, work: Path) -> dict[str, Any]:
    """One seed of one configuration, on a Triton of its own."""
    config = WorkloadConfig()
    prompt, output = sample_sizes(config, 4000, seed=5)
    speed = args.target_throughput / MODELS["llm"].saturated_throughput(prompt, output, 1.0)
    run_dir = work / f"{variant}-{seed}"
    repo = make_model_repo(MODELS["llm"], run_dir / "models", speed)
    log = run_dir / "batches.log"
    configure(repo, variant, log)
    schedule = generate(config, args.rate, args.duration, Arrival("gamma", cv=args.cv), seed)
    extra = RATE_LIMITED if variant == "two-instances" else []
    with TritonProcess(repo, run_dir / "triton", extra_args=extra) as triton:
        sends, nudges = asyncio.run(
            _send_all(triton, schedule, variant != "no-priority", variant == "nudged")
        )
    batches = read_batches(log)
    stalls = find_stalls(batches, sends)
    span = (batches[-1].end - batches[0].start) if batches else 0.0
    return {
        "variant": variant,
        "seed": seed,
        "requests": len(schedule),
        "answered": len(sends),
        "rows_run": sum(b.rows for b in batches),
        "overlapping": sum(a.end > b.start + 1e-3 for a, b in itertools.pairwise(batches)),
        "batches": len(batches),
        "stalls": len(stalls),
        "stalled_s": round(sum(s.seconds for s in stalls), 3),
        "longest_ms": round(max((s.seconds for s in stalls), default=0.0) * 1000, 1),
        "woken_by_send": sum(s.woken_by_send for s in stalls),
        "span_s": round(span, 3),
        "stalled_share": round(sum(s.seconds for s in stalls) / span, 4) if span else 0.0,
        "nudges": nudges,
        "stall_list": [asdict(s) for s in stalls],
    }


def summary(runs: list[dict[str, Any]]) -> list[str]:
    """The markdown table: per configuration, the mean and range over seeds."""
    lines = [
        "| configuration | seeds | stalls of 20 ms or more a minute | longest stall ms | "
        "share of the time stalled | ended by a request sent |",
        "|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        if not mine:
            continue
        per_min = [r["stalls"] * 60.0 / r["span_s"] if r["span_s"] else 0.0 for r in mine]
        longest = [r["longest_ms"] for r in mine]
        share = [r["stalled_share"] * 100 for r in mine]
        stalls = sum(r["stalls"] for r in mine)
        woken = sum(r["woken_by_send"] for r in mine)
        lines.append(
            f"| {variant} | {len(mine)} | {statistics.mean(per_min):.1f} "
            f"({min(per_min):.1f}-{max(per_min):.1f}) | {max(longest):.0f} | "
            f"{statistics.mean(share):.2f}% ({min(share):.2f}-{max(share):.2f}%) | "
            f"{woken} of {stalls} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=6, help="runs of each configuration")
    parser.add_argument("--duration", type=float, default=12.0, help="seconds of traffic a run")
    parser.add_argument("--rate", type=float, default=30.0, help="mean requests/s")
    parser.add_argument("--cv", type=float, default=4.0, help="of the gaps between arrivals")
    parser.add_argument(
        "--target-throughput",
        type=float,
        default=100.0,
        help="the model's speed as the QoS benchmark sets it: saturated req/s",
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="configurations to run, comma-separated"
    )
    parser.add_argument("--out", type=Path, default=Path("results"), help="results folder")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if not set(variants) <= set(VARIANTS):
        parser.error(f"--variants: known {', '.join(VARIANTS)}")
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    out = args.out / f"{stamp}-triton-stalls"
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="triton-stalls-") as tmp:
        for seed in range(1, args.seeds + 1):
            for variant in variants:  # in alternation: the host's speed drifts
                run = run_once(args, variant, seed, Path(tmp))
                print(
                    f"{variant} seed {seed}: {run['batches']} batches, {run['answered']} of "
                    f"{run['requests']} answered, {run['stalls']} stalls, longest "
                    f"{run['longest_ms']} ms"
                    + (f", nudges {run['nudges']}" if run["nudges"] else ""),
                    flush=True,
                )
                runs.append(run)
    table = summary(runs)
    command = "python -m benchmarks.triton_stalls " + " ".join(argv or sys.argv[1:])
    (out / "results.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                  "runs": runs}, indent=1))  # fmt: skip
    (out / "report.md").write_text(
        f"# Triton stalls ({stamp})\n\n`{command.strip()}`, {args.rate:g} req/s, gamma cv "
        f"{args.cv:g}, {args.duration:g} s a run.\n\n" + "\n".join(table) + "\n"
    )
    print("\n".join(table))
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
