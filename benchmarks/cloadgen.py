"""The compiled HTTP/1.1 load generator (``benchmarks/loadgen_c/loadgen.c``), built on first use.

A Python sender costs about 0.3 ms of CPU per request and saturates at a few thousand
requests/s on 2 cores, so it cannot measure a decision that should cost less than that. The C
generator runs closed loop (maximum rate) or open loop at a fixed rate with latencies measured
from each request's scheduled send time (coordinated omission corrected, as wrk2 does); see
the C file's opening comment.

It is compiled with the system ``cc -O2`` into ``benchmarks/loadgen_c/build/`` (git-ignored),
again whenever the source is newer than the binary. No compiler: ``LoadgenBuildError`` says so.

``python -m benchmarks.cloadgen --selftest`` measures the generator's own maximum rate against
an Envoy that answers every request directly (``direct_response``, one worker). Envoy uses a
core of its own, so this is a lower bound: the generator alone goes faster still.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).parent / "loadgen_c" / "loadgen.c"
BINARY = Path(__file__).parent / "loadgen_c" / "build" / "loadgen"


class LoadgenBuildError(RuntimeError):
    """No C compiler, or the generator did not compile."""


def build() -> Path:
    """The generator's binary, compiled first when missing or older than its source."""
    if BINARY.exists() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return BINARY
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise LoadgenBuildError(
            "the overhead benchmark compiles its load generator (benchmarks/loadgen_c/loadgen.c)"
            " and found no C compiler: install one (e.g. apt-get install gcc) and retry"
        )
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [compiler, "-O2", "-o", str(BINARY), str(SOURCE)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise LoadgenBuildError(f"{compiler} failed on {SOURCE}:\n{done.stderr[-2000:]}")
    return BINARY


@dataclass(frozen=True, slots=True)
class Target:
    """Where and what to send: POST ``path`` with ``headers`` and ``body`` to 127.0.0.1:port."""

    port: int
    path: str
    headers: Mapping[str, str]
    body: bytes


def run(
    target: Target, *, duration_s: float, rate: float = 0.0, connections: int = 32
) -> dict[str, Any]:
    """One run: closed loop when ``rate`` is 0, else open loop at ``rate`` requests/s.
    Returns the generator's JSON (``completed``, ``errors``, ``achieved_rps``,
    ``latency_ms{p50,p90,p99,p999,max,mean}``, ``status{code: count}``, ``sent_late``)."""
    binary = build()
    with tempfile.NamedTemporaryFile(prefix="qos-loadgen-body-") as body:
        body.write(target.body)
        body.flush()
        command = [
            str(binary),
            "--port", str(target.port),
            "--path", target.path,
            "--connections", str(connections),
            "--duration", str(duration_s),
            "--rate", str(rate),
            "--body-file", body.name,
        ]  # fmt: skip
        for name, value in target.headers.items():
            command += ["--header", f"{name}: {value}"]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=duration_s + 30, check=False
        )
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def selftest(duration_s: float, connections: int) -> dict[str, Any]:
    """The generator's closed-loop rate against Envoy's ``direct_response`` behind the buffer
    filter (configuration A of the overhead benchmark: without the buffer filter Envoy answers
    before reading a POST's body and closes the connection)."""
    from benchmarks.overhead_stack import envoy_alone_bootstrap
    from devstack.envoy import EnvoyProcess
    from devstack.procs import free_port

    with tempfile.TemporaryDirectory(prefix="qos-cloadgen-") as tmp:
        port = free_port()
        with EnvoyProcess(envoy_alone_bootstrap(port), Path(tmp)):
            target = Target(port, "/v2/models/bench/infer", {"x-api-key": "k"}, b"{}")
            return run(target, duration_s=duration_s, connections=connections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cloadgen", description=__doc__)
    parser.add_argument("--selftest", action="store_true", required=True)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)
    result = selftest(args.duration, args.connections)
    print(json.dumps(result))
    print(
        f"loadgen selftest: {result['achieved_rps']:.0f} req/s closed loop,"
        f" {args.connections} connections, p50 {result['latency_ms']['p50']:.3f} ms,"
        f" errors {result['errors']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
