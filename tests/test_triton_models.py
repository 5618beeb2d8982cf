"""The simulated models of examples/triton on a real Triton: ``llm`` (batched, priority levels)
and ``llm_stream`` (its decoupled, token-streaming twin).

The timing checks compare against the cost model read from each model's config.pbtxt, with
generous bounds: they check that the cost model is implemented (batching pays, priority
overtakes, tokens stream), not how fast this machine is. Waiting for server state (queue depth)
is done by polling the metrics endpoint, never by sleeping a fixed time.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sidecar.testing.procs import TritonProcess

ROOT = Path(__file__).resolve().parents[1]
MODEL_REPO = ROOT / "examples" / "triton"

pytestmark = pytest.mark.stack


# -- the cost model, read from config.pbtxt ------------------------------------------------------


def model_parameters(model: str) -> dict[str, float]:
    text = (MODEL_REPO / model / "config.pbtxt").read_text()
    found = re.findall(
        r'parameters\s*\{\s*key:\s*"(\w+)"\s*value:\s*\{\s*string_value:\s*"([^"]*)"', text
    )
    return {key: float(value) for key, value in found}


def predicted_ms(model: str, prompts: list[int], outputs: list[int]) -> float:
    """batch_ms of the README for one batch with these rows."""
    p = model_parameters(model)
    prefill = p["prefill_base_ms"] + p["prefill_per_token_ms"] * sum(prompts)
    step = p["decode_step_ms"] * (1 + p["decode_batch_slowdown"] * (len(outputs) - 1))
    return (prefill + max(outputs) * step) / p["speed"]


# -- HTTP helpers ----------------------------------------------------------------------------------


@dataclass
class Result:
    status: int
    body: Any
    sent_at: float
    done_at: float

    @property
    def elapsed_ms(self) -> float:
        return (self.done_at - self.sent_at) * 1000.0

    def output(self, name: str) -> list[Any]:
        (tensor,) = (o for o in self.body["outputs"] if o["name"] == name)
        data: list[Any] = tensor["data"]
        return data


def infer_body(
    prompt: int | list[int], output: int | list[int], priority: int | None = None
) -> dict[str, Any]:
    prompts = prompt if isinstance(prompt, list) else [prompt]
    outputs = output if isinstance(output, list) else [output]
    body: dict[str, Any] = {
        "inputs": [
            {
                "name": "PROMPT_TOKENS",
                "shape": [len(prompts), 1],
                "datatype": "INT32",
                "data": prompts,
            },
            {
                "name": "OUTPUT_TOKENS",
                "shape": [len(outputs), 1],
                "datatype": "INT32",
                "data": outputs,
            },
        ]
    }
    if priority is not None:
        body["parameters"] = {"priority": priority}
    return body


def post(
    port: int,
    path: str,
    body: dict[str, Any],
    *,
    on_sent: Callable[[], None] | None = None,
) -> Result:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        sent_at = time.monotonic()
        conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
        if on_sent is not None:
            on_sent()
        response = conn.getresponse()
        raw = response.read()
        return Result(response.status, json.loads(raw), sent_at, time.monotonic())
    finally:
        conn.close()


def infer(port: int, body: dict[str, Any], **kwargs: Any) -> Result:
    return post(port, "/v2/models/llm/infer", body, **kwargs)


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def pending(triton: TritonProcess, model: str) -> int:
    """Requests waiting in the model's queue (not executing)."""
    _, body = get(triton.metrics_port, "/metrics")
    match = re.search(
        rf'^nv_inference_pending_request_count\{{model="{model}",version="1"\}} (\d+)',
        body.decode(),
        re.MULTILINE,
    )
    assert match, "no pending-request gauge for the model"
    return int(match.group(1))


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


FULL_BATCH = 16  # max_batch_size of both models


def occupy(
    triton: TritonProcess, model: str, start: Callable[[], Future[Any]]
) -> tuple[Future[Any], Future[Any]]:
    """Make the model's single instance busy and leave one request queued, so that whatever is
    sent next queues behind it (and behind nothing else).

    ``start`` sends one request of FULL_BATCH rows (a batch on its own). Two are sent; once the
    queue holds exactly one request, one of them runs and the other waits. Returns both; the
    test must check (``still_busy``) that they had not both finished when its queue was set up.
    """
    first = start()
    second = start()
    wait_for(lambda: pending(triton, model) == 1, f"{model} busy with one request queued")
    return first, second


def queued_behind(
    triton: TritonProcess, model: str, blockers: tuple[Future[Any], Future[Any]], count: int
) -> Callable[[], bool]:
    """A condition: ``count`` requests wait behind the blockers of ``occupy``."""

    def condition() -> bool:
        # Both unfinished: one runs, one waits. One finished: the other runs.
        waiting_blockers = max(0, sum(not b.done() for b in blockers) - 1)
        return pending(triton, model) == count + waiting_blockers

    return condition


def still_busy(blockers: tuple[Future[Any], Future[Any]]) -> bool:
    return not all(b.done() for b in blockers)


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> TritonProcess:
    process = TritonProcess(MODEL_REPO, tmp_path_factory.mktemp("triton-models"))
    request.addfinalizer(process.stop)
    process.start()
    return process


# -- llm -------------------------------------------------------------------------------------------


def test_models_are_ready(triton: TritonProcess) -> None:
    for model in ("llm", "llm_stream"):
        status, body = get(triton.http_port, f"/v2/models/{model}/ready")
        assert status == 200, (model, body)


def test_lone_request_follows_the_cost_model(triton: TritonProcess) -> None:
    result = infer(triton.http_port, infer_body(500, 100, priority=1))
    assert result.status == 200, result.body
    assert result.output("OUT_TOKENS") == [100]
    predicted = predicted_ms("llm", [500], [100])
    (batch_ms,) = result.output("BATCH_MS")
    assert 0.8 * predicted <= batch_ms <= 3 * predicted, (batch_ms, predicted)
    assert result.elapsed_ms >= 0.8 * predicted


def test_token_counts_are_clipped(triton: TritonProcess) -> None:
    result = infer(triton.http_port, infer_body([0, 40000], [0, 3]))
    assert result.status == 200, result.body
    assert result.output("OUT_TOKENS") == [1, 3]
    # The prompt of the second row counts as 32768 tokens.
    predicted = predicted_ms("llm", [0, 32768], [1, 3])
    (batch_ms, _) = result.output("BATCH_MS")
    assert 0.8 * predicted <= batch_ms <= 3 * predicted, (batch_ms, predicted)


def test_invalid_request_fails_alone(triton: TritonProcess) -> None:
    """A negative count fails that request with 400; a request batched with it is served."""
    port = triton.http_port
    with ThreadPoolExecutor(max_workers=4) as pool:
        # The two requests queue behind full batches and then form one batch together.
        blockers = occupy(
            triton,
            "llm",
            lambda: pool.submit(infer, port, infer_body([1] * FULL_BATCH, [200] * FULL_BATCH)),
        )
        bad = pool.submit(infer, port, infer_body(-1, 10))
        good = pool.submit(infer, port, infer_body(10, 10))
        wait_for(queued_behind(triton, "llm", blockers, 2), "two queued requests")
        assert still_busy(blockers), "the blockers finished before the queue was set up"
        bad_result, good_result = bad.result(), good.result()
        assert all(b.result().status == 200 for b in blockers)
    assert bad_result.status == 400, bad_result.body
    assert "PROMPT_TOKENS" in bad_result.body["error"]
    assert good_result.status == 200, good_result.body
    assert good_result.output("OUT_TOKENS") == [10]

    missing = {"inputs": infer_body(10, 10)["inputs"][:1]}
    result = infer(port, missing)
    assert result.status == 400
    assert "OUTPUT_TOKENS" in result.body["error"]


def test_batching_raises_throughput(triton: TritonProcess) -> None:
    port = triton.http_port
    single = infer(port, infer_body(500, 100))
    assert single.status == 200, single.body

    barrier = threading.Barrier(8)

    def one() -> Result:
        barrier.wait()
        return infer(port, infer_body(500, 100))

    with ThreadPoolExecutor(max_workers=8) as pool:
        started = time.monotonic()
        results = [f.result() for f in [pool.submit(one) for _ in range(8)]]
        total_ms = (time.monotonic() - started) * 1000.0
    assert all(r.status == 200 for r in results), [r.body for r in results]
    assert total_ms < 0.6 * 8 * single.elapsed_ms, (total_ms, single.elapsed_ms)


def test_priority_one_overtakes_queued_priority_three(triton: TritonProcess) -> None:
    port = triton.http_port
    low_count = 40
    with ThreadPoolExecutor(max_workers=low_count + 4) as pool:
        # Batches of ~100-200 ms; the priority-3 requests queue first, then two priority-1 ones.
        blockers = occupy(
            triton,
            "llm",
            lambda: pool.submit(infer, port, infer_body([1] * FULL_BATCH, [500] * FULL_BATCH)),
        )
        low = [pool.submit(infer, port, infer_body(100, 100, priority=3)) for _ in range(low_count)]
        wait_for(queued_behind(triton, "llm", blockers, low_count), "the priority-3 queue")
        high = [pool.submit(infer, port, infer_body(100, 100, priority=1)) for _ in range(2)]
        wait_for(queued_behind(triton, "llm", blockers, low_count + 2), "the priority-1 requests")
        assert still_busy(blockers), "the blockers finished before the queue was set up"
        low_results = [f.result() for f in low]
        high_results = [f.result() for f in high]
        assert all(b.result().status == 200 for b in blockers)
    assert all(r.status == 200 for r in low_results + high_results)
    last_high = max(r.done_at for r in high_results)
    overtaken = sum(r.done_at > last_high for r in low_results)
    # In FCFS order the priority-1 requests would finish last. With priority they take the
    # next batch (with at most 14 priority-3 requests), so at least 26 of the 40 priority-3
    # requests, all queued before them, finish after them.
    assert overtaken >= 20, (overtaken, sorted(r.done_at - last_high for r in low_results))


# -- llm_stream ------------------------------------------------------------------------------------


def generate_stream(port: int, body: dict[str, Any]) -> tuple[int, list[tuple[float, Any]]]:
    """POST to generate_stream; return the status and every SSE event with its arrival time
    (seconds after the request was sent)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        sent_at = time.monotonic()
        conn.request(
            "POST",
            "/v2/models/llm_stream/generate_stream",
            json.dumps(body),
            {"content-type": "application/json"},
        )
        response = conn.getresponse()
        events: list[tuple[float, Any]] = []
        while line := response.readline():
            if line.startswith(b"data:"):
                events.append((time.monotonic() - sent_at, json.loads(line[5:])))
        return response.status, events
    finally:
        conn.close()


def test_stream_sends_tokens_as_they_are_generated(triton: TritonProcess) -> None:
    status, events = generate_stream(triton.http_port, {"PROMPT_TOKENS": 500, "OUTPUT_TOKENS": 100})
    assert status == 200, events
    chunk = int(model_parameters("llm_stream")["chunk_tokens"])
    assert len(events) == -(-100 // chunk)
    assert sum(event["OUT_TOKENS"] for _, event in events) == 100
    first_s, last_s = events[0][0], events[-1][0]
    predicted = predicted_ms("llm_stream", [500], [100]) / 1000.0
    assert last_s >= 0.8 * predicted, (last_s, predicted)
    assert first_s < 0.5 * last_s, (first_s, last_s)
    batch_ms = [event["BATCH_MS"] for _, event in events]
    assert batch_ms == sorted(batch_ms)


def test_stream_rejects_invalid_input(triton: TritonProcess) -> None:
    status, events = generate_stream(triton.http_port, {"PROMPT_TOKENS": 5, "OUTPUT_TOKENS": -3})
    assert status == 400
    assert len(events) == 1 and "OUTPUT_TOKENS" in events[0][1]["error"]


def test_stream_requests_share_a_batch(triton: TritonProcess) -> None:
    """Requests queued behind a running batch share the next one; a short one ends early."""
    port = triton.http_port
    full = {"PROMPT_TOKENS": [1] * FULL_BATCH, "OUTPUT_TOKENS": [100] * FULL_BATCH}
    with ThreadPoolExecutor(max_workers=4) as pool:
        blockers = occupy(triton, "llm_stream", lambda: pool.submit(generate_stream, port, full))
        short = pool.submit(generate_stream, port, {"PROMPT_TOKENS": 100, "OUTPUT_TOKENS": 20})
        long = pool.submit(generate_stream, port, {"PROMPT_TOKENS": 100, "OUTPUT_TOKENS": 200})
        wait_for(queued_behind(triton, "llm_stream", blockers, 2), "two queued streams")
        assert still_busy(blockers), "the blockers finished before the queue was set up"
        (_, short_events), (_, long_events) = short.result(), long.result()
        assert all(b.result()[0] == 200 for b in blockers)
    assert sum(e["OUT_TOKENS"] for _, e in short_events) == 20
    assert sum(e["OUT_TOKENS"] for _, e in long_events) == 200
    # Same batch: the first tokens came out of the same decode step (same batch clock).
    assert short_events[0][1]["BATCH_MS"] == pytest.approx(long_events[0][1]["BATCH_MS"], abs=5)
    # The short request ended long before the batch did.
    assert short_events[-1][1]["BATCH_MS"] < 0.5 * long_events[-1][1]["BATCH_MS"]
