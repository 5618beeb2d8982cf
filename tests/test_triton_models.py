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
import queue
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from devstack.triton import TritonProcess

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
    prompt: int | list[int],
    output: int | list[int],
    priority: int | None = None,
    *,
    eos_after_tokens: object = None,
) -> dict[str, Any]:
    """A KServe v2 infer body; ``priority`` and ``eos_after_tokens`` go in its parameters."""
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
    parameters = {"priority": priority, "eos_after_tokens": eos_after_tokens}
    if any(value is not None for value in parameters.values()):
        body["parameters"] = {k: v for k, v in parameters.items() if v is not None}
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
    for model in ("llm", "llm_stream", "llm_ifb"):
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


def _llm_counter(triton: TritonProcess, name: str, model: str = "llm") -> int:
    _, body = get(triton.metrics_port, "/metrics")
    found = re.search(rf'^{name}\{{model="{model}",version="1"\}} (\d+)', body.decode(), re.M)
    assert found is not None, name
    return int(found.group(1))


def test_batching_runs_concurrent_requests_together(triton: TritonProcess) -> None:
    """Eight requests at once take fewer model executions than eight: they were batched
    (Triton's own counters, not a wall-clock ratio, which a loaded machine makes flaky)."""
    port = triton.http_port
    assert infer(port, infer_body(500, 100)).status == 200
    executions = _llm_counter(triton, "nv_inference_exec_count")
    served = _llm_counter(triton, "nv_inference_request_success")
    barrier = threading.Barrier(8)

    def one() -> Result:
        barrier.wait()
        return infer(port, infer_body(500, 100))

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = [f.result() for f in [pool.submit(one) for _ in range(8)]]
    assert all(r.status == 200 for r in results), [r.body for r in results]
    # The client can have its answer before Triton counts the request: wait for the count.
    wait_for(
        lambda: _llm_counter(triton, "nv_inference_request_success") >= served + 8,
        "Triton to count the eight requests",
    )
    assert _llm_counter(triton, "nv_inference_request_success") - served == 8
    assert _llm_counter(triton, "nv_inference_exec_count") - executions < 8


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


# -- llm: eos_after_tokens (a request that stops before its limit) --------------------------------


def test_eos_after_tokens_stops_generation_early(triton: TritonProcess) -> None:
    port = triton.http_port
    result = infer(port, infer_body(500, 500, eos_after_tokens=20))
    assert result.status == 200, result.body
    assert result.output("OUT_TOKENS") == [20]
    predicted = predicted_ms("llm", [500], [20])
    (batch_ms,) = result.output("BATCH_MS")
    assert 0.8 * predicted <= batch_ms <= 3 * predicted, (batch_ms, predicted)
    # The time of 20 decode steps, not of the 500 the limit allows: the batch's own measured
    # time, not the client's, which the shared machine's load would blur.
    assert batch_ms < 0.5 * predicted_ms("llm", [500], [500]), batch_ms

    # The generate extension passes its "parameters" object to the model too.
    body = {"PROMPT_TOKENS": 500, "OUTPUT_TOKENS": 500, "parameters": {"eos_after_tokens": 20}}
    generated = post(port, "/v2/models/llm/generate", body)
    assert generated.status == 200, generated.body
    assert generated.body["OUT_TOKENS"] == 20


@pytest.mark.parametrize(
    ("outputs", "eos_after_tokens", "generated"),
    [
        ([500, 10], 20, [20, 10]),  # every row; a row with a lower limit stops at its limit
        ([30], 100, [30]),  # a stop point beyond the limit changes nothing
        ([100], 0, [1]),  # clipped to >= 1, as OUTPUT_TOKENS is
    ],
)
def test_eos_after_tokens_applies_to_every_row(
    triton: TritonProcess, outputs: list[int], eos_after_tokens: int, generated: list[int]
) -> None:
    prompts = [10] * len(outputs)
    body = infer_body(prompts, outputs, eos_after_tokens=eos_after_tokens)
    result = infer(triton.http_port, body)
    assert result.status == 200, result.body
    assert result.output("OUT_TOKENS") == generated
    predicted = predicted_ms("llm", prompts, generated)
    batch_ms = result.output("BATCH_MS")[0]
    assert 0.8 * predicted <= batch_ms <= 3 * predicted, (batch_ms, predicted)


@pytest.mark.parametrize("value", [-1, 2.5, "7", True])
def test_invalid_eos_after_tokens_is_rejected(triton: TritonProcess, value: object) -> None:
    result = infer(triton.http_port, infer_body(10, 10, eos_after_tokens=value))
    assert result.status == 400, result.body
    assert "eos_after_tokens" in result.body["error"], result.body


def test_batch_runs_until_its_longest_generated_sequence(triton: TritonProcess) -> None:
    """A request stopped early does not hold its batch to its limit; one with an invalid
    eos_after_tokens fails alone, and none of them splits the batch."""
    port = triton.http_port
    with ThreadPoolExecutor(max_workers=5) as pool:
        # The three requests queue behind full batches and then form one batch together.
        blockers = occupy(
            triton,
            "llm",
            lambda: pool.submit(infer, port, infer_body([1] * FULL_BATCH, [200] * FULL_BATCH)),
        )
        bad = pool.submit(infer, port, infer_body(10, 500, eos_after_tokens=-1))
        stopped = pool.submit(infer, port, infer_body(10, 500, eos_after_tokens=20))
        plain = pool.submit(infer, port, infer_body(10, 50))
        wait_for(queued_behind(triton, "llm", blockers, 3), "three queued requests")
        assert still_busy(blockers), "the blockers finished before the queue was set up"
        bad_result, stopped_result, plain_result = bad.result(), stopped.result(), plain.result()
        assert all(b.result().status == 200 for b in blockers)
    assert bad_result.status == 400, bad_result.body
    assert "eos_after_tokens" in bad_result.body["error"]
    assert stopped_result.status == 200, stopped_result.body
    assert plain_result.status == 200, plain_result.body
    assert stopped_result.output("OUT_TOKENS") == [20]
    assert plain_result.output("OUT_TOKENS") == [50]
    # One batch: both report the same measured batch time.
    (batch_ms,) = plain_result.output("BATCH_MS")
    assert stopped_result.output("BATCH_MS") == [batch_ms]
    # The batch ran 50 decode steps (its longest generated sequence), not 500.
    predicted = predicted_ms("llm", [10, 10], [20, 50])
    assert 0.8 * predicted <= batch_ms <= 3 * predicted, (batch_ms, predicted)
    assert batch_ms < 0.5 * predicted_ms("llm", [10, 10], [500, 50]), batch_ms


# -- llm_stream ------------------------------------------------------------------------------------


def generate_stream(
    port: int, body: dict[str, Any], model: str = "llm_stream"
) -> tuple[int, list[tuple[float, Any]]]:
    """POST to the model's generate_stream; return the status and every SSE event with its
    arrival time (seconds after the request was sent)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        sent_at = time.monotonic()
        conn.request(
            "POST",
            f"/v2/models/{model}/generate_stream",
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


def stream_grpc(
    triton: TritonProcess, prompts: list[int], outputs: list[int], parameters: dict[str, Any]
) -> list[tuple[list[int], bool]]:
    """Stream one llm_stream request over gRPC ModelStreamInfer; return every response's
    OUT_TOKENS (one per row) and whether it carried the FINAL flag (an empty FINAL response,
    had the model sent one, would show up as ``([], True)``)."""
    inputs = []
    for name, values in (("PROMPT_TOKENS", prompts), ("OUTPUT_TOKENS", outputs)):
        tensor = grpcclient.InferInput(name, [len(values), 1], "INT32")
        tensor.set_data_from_numpy(np.array(values, dtype=np.int32).reshape(-1, 1))
        inputs.append(tensor)
    received: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(triton.grpc_address)
    try:
        client.start_stream(callback=lambda result, error: received.put((result, error)))
        client.async_stream_infer(
            "llm_stream", inputs, parameters=parameters, enable_empty_final_response=True
        )
        responses: list[tuple[list[int], bool]] = []
        while not (responses and responses[-1][1]):
            result, error = received.get(timeout=30)
            assert error is None, error
            final = result.get_response().parameters["triton_final_response"].bool_param
            tokens = result.as_numpy("OUT_TOKENS")
            responses.append(([] if tokens is None else tokens.reshape(-1).tolist(), final))
        return responses
    finally:
        client.stop_stream()
        client.close()


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


def test_stream_stops_at_eos_after_tokens(triton: TritonProcess) -> None:
    """The batch ends at the 20th token: Triton's compute time for two such requests stays
    under what one batch that ran on to 500 tokens must take (the model sleeps to absolute
    step deadlines, so a batch never ends before its simulated time). Triton's own counter,
    not the client's wall clock, which the full suite's load made flaky."""
    body = {"PROMPT_TOKENS": 500, "OUTPUT_TOKENS": 500, "parameters": {"eos_after_tokens": 20}}
    chunk = int(model_parameters("llm_stream")["chunk_tokens"])
    expected = [min(chunk, 20 - sent) for sent in range(0, 20, chunk)]
    executions = _llm_counter(triton, "nv_inference_exec_count", "llm_stream")
    compute_us = _llm_counter(triton, "nv_inference_compute_infer_duration_us", "llm_stream")
    # Twice in a row: the second request waits for the first one's batch, so it also shows
    # that the batch ended after 20 steps, not just the first stream.
    for _ in range(2):
        status, events = generate_stream(triton.http_port, body)
        assert status == 200, events
        assert [event["OUT_TOKENS"] for _, event in events] == expected
    # A decoupled model sends its last response before its execution ends and is counted:
    # wait for Triton to count both.
    wait_for(
        lambda: _llm_counter(triton, "nv_inference_exec_count", "llm_stream") >= executions + 2,
        "Triton to count both executions",
    )
    assert _llm_counter(triton, "nv_inference_exec_count", "llm_stream") - executions == 2
    spent_ms = (
        _llm_counter(triton, "nv_inference_compute_infer_duration_us", "llm_stream") - compute_us
    ) / 1000.0
    # Predicted: 2 x 35 ms; one batch that ran on would take at least 515 ms.
    ran_on_ms = predicted_ms("llm_stream", [500], [500])
    assert 2 * predicted_ms("llm_stream", [500], [20]) < 0.2 * ran_on_ms
    # The lower bound shows the counter counts this model's time at all.
    assert 2 * predicted_ms("llm_stream", [500], [20]) <= spent_ms < ran_on_ms, spent_ms


def test_stream_final_flag_comes_with_the_last_generated_tokens(triton: TritonProcess) -> None:
    responses = stream_grpc(triton, [1, 1], [500, 10], {"eos_after_tokens": 20})
    finals = [final for _, final in responses]
    assert finals == [False] * (len(responses) - 1) + [True], responses
    assert responses[-1][0] != [], "the FINAL flag came in an empty response"
    assert [sum(tokens[row] for tokens, _ in responses) for row in (0, 1)] == [20, 10]


def test_stream_invalid_eos_after_tokens_fails_alone(triton: TritonProcess) -> None:
    port = triton.http_port
    full = {"PROMPT_TOKENS": [1] * FULL_BATCH, "OUTPUT_TOKENS": [100] * FULL_BATCH}
    bad_body = {"PROMPT_TOKENS": 5, "OUTPUT_TOKENS": 50, "parameters": {"eos_after_tokens": 2.5}}
    good_body = {"PROMPT_TOKENS": 5, "OUTPUT_TOKENS": 50, "parameters": {"eos_after_tokens": 20}}
    with ThreadPoolExecutor(max_workers=4) as pool:
        blockers = occupy(triton, "llm_stream", lambda: pool.submit(generate_stream, port, full))
        bad = pool.submit(generate_stream, port, bad_body)
        good = pool.submit(generate_stream, port, good_body)
        wait_for(queued_behind(triton, "llm_stream", blockers, 2), "two queued streams")
        assert still_busy(blockers), "the blockers finished before the queue was set up"
        (bad_status, bad_events), (good_status, good_events) = bad.result(), good.result()
        assert all(b.result()[0] == 200 for b in blockers)
    assert bad_status == 400, bad_events
    assert len(bad_events) == 1 and "eos_after_tokens" in bad_events[0][1]["error"]
    assert good_status == 200, good_events
    assert sum(event["OUT_TOKENS"] for _, event in good_events) == 20


# -- llm_ifb: in-flight batching -------------------------------------------------------------------


def generate(port: int, prompt: int, output: int, priority: int | None = None) -> Result:
    body: dict[str, Any] = {"PROMPT_TOKENS": prompt, "OUTPUT_TOKENS": output}
    if priority is not None:
        body["parameters"] = {"priority": priority}
    return post(port, "/v2/models/llm_ifb/generate", body)


def ifb_requests(triton: TritonProcess, kind: str) -> float:
    """The model's ``nv_trt_llm_request_metrics`` gauge of ``kind`` (waiting, active, max)."""
    status, page = get(triton.metrics_port, "/metrics")
    assert status == 200
    found = re.search(
        rf'nv_trt_llm_request_metrics\{{[^}}]*request_type="{kind}"[^}}]*\}} (\S+)', page.decode()
    )
    assert found is not None, page.decode()[-2000:]
    return float(found.group(1))


def test_ifb_answers_generate_with_the_tokens_it_generated(triton: TritonProcess) -> None:
    result = generate(triton.http_port, 500, 100)
    assert result.status == 200, result.body
    assert result.body["OUT_TOKENS"] == 100
    assert ifb_requests(triton, "max") == model_parameters("llm_ifb")["max_active"]


def test_ifb_a_request_joins_the_running_batch_and_leaves_when_it_is_done(
    triton: TritonProcess,
) -> None:
    """Static batching (`llm`) makes a request that arrives while a batch runs wait for all of
    it; in-flight batching lets it join at the next iteration and leave at its own end."""
    port = triton.http_port
    with ThreadPoolExecutor(max_workers=2) as pool:
        long = pool.submit(generate, port, 100, 2000)
        wait_for(lambda: ifb_requests(triton, "active") == 1, "the long request running")
        short = generate(port, 100, 20)
        assert not long.done(), "the long request ended before the short one was sent"
        assert short.status == 200 and long.result().status == 200
    # Static batching would end it with the long one, not before: the order is the proof (a
    # wall-clock ratio to the predicted length failed on a loaded host).
    assert short.done_at < long.result().done_at


def test_ifb_waiting_requests_join_best_priority_first(triton: TritonProcess) -> None:
    port = triton.http_port
    slots = int(model_parameters("llm_ifb")["max_active"])
    with ThreadPoolExecutor(max_workers=slots + 8) as pool:
        # Every slot taken, freeing one at a time (different lengths).
        running = [pool.submit(generate, port, 1, 1200 + 40 * i) for i in range(slots)]
        wait_for(lambda: ifb_requests(triton, "active") == slots, "every slot taken")
        low = [pool.submit(generate, port, 1, 20, 3) for _ in range(5)]
        wait_for(lambda: ifb_requests(triton, "waiting") == 5, "five priority-3 waiting")
        high = pool.submit(generate, port, 1, 20, 1)
        wait_for(lambda: ifb_requests(triton, "waiting") == 6, "the priority-1 waiting too")
        assert not any(r.done() for r in running), "a slot freed before the queue was set up"
        time.sleep(0.1)  # a few iterations and gauge reports: nobody joins a full batch
        assert (ifb_requests(triton, "active"), ifb_requests(triton, "waiting")) == (slots, 6)
        results = [r.result() for r in [*running, *low, high]]
    assert all(r.status == 200 for r in results)
    # Queued last, it took the first slot that freed: done before every priority-3 request.
    assert high.result().done_at < min(r.result().done_at for r in low)


def test_ifb_streams_the_tokens_of_every_iteration_when_asked(triton: TritonProcess) -> None:
    """`stream_tokens`: one response per iteration with what it generated, the last FINAL,
    so a client sees its first tokens long before its last (time to first token and time per
    output token are real); `eos_after_tokens` still ends the sequence early."""
    per = int(model_parameters("llm_ifb")["iteration_tokens"])
    body = {"PROMPT_TOKENS": 10, "OUTPUT_TOKENS": 5 * per + 3}
    status, events = generate_stream(
        triton.http_port, {**body, "parameters": {"stream_tokens": True}}, "llm_ifb"
    )
    assert status == 200, events
    assert [e["OUT_TOKENS"] for _, e in events] == [per] * 5 + [3]
    assert events[0][0] < events[-1][0]
    status, events = generate_stream(
        triton.http_port,
        {**body, "parameters": {"stream_tokens": True, "eos_after_tokens": per + 1}},
        "llm_ifb",
    )
    assert status == 200 and [e["OUT_TOKENS"] for _, e in events] == [per, 1], events
    # Without it, one answer with every token, as on /generate.
    status, events = generate_stream(triton.http_port, body, "llm_ifb")
    assert status == 200 and [e["OUT_TOKENS"] for _, e in events] == [5 * per + 3], events
