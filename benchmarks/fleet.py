"""The fleet benchmark (issue 10 §5): four Envoy + sidecar replicas in front of one Triton
(the simulated fixed-cost model `simgpu`), on one Valkey and on a local Valkey Cluster (3
primaries, 3 replicas), with every scenario's traffic split unevenly over the replicas.

    python -m benchmarks.fleet --quick                  # at most 10 minutes on 2 cores
    python -m benchmarks.fleet --full                   # longer phases (120 s windows)
    python -m benchmarks.fleet --quick --scenarios rate,pod --split 70,10,10,10

Scenarios run in groups that share a fleet (one store and topology each):
single Valkey, gateway: rate, fairness, weights, outage; single Valkey, pod: pod; cluster, gateway:
rate-cluster, failover (last: it kills a primary). Results go to results/<stamp>-fleet/
(results.json, report.md, plots); the table is printed, then one `TARGET` line per target.
What each scenario measures, and how: benchmarks/README.md "Fleet benchmark".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import redis
from redis.cluster import ClusterNode, RedisCluster

from benchmarks import fleet_report
from benchmarks.fleet_failover import failover
from benchmarks.fleet_load import write_policy
from benchmarks.fleet_scenarios import (
    PHASES,
    Ctx,
    Outcome,
    fairness,
    outage,
    pod,
    rate,
    weights,
)
from benchmarks.fleet_stack import Fleet
from devstack.procs import LOCALHOST, ValkeyProcess
from devstack.stack import MODEL_REPO, ROOT
from devstack.triton import TritonProcess
from devstack.valkey_cluster import ValkeyCluster

# (scenario, group); groups in this order, scenarios in this order within a group.
SCENARIOS = (
    ("rate", "single"),
    ("fairness", "single"),
    ("weights", "single"),
    ("outage", "single"),
    ("pod", "pod"),
    ("rate-cluster", "cluster"),
    ("failover", "cluster"),
)
GROUPS = ("single", "pod", "cluster")


def log(message: str) -> None:
    print(f"[fleet {time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fleet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="60 s rate windows (default)")
    mode.add_argument("--full", action="store_true", help="120 s rate windows, longer phases")
    names = ",".join(name for name, _ in SCENARIOS)
    parser.add_argument("--scenarios", default=names, help=f"subset of {names}")
    parser.add_argument("--split", default="50,25,15,10", help="traffic share per replica")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every phase length")
    parser.add_argument("--outage-repeats", type=int, default=2)
    parser.add_argument("--redis-timeout-ms", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "results", help="results root")
    args = parser.parse_args(argv)
    known = {name for name, _ in SCENARIOS}
    args.scenario_list = [s for s in args.scenarios.split(",") if s]
    unknown = set(args.scenario_list) - known
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; known: {names}")
    args.split_list = [float(x) for x in args.split.split(",")]
    if len(args.split_list) != 4 or min(args.split_list) <= 0:
        parser.error("--split takes four positive shares, one per replica")
    return args


def simgpu_repo(target: Path) -> Path:
    """A model repository with only `simgpu` (Triton starts faster without the others)."""
    shutil.copytree(MODEL_REPO / "simgpu", target / "simgpu")
    return target


def cluster_client(cluster: ValkeyCluster) -> RedisCluster:
    nodes = [
        ClusterNode(LOCALHOST, n.port)  # type: ignore[no-untyped-call]
        for n in cluster.nodes
        if n.running
    ]
    return RedisCluster(startup_nodes=nodes, socket_timeout=2)


@contextlib.contextmanager
def group_store(
    group: str, work: Path, valkey: ValkeyProcess
) -> Iterator[tuple[str, dict[str, str], Any, ValkeyCluster | None]]:
    """(redis URL, sidecar env, store client, cluster) for a group's fleet."""
    if group != "cluster":
        single = redis.Redis.from_url(valkey.url)
        single.flushall()
        yield valkey.url, {}, single, None
        single.close()
        return
    with ValkeyCluster(work / "cluster") as cluster:
        client = cluster_client(cluster)
        yield cluster.seeds, {"QOS_REDIS_MODE": "cluster"}, client, cluster
        client.close()


def run_group(
    group: str, args: argparse.Namespace, work: Path, triton: TritonProcess, valkey: ValkeyProcess
) -> dict[str, Outcome]:
    wanted = [name for name, g in SCENARIOS if g == group and name in args.scenario_list]
    phases = {k: v * args.scale for k, v in PHASES["full" if args.full else "quick"].items()}
    results: dict[str, Outcome] = {}
    with group_store(group, work, valkey) as (url, env, client, cluster):
        log(f"starting four replicas ({group})")
        fleet = Fleet(
            work,
            write_policy(work / "policy"),
            triton_http_port=triton.http_port,
            sidecar_env={
                "QOS_TRITON_URLS": triton.http_url,
                "QOS_TRITON_METRICS_URLS": triton.metrics_url,
                "QOS_TRITON_SCRAPE_MS": "100",
                "QOS_REDIS_TIMEOUT_MS": str(args.redis_timeout_ms),
                **env,
            },
            redis_url=url,
            pod_ids=[f"pod-{i}" for i in range(4)] if group == "pod" else (),
        )
        with fleet:
            # Another seed on the cluster: its rate run is a second sample, not a replay.
            seed = args.seed + (100 if group == "cluster" else 0)
            ctx = Ctx(fleet, client, args.split_list, phases, seed, args.redis_timeout_ms,
                      valkey=valkey, cluster=cluster, label=group)  # fmt: skip
            for name in wanted:
                log(f"scenario {name}")
                results[name] = run_one(name, ctx, args)
                for target in results[name].targets:
                    log(target.line())
    return results


def run_one(name: str, ctx: Ctx, args: argparse.Namespace) -> Outcome:
    if name in ("rate", "rate-cluster"):
        return rate(ctx)
    if name == "fairness":
        return fairness(ctx)
    if name == "weights":
        return weights(ctx)
    if name == "outage":
        return outage(ctx, repeats=args.outage_repeats)
    if name == "pod":
        return pod(ctx)
    return failover(ctx)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    out = args.out / f"{stamp}-fleet"
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.fleet " + shlex.join(sys.argv[1:] if argv is None else argv)
    log(f"results in {out}")
    results: dict[str, Outcome] = {}
    with tempfile.TemporaryDirectory(prefix="qos-fleet-") as tmp_name:
        work = Path(tmp_name)
        repo = simgpu_repo(work / "models")
        with TritonProcess(repo, work) as triton, ValkeyProcess(work) as valkey:
            for group in GROUPS:
                if any(g == group and n in args.scenario_list for n, g in SCENARIOS):
                    results.update(run_group(group, args, work, triton, valkey))
    meta = {
        "command": command,
        "mode": "full" if args.full else "quick",
        "split": args.split_list,
        "scale": args.scale,
        "phases_s": {k: v * args.scale for k, v in PHASES[
            "full" if args.full else "quick"].items()},
        "redis_timeout_ms": args.redis_timeout_ms,
        "started": stamp,
        "wall_s": round(time.monotonic() - started, 1),
    }  # fmt: skip
    fleet_report.write(out, meta, results)
    return 0


if __name__ == "__main__":
    # SIGTERM must stop every process the benchmark started: exit through SystemExit so the
    # context managers that own them run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
