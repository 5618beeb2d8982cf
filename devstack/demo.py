"""The local demo: the whole stack on this machine, a short multi-tenant load, a report.

Starts Valkey, Triton (examples/triton, a simulated GPU and simulated LLMs), the sidecar and
Envoy with shipped bootstraps. First a few LLM requests through the ext_proc Envoy show token
accounting (each charged its prompt + max tokens, then made good with what it generated);
then open-loop Poisson traffic from several tenants through the ext_authz Envoy, and a report,
per tenant and class, of what was admitted and shed and how long it took.
Every process is stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from devstack.stack import ROOT, LocalStack

INFER_PATH = "/v2/models/simgpu/infer"


@dataclass(frozen=True)
class Stream:
    """One kind of traffic: who sends it, which class it asks for, how often."""

    label: str
    api_key: str | None
    klass: str | None
    rate_per_s: float
    delay_ms: float  # simulated GPU time this request asks for


# The demo tenants of policies/tenants.yaml; their API keys are `demo-key-<tenant>`.
STREAMS = (
    Stream("search", "demo-key-search", "interactive", 14.0, 8.0),
    Stream("search", "demo-key-search", "standard", 10.0, 8.0),  # together over its 20/s
    Stream("analytics", "demo-key-analytics", "batch", 4.0, 30.0),
    Stream("analytics", "demo-key-analytics", "interactive", 1.0, 8.0),  # not allowed: 403
    Stream("research", "demo-key-research", "batch", 6.0, 40.0),
    Stream("research", "demo-key-research", "opportunistic", 6.0, 40.0),
    Stream("(no key)", None, None, 3.0, 8.0),  # unknown callers: the anonymous tenant
)


@dataclass
class Result:
    stream: Stream
    status: int
    latency_s: float
    reason: str


def infer_body(delay_ms: float) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "DELAY_MS", "shape": [1, 1], "datatype": "FP32", "data": [delay_ms]}]}
    ).encode()


async def send(session: aiohttp.ClientSession, url: str, stream: Stream) -> Result:
    headers = {"content-type": "application/json"}
    if stream.api_key:
        headers["x-api-key"] = stream.api_key
    if stream.klass:
        headers["x-qos-class"] = stream.klass
    started = time.perf_counter()
    try:
        async with session.post(
            url + INFER_PATH, data=infer_body(stream.delay_ms), headers=headers
        ) as r:
            await r.read()
            return Result(
                stream, r.status, time.perf_counter() - started, r.headers.get("x-qos-reason", "")
            )
    except (TimeoutError, aiohttp.ClientError) as exc:
        return Result(stream, 0, time.perf_counter() - started, type(exc).__name__)


async def drive(url: str, duration_s: float, seed: int) -> list[Result]:
    """Open loop: each stream's arrivals are Poisson and never wait for responses."""
    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
    ) as session:
        tasks: list[asyncio.Task[Result]] = []

        async def arrivals(stream: Stream) -> None:
            end = time.perf_counter() + duration_s
            next_at = time.perf_counter()
            while True:
                next_at += rng.expovariate(stream.rate_per_s)
                if next_at >= end:
                    return
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                tasks.append(asyncio.create_task(send(session, url, stream)))

        await asyncio.gather(*(arrivals(s) for s in STREAMS))
        return list(await asyncio.gather(*tasks))


LLM_KEY = "demo-key-research"  # its `gpu-cost` bucket holds 2000 cost units (tenants.yaml)
LLM_REQUESTS = ((400, 800, 50), (400, 800, 50), (400, 800, 50))  # prompt, max, generated


def token_accounting(url: str, admin_url: str) -> str:
    """Three LLM requests through the ext_proc Envoy, and what the sidecar charged for them."""
    from prometheus_client.parser import text_string_to_metric_families

    lines = [
        "LLM token accounting (ext_proc; tenant research, bucket gpu-cost 2000 units,"
        " cost = prompt + max tokens, made good with the tokens generated):"
    ]
    for n, (prompt, max_tokens, eos) in enumerate(LLM_REQUESTS, 1):
        tensor = {"shape": [1, 1], "datatype": "INT32"}
        body = {
            "inputs": [
                {"name": "PROMPT_TOKENS", "data": [prompt], **tensor},
                {"name": "OUTPUT_TOKENS", "data": [max_tokens], **tensor},
            ],
            "parameters": {"eos_after_tokens": eos},
        }
        request = urllib.request.Request(
            url + "/v2/models/llm/infer",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json", "x-api-key": LLM_KEY},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                out = json.load(response)["outputs"]
                generated = next(o["data"][0] for o in out if o["name"] == "OUT_TOKENS")
                said = f"200, generated {generated} of {max_tokens} tokens"
        except urllib.error.HTTPError as exc:
            with exc:
                said = (
                    f"{exc.code} {exc.headers.get('x-qos-reason')}, Retry-After"
                    f" {exc.headers.get('retry-after')} s: its estimate no longer fits"
                )
        lines.append(f"  request {n}: {prompt} prompt + {max_tokens} max tokens -> {said}")
        time.sleep(0.3)  # the reconciliation follows the response by a moment
    with urllib.request.urlopen(admin_url + "/metrics") as response:
        text = response.read().decode()
    counts: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "qos_tokens_total" and sample.labels.get("tenant") == "research":
                counts[sample.labels["kind"]] += sample.value
            elif sample.name == "qos_token_accounting_total":
                counts[sample.labels["result"]] += sample.value
    lines.append(
        f"  sidecar: {counts['prompt']:.0f} prompt + {counts['max']:.0f} max tokens charged,"
        f" {counts['generated']:.0f} generated; {counts['reconciled']:.0f} reconciled"
        " (the difference refunded)"
    )
    return "\n".join(lines)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def report(results: list[Result]) -> str:
    groups: dict[tuple[str, str], list[Result]] = defaultdict(list)
    for r in results:
        groups[(r.stream.label, r.stream.klass or "(default)")].append(r)
    lines = [
        f"{'tenant':<11} {'asked class':<14} {'sent':>5} {'admitted':>8} {'429':>5} {'503':>5}"
        f" {'401/403':>7} {'p50 ms':>7} {'p95 ms':>7}  shed reasons",
        "-" * 100,
    ]
    for (tenant, klass), rs in groups.items():
        ok = [r.latency_s * 1000 for r in rs if r.status == 200]
        by_status = defaultdict(int, {code: 0 for code in (429, 503)})
        for r in rs:
            by_status[r.status] += 1
        reasons = sorted({r.reason for r in rs if r.status != 200 and r.reason})
        refused = by_status[401] + by_status[403]
        p50, p95 = percentile(ok, 0.5), percentile(ok, 0.95)
        lines.append(
            f"{tenant:<11} {klass:<14} {len(rs):>5} {len(ok):>8} {by_status[429]:>5}"
            f" {by_status[503]:>5} {refused:>7} {p50:>7.1f} {p95:>7.1f}  {', '.join(reasons)}"
        )
    return "\n".join(lines)


def decision_time_summary(metrics_text: str) -> str:
    """How long the sidecar took to decide, from its own histogram (bucket upper bounds)."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "qos_decision_duration_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    total = buckets.get(float("inf"), 0.0)
    if not total:
        return "sidecar decision time: no decisions recorded"

    def upper_bound(q: float) -> str:
        """The bucket that holds quantile `q`, and an estimate inside it interpolated as
        Prometheus's histogram_quantile does (the buckets go down to 50 microseconds)."""
        lower, below = 0.0, 0.0
        for bound in sorted(buckets):
            if buckets[bound] >= q * total:
                if bound == float("inf"):
                    return f"> {lower:g} s"
                inside = buckets[bound] - below
                share = (q * total - below) / inside if inside else 1.0
                estimate_ms = (lower + (bound - lower) * share) * 1000
                return f"~{estimate_ms:.3g} ms (<= {bound * 1000:g} ms)"
            lower, below = bound, buckets[bound]
        return "?"

    return (
        f"sidecar decision time (holds included) over {total:.0f} decisions:"
        f" p50 {upper_bound(0.5)}, p99 {upper_bound(0.99)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.demo", description=__doc__)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of load")
    parser.add_argument("--mode", choices=("http", "grpc"), default="http", help="ext_authz mode")
    parser.add_argument("--policy", type=Path, default=ROOT / "policies")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="qos-demo-") as tmp:
        print("starting Valkey, Triton (simulated GPU), qos-sidecar and Envoy ...", flush=True)
        with LocalStack(Path(tmp), args.policy, modes=(args.mode, "extproc")) as stack:
            assert stack.sidecar is not None
            url = stack.url(args.mode)
            print(
                f"Envoy on {url} (ext_authz {args.mode}) and {stack.url('extproc')} (ext_proc),"
                f" sidecar admin on {stack.sidecar.admin_url}"
            )
            print("\n" + token_accounting(stack.url("extproc"), stack.sidecar.admin_url) + "\n")
            print(
                f"sending {args.duration:.0f}s of open-loop traffic from 4 tenants ...", flush=True
            )
            results = asyncio.run(drive(url, args.duration, args.seed))
            print()
            print(report(results))
            with urllib.request.urlopen(stack.sidecar.admin_url + "/metrics") as response:
                print("\n" + decision_time_summary(response.read().decode()))
            with urllib.request.urlopen(stack.sidecar.admin_url + "/v1/policy") as response:
                policy = json.load(response)
            print(
                f"\npolicy version {policy['version']} from {len(policy['sources'])} files;"
                f" metrics at {stack.sidecar.admin_url}/metrics"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
