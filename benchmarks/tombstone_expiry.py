"""Does a burst of releases stall the store a lease TTL later? ``python -m
benchmarks.tombstone_expiry``.

A release leaves a tombstone of its lease id for a lease TTL (``sidecar/state/lua/release.lua``).
When each tombstone was a key of its own, a burst of releases made a burst of keys that Redis
expired together a lease TTL later, and its expiry cycle stalled every command meanwhile.
This runs configuration D of the overhead benchmark (``benchmarks/overhead_stack.py``): a burst
at the maximum rate (closed loop, ``--burst`` s), then the common rate (open loop) in two
windows of ``--window`` s: "calm", just after the burst, and "expiry", while the burst's
tombstones end. For each: the latency percentiles, Valkey's expiry-cycle stalls of 1 ms or
more (``LATENCY HISTORY expire-cycle``; the latency monitor keeps the longest of each second)
and the keys in the database. Results: ``results/<stamp>-tombstones/results.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from benchmarks import cloadgen
from benchmarks import overhead_stack as stack
from benchmarks.overhead import target_of
from devstack.procs import ValkeyProcess

REPO = Path(__file__).resolve().parent.parent


def window(
    client: redis.Redis, target: cloadgen.Target, rate: float, duration_s: float
) -> dict[str, Any]:
    """One open-loop window, with the expiry stalls Valkey saw during it."""
    client.latency_reset()
    result = cloadgen.run(target, duration_s=duration_s, rate=rate, connections=32)
    stalls = client.latency_history("expire-cycle")
    return {
        "completed": result["completed"],
        "latency_ms": result["latency_ms"],
        "expire_stalls": len(stalls),
        "expire_stall_max_ms": max((int(s[1]) for s in stalls), default=0),
        "keys": client.dbsize(),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    cloadgen.build()
    with tempfile.TemporaryDirectory(prefix="qos-tombstones-") as tmp:
        workdir = Path(tmp)
        with ValkeyProcess(workdir / "valkey") as valkey:
            client = redis.Redis.from_url(valkey.url)
            client.config_set("latency-monitor-threshold", 1)
            config = stack.BY_NAME["D"]
            with stack.start(config, workdir / "D", valkey.url, lease_ttl_s=args.ttl) as running:
                target = target_of(config, running)
                started = time.monotonic()
                burst = cloadgen.run(target, duration_s=args.burst, connections=32)
                after_burst = client.dbsize()
                calm = window(client, target, args.rate, args.window)
                # The burst's tombstones end between `ttl` and `ttl + burst` after its start.
                time.sleep(max(0.0, started + args.ttl - time.monotonic()))
                expiry = window(client, target, args.rate, args.window)
    return {
        "burst": {"completed": burst["completed"], "keys_after": after_burst},
        "calm": calm,
        "expiry": expiry,
    }


def line(name: str, w: dict[str, Any]) -> str:
    lat = w["latency_ms"]
    return (
        f"{name:>7}: p50 {lat['p50']:.2f} p99 {lat['p99']:.2f} p99.9 {lat['p999']:.2f}"
        f" max {lat['max']:.2f} ms; Valkey expiry stalls of 1 ms or more:"
        f" {w['expire_stalls']} (longest {w['expire_stall_max_ms']} ms); keys {w['keys']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ttl", type=float, default=30.0, help="the policy's lease_ttl_s")
    parser.add_argument("--burst", type=float, default=5.0, help="s at the maximum rate")
    parser.add_argument("--window", type=float, default=5.0, help="s per window")
    parser.add_argument("--rate", type=float, default=1000.0, help="req/s in the windows")
    parser.add_argument("--out", type=Path, default=REPO / "results")
    args = parser.parse_args(argv)
    results = run(args)
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    out = args.out / f"{stamp}-tombstones"
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.tombstone_expiry " + " ".join(sys.argv[1:])
    (out / "results.json").write_text(json.dumps({"command": command, **results}, indent=2))
    burst = results["burst"]
    print(f"burst: {burst['completed']} requests; {burst['keys_after']} keys after it")
    print(line("calm", results["calm"]))
    print(line("expiry", results["expiry"]))
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
