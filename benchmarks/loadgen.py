"""Open-loop load generator on asyncio (uvloop when installed) and one aiohttp session.

The whole schedule is built before the run (URL, headers and body of every request), then
each request is fired at its time as its own task; the generator never waits for responses
before sending the next one. For every request it records tenant, class, scheduled and
actual send time, status, time to first byte (response headers; equal to the latency when the
response is not streamed), completion time, ``Retry-After`` and ``x-qos-reason``. A request of
a streamed class (``GenOptions.stream_classes``, on a model that streams: ``llm_ifb``) goes to
``generate_stream`` and reads the server-sent events as they come: its time to first byte is
then its time to first token (the first event), and it also records its time per output token,
``(latency - ttft) / (tokens - 1)`` over the tokens its events carried (as vLLM's benchmark
defines it). A stream that ends in an error event keeps its status and gets the error
``stream_error``: it failed, whenever it ended.

A request that gets no answer within its class's deadline times ``patience`` is abandoned
(status 0, error ``timeout``): it has missed its deadline anyway, and waiting longer would
only stretch the run.

Python's cyclic garbage collector is off while requests are timed (`collector_paused`). The
generator runs in the benchmark's own process, which keeps every earlier point's records for
the report: a full collection there walked 100,000-170,000 objects and stopped the loop for
30-110 ms (2026-12-07, a quick run at 3x), sending nothing and reading no answer meanwhile.
Against a 225 ms deadline that is a miss the generator made, and it fell mostly on the rows
that run last. A run's garbage is collected when it ends.

``python -m benchmarks.loadgen --selftest`` measures how many requests per second the
generator itself can drive (against an Envoy that answers every request directly).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from benchmarks.models import ModelKind, silo_name
from benchmarks.workload import ClassSpec, Request, TenantSpec


@dataclass(frozen=True, slots=True)
class GenOptions:
    """How a system under test wants to be called."""

    priority_in_body: bool = False  # KServe v2 ``parameters.priority`` from the class
    siloed: bool = False  # send each class to its own model ``<model>_<class>``
    identity_headers: bool = True  # x-api-key and x-qos-class
    # Classes whose clients honour Retry-After, as batch jobs do: a 429 or 503 whose
    # Retry-After lands inside the request's deadline is sent again then (the same request:
    # its latency counts from the first send).
    retry_after_classes: tuple[str, ...] = ()
    # Classes whose requests are streamed (generate_stream), where the model can stream.
    stream_classes: tuple[str, ...] = ()


@dataclass(slots=True)
class Record:
    tenant: str
    klass: str
    scheduled: float  # s from the start of the run
    sent: float  # s from the start of the run, when the request was handed to aiohttp
    status: int  # HTTP status; 0 when no answer came (timeout, connection error)
    ttfb: float | None  # s from sent to the response headers (streamed: to the first event)
    latency: float | None  # s from sent to the end of the response body
    retry_after: float | None
    reason: str
    error: str
    prompt_tokens: int = 0
    output_tokens: int = 0
    tpot: float | None = None  # streamed: s per output token after the first
    trace: str = ""  # a refusal's decision steps, " | "-joined (QOS_EXPLAIN_REFUSALS)
    request_id: str = ""  # the body's KServe v2 id, where it has one (`prepare`)


@dataclass(frozen=True, slots=True)
class Prepared:
    request: Request
    path: str
    headers: Mapping[str, str]
    body: bytes
    stream: bool = False
    request_id: str = ""


def prepare(
    schedule: Sequence[Request],
    model: ModelKind,
    tenants: Sequence[TenantSpec],
    classes: Mapping[str, ClassSpec],
    options: GenOptions,
    timeouts: Mapping[str, float] | None = None,
) -> list[Prepared]:
    """Each request as it is sent. With ``timeouts`` (per class, seconds), a client that sends
    identity headers also states how long it waits, in x-qos-timeout-ms, as a client with a
    deadline does (sidecar/core/client_wait.py; gRPC clients send grpc-timeout)."""
    keys = {t.name: t.api_key for t in tenants}
    waits = {k: str(round(v * 1000)) for k, v in (timeouts or {}).items()}
    # Each request's id, unique across the runs that share a batch log (device_log.py).
    run = secrets.token_hex(4)
    out = []
    for i, r in enumerate(schedule):
        name = silo_name(model.name, r.klass) if options.siloed else model.name
        headers = {"content-type": "application/json"}
        if options.identity_headers:
            headers["x-api-key"] = keys[r.tenant]
            headers["x-qos-class"] = r.klass
            if r.klass in waits:
                headers["x-qos-timeout-ms"] = waits[r.klass]
        priority = classes[r.klass].priority if options.priority_in_body else None
        stream = model.streams and r.klass in options.stream_classes
        # The generate extension (llm_ifb) takes no id; only llm logs its batches.
        request_id = f"{run}-{i}" if model.endpoint == "infer" else ""
        body = model.body(
            r.prompt_tokens, r.output_tokens, priority, stream=stream, request_id=request_id
        )
        endpoint = "generate_stream" if stream else model.endpoint
        path = f"/v2/models/{name}/{endpoint}"
        out.append(Prepared(r, path, headers, body, stream, request_id))
    return out


async def _read_stream(resp: aiohttp.ClientResponse, rec: Record, sent: float) -> None:
    """Read a generate_stream response's events: the first sets the record's time to first
    token, their ``OUT_TOKENS`` its time per output token."""
    loop = asyncio.get_running_loop()
    tokens = 0
    async for line in resp.content:
        if not line.startswith(b"data:"):
            continue
        if tokens == 0:
            rec.ttfb = loop.time() - sent
        try:
            event = json.loads(line[5:])
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("OUT_TOKENS"), int):
            tokens += event["OUT_TOKENS"]
        elif isinstance(event, dict) and "error" in event:
            rec.error = "stream_error"
    rec.latency = loop.time() - sent
    if tokens > 1 and rec.ttfb is not None:
        rec.tpot = (rec.latency - rec.ttfb) / (tokens - 1)


@dataclass
class RunResult:
    records: list[Record]
    lag_p50_ms: float
    lag_p99_ms: float
    lag_max_ms: float
    wall_s: float
    start_monotonic: float = 0.0  # time.monotonic() at the schedule's t = 0

    @property
    def achieved_rate(self) -> float:
        return len(self.records) / self.wall_s if self.wall_s > 0 else 0.0


def _trace_of(body: bytes) -> str:
    """A refusal's decision steps (the sidecar's `trace`, with QOS_EXPLAIN_REFUSALS)."""
    try:
        steps = json.loads(body).get("trace")
    except (ValueError, AttributeError):
        return ""
    return " | ".join(str(step) for step in steps) if isinstance(steps, list) else ""


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        return None


async def _drive(
    base_url: str,
    prepared: Sequence[Prepared],
    timeouts: Mapping[str, float],
    on_progress: Callable[[int], None] | None,
    retry_classes: Collection[str] = (),
) -> RunResult:
    loop = asyncio.get_running_loop()
    client_timeouts = {k: aiohttp.ClientTimeout(total=v) for k, v in timeouts.items()}
    records: list[Record] = []
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, enable_cleanup_closed=True)
    async with aiohttp.ClientSession(
        base_url=base_url, connector=connector, skip_auto_headers=("User-Agent",)
    ) as session:
        start = loop.time() + 0.05
        wall0 = time.monotonic()

        async def send(p: Prepared) -> None:
            r = p.request
            sent = loop.time()
            rec = Record(
                r.tenant,
                r.klass,
                r.t,
                sent - start,
                0,
                None,
                None,
                None,
                "",
                "",
                r.prompt_tokens,
                r.output_tokens,
                request_id=p.request_id,
            )
            records.append(rec)
            budget = timeouts[r.klass]
            timeout = client_timeouts[r.klass]
            headers = p.headers
            try:
                while True:
                    async with session.post(
                        p.path, data=p.body, headers=headers, timeout=timeout
                    ) as resp:
                        if p.stream and resp.status == 200:
                            await _read_stream(resp, rec, sent)
                        else:
                            rec.ttfb = loop.time() - sent
                            answer = await resp.read()
                            rec.latency = loop.time() - sent
                            if resp.status != 200 and b'"trace"' in answer:
                                rec.trace = _trace_of(answer)
                        rec.status = resp.status
                        rec.retry_after = _retry_after(resp.headers.get("retry-after"))
                        rec.reason = resp.headers.get("x-qos-reason", "")
                    wait = rec.retry_after
                    if r.klass not in retry_classes or rec.status not in (429, 503) or not wait:
                        break
                    left = budget - (loop.time() - sent) - wait
                    if left <= 0:  # it would come back too late: the refusal stands
                        break
                    await asyncio.sleep(wait)
                    timeout = aiohttp.ClientTimeout(total=left)
                    if "x-qos-timeout-ms" in headers:  # it states what is left of its wait
                        headers = {**headers, "x-qos-timeout-ms": str(round(left * 1000))}
            except TimeoutError:
                rec.error = "timeout"
            except aiohttp.ClientError as exc:
                rec.error = type(exc).__name__
            except asyncio.CancelledError:
                rec.error = "cancelled"
                raise

        tasks: set[asyncio.Task[None]] = set()
        for i, p in enumerate(prepared):
            delay = start + p.request.t - loop.time()
            if delay > 0.0005:
                await asyncio.sleep(delay)
            task = loop.create_task(send(p))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            if on_progress is not None and i % 1000 == 0:
                on_progress(i)
        if tasks:
            await asyncio.wait(tasks)
        wall = time.monotonic() - wall0
    lags = np.asarray([(rec.sent - rec.scheduled) * 1000.0 for rec in records]) if records else None
    records.sort(key=lambda rec: rec.scheduled)
    return RunResult(
        records=records,
        lag_p50_ms=float(np.percentile(lags, 50)) if lags is not None else 0.0,
        lag_p99_ms=float(np.percentile(lags, 99)) if lags is not None else 0.0,
        lag_max_ms=float(lags.max()) if lags is not None else 0.0,
        wall_s=wall,
        start_monotonic=wall0 + 0.05,
    )


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a sidecar dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


_paused_runs = 0  # runs timing requests now, in any thread (the fleet runs one per replica)
_paused_lock = threading.Lock()
_reenable = False  # whether the collector was on when the first of them began


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off from the first run's start to the last run's end
    (runs may overlap in threads, and the collector is the process's); what was garbage
    before is collected first, and what the runs left once the last ends. A collector that
    was already off stays off."""
    global _paused_runs, _reenable
    with _paused_lock:
        if _paused_runs == 0:
            _reenable = gc.isenabled()
            gc.disable()
            gc.collect()
        _paused_runs += 1
    try:
        yield
    finally:
        with _paused_lock:
            _paused_runs -= 1
            if _paused_runs == 0:
                gc.collect()
                if _reenable:
                    gc.enable()


def run(
    base_url: str,
    prepared: Sequence[Prepared],
    timeouts: Mapping[str, float],
    on_progress: Callable[[int], None] | None = None,
    retry_classes: Collection[str] = (),
) -> RunResult:
    """Fire ``prepared`` at ``base_url`` at their scheduled times; return every record once
    each request has its answer or has timed out (``timeouts`` per class, seconds).
    ``retry_classes``: see ``GenOptions.retry_after_classes``."""
    loop = _new_loop()
    try:
        with collector_paused():
            return loop.run_until_complete(
                _drive(base_url, prepared, timeouts, on_progress, retry_classes)
            )
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


# -- self test: how fast can the generator itself go? ------------------------------------------


def _direct_response_bootstrap(port: int) -> dict[str, Any]:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters."
                                        "network.http_connection_manager.v3."
                                        "HttpConnectionManager",
                                        "stat_prefix": "selftest",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "direct_response": {
                                                                "status": 200,
                                                                "body": {"inline_string": "{}"},
                                                            },
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy."
                                                    "extensions.filters.http.router.v3.Router"
                                                },
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ]
        },
    }


def selftest(rate: float, duration_s: float) -> RunResult:
    from benchmarks.models import MODELS
    from benchmarks.workload import WorkloadConfig, generate
    from devstack.envoy import EnvoyProcess
    from devstack.procs import free_port

    config = WorkloadConfig()
    schedule = generate(config, rate, duration_s, seed=3)
    prepared = prepare(schedule, MODELS["llm"], config.tenants, config.classes, GenOptions())
    with tempfile.TemporaryDirectory(prefix="qos-loadgen-") as tmp:
        port = free_port()
        with EnvoyProcess(_direct_response_bootstrap(port), Path(tmp)):
            return run(f"http://127.0.0.1:{port}", prepared, {c: 5.0 for c in config.classes})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__)
    parser.add_argument("--selftest", action="store_true", required=True)
    parser.add_argument("--rate", type=float, default=2000.0)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args(argv)
    result = selftest(args.rate, args.duration)
    ok = sum(1 for r in result.records if r.status == 200)
    print(
        f"offered {args.rate:.0f} req/s for {args.duration:.0f}s: sent {len(result.records)},"
        f" {ok} answered 200, send lag p50 {result.lag_p50_ms:.2f} ms"
        f" p99 {result.lag_p99_ms:.2f} ms max {result.lag_max_ms:.1f} ms,"
        f" wall {result.wall_s:.2f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
