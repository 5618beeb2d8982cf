"""llm_ifb: an LLM with IN-FLIGHT (continuous) batching, simulated on one GPU with sleeps.

The static-batching ``llm`` runs a batch until its longest sequence is done, and a request
that arrives meanwhile waits for all of it. Modern LLM backends in Triton (TensorRT-LLM's
in-flight batcher, vLLM) instead run decode *iterations*: a waiting request joins the running
batch at the next iteration, and a finished one leaves it at once. This model does that:

- ``execute`` never blocks (decoupled): it puts each request in the model's waiting queue and
  returns; Triton's own queue stays empty, as with those backends.
- A scheduler thread runs iterations of ``iteration_tokens`` decode steps. Before each, it
  moves waiting requests into the running batch while it has fewer than ``max_active``
  sequences, best ``priority`` first (the request's ``"parameters": {"priority": N}``, which
  Triton passes to the model on ``/generate`` and ``/generate_stream``; 1 is the highest,
  ``default_priority`` without one), then in arrival order.
- An iteration takes ``(prefill_ms of the requests that joined + iteration_tokens *
  decode_step_ms * (1 + decode_batch_slowdown * (B - 1))) / speed``, with
  ``prefill_ms = prefill_base_ms + prefill_per_token_ms * their prompt tokens``: the cost
  model of ``llm``, spent per iteration. A sequence done within an iteration is answered at its
  end (one response, FINAL), with ``OUT_TOKENS`` (tokens generated) and ``BATCH_MS`` (ms from
  its joining the batch to its answer).
- A request with ``"parameters": {"stream_tokens": true}``, sent to ``/generate_stream``, is
  answered after every iteration instead: one response with the tokens that iteration
  generated for it (``OUT_TOKENS``; a request's responses sum to its tokens generated), the
  last one FINAL, so time to first token and time per output token are real. Only
  ``/generate_stream`` takes more than one response.
- Its waiting and running sequences are exported the way TensorRT-LLM's backend exports them,
  ``nv_trt_llm_request_metrics{model, version, request_type="waiting"|"active"|"max"}``, the
  queue the sidecar reads for a backend that batches in flight (sidecar/core/load.py).

Use ``POST /v2/models/llm_ifb/generate`` with ``{"PROMPT_TOKENS": p, "OUTPUT_TOKENS": o,
"parameters": {"priority": n}}`` (``/infer`` cannot serve a decoupled model). Token counts and
``eos_after_tokens`` are read and clipped as in ``llm``. This file runs inside Triton's python
stub: it imports only the standard library, numpy and ``triton_python_backend_utils``.
"""

from __future__ import annotations

import heapq
import itertools
import json
import threading
import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

MAX_PROMPT_TOKENS = 32768
MAX_OUTPUT_TOKENS = 2048
EOS_PARAMETER = "eos_after_tokens"
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
REPORT_S = 0.05  # how often the queue gauges are updated


def _param(config: dict[str, Any], key: str, default: float) -> float:
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return float(value) if value not in (None, "") else default


def _invalid(message: str) -> Any:
    # INVALID_ARG maps to HTTP 400 / gRPC INVALID_ARGUMENT (the default code would be 500).
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def _eos_after_tokens(request: Any) -> int | None:
    """The request's ``eos_after_tokens`` parameter clipped to >= 1, or None without one.

    Raises ValueError when it is not a non-negative integer. ``request.parameters()`` is the
    request's parameters as a JSON object in a string ("{}" without any); Triton removes the
    ones it acts on itself (``priority``, ``timeout``) from gRPC and ``/infer`` requests, but
    passes every key of a ``generate`` or ``generate_stream`` body's ``"parameters"``
    (``priority`` included).
    """
    parameters = _parameters(request)
    if EOS_PARAMETER not in parameters:
        return None
    value = parameters[EOS_PARAMETER]
    # bool is an int in Python; a float (even 2.0) or a string is refused rather than guessed.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{EOS_PARAMETER} must be an integer >= 0, got {json.dumps(value)}")
    return max(1, value)


def _read(request: Any) -> tuple[np.ndarray, np.ndarray] | str:
    """The clipped (prompt, generated) token counts of one request, one entry per row, or an
    error message."""
    tensors = {}
    for name in ("PROMPT_TOKENS", "OUTPUT_TOKENS"):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return f"missing input {name}"
        values = tensor.as_numpy().astype(np.int64).reshape(-1)
        if values.size == 0:
            return f"input {name} is empty"
        if (values < 0).any():
            return f"{name} must not be negative, got {int(values.min())}"
        tensors[name] = values
    prompt, output = tensors["PROMPT_TOKENS"], tensors["OUTPUT_TOKENS"]
    if prompt.shape != output.shape:
        return "PROMPT_TOKENS and OUTPUT_TOKENS must have the same number of rows"
    try:
        eos_after = _eos_after_tokens(request)
    except ValueError as error:
        return str(error)
    generated = np.clip(output, 1, MAX_OUTPUT_TOKENS)
    if eos_after is not None:
        generated = np.minimum(generated, eos_after)
    return np.clip(prompt, 0, MAX_PROMPT_TOKENS), generated


def _parameters(request: Any) -> dict[str, Any]:
    read = getattr(request, "parameters", None)
    parameters = json.loads(read() or "{}") if read is not None else {}
    return parameters if isinstance(parameters, dict) else {}


def _priority(request: Any, default: int) -> int:
    value = _parameters(request).get("priority")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return default


class _Sequence:
    """One request in the running batch: its prompt, the tokens it will generate, and how
    many it has."""

    def __init__(self, request: Any, prompt: int, target: int) -> None:
        self.sender = request.get_response_sender()
        self.prompt = prompt
        self.target = target
        self.generated = 0
        self.joined = 0.0
        self.stream = _parameters(request).get("stream_tokens") is True

    def step(self, steps: int, now: float) -> bool:
        """`steps` more decode steps: answer what they generated as the request asks. Returns
        whether it is done."""
        before = self.generated
        self.generated = min(self.target, before + steps)
        done = self.generated >= self.target
        if self.stream:
            self._send(self.generated - before, now, FINAL if done else 0)
        elif done:
            self._send(self.target, now, FINAL)
        return done

    def _send(self, tokens: int, now: float, flags: int) -> None:
        response = pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("OUT_TOKENS", np.array([[tokens]], dtype=np.int32)),
                pb_utils.Tensor(
                    "BATCH_MS", np.array([[(now - self.joined) * 1000.0]], dtype=np.float32)
                ),
            ]
        )
        self.sender.send(response, flags=flags)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(
                "llm_ifb needs model_transaction_policy { decoupled: true }"
            )
        self.name = args.get("model_name", "llm_ifb")
        self.prefill_base_ms = _param(config, "prefill_base_ms", 5.0)
        self.prefill_per_token_ms = _param(config, "prefill_per_token_ms", 0.02)
        self.decode_step_ms = _param(config, "decode_step_ms", 1.0)
        self.decode_batch_slowdown = _param(config, "decode_batch_slowdown", 0.05)
        self.speed = _param(config, "speed", 1.0)
        self.max_active = max(1, int(_param(config, "max_active", 16)))
        self.iteration_tokens = max(1, int(_param(config, "iteration_tokens", 8)))
        self.default_priority = max(1, int(_param(config, "default_priority", 3)))
        if self.speed <= 0:
            raise pb_utils.TritonModelException(f"llm_ifb: speed must be > 0, got {self.speed}")
        self.lock = threading.Condition()
        self.waiting: list[tuple[int, int, _Sequence]] = []  # (priority, arrival, sequence)
        self.order = itertools.count()
        self.running = True
        self.reported = 0.0
        # Kept: Triton deletes a family's metrics when the family object goes away.
        self.family = family = pb_utils.MetricFamily(
            name="nv_trt_llm_request_metrics",
            description="Requests waiting, running and the most that can run (in-flight batcher)",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        labels = {"model": self.name, "version": str(args.get("model_version", "1"))}
        self.gauges = {
            kind: family.Metric(labels={**labels, "request_type": kind})
            for kind in ("waiting", "active", "max")
        }
        self.gauges["max"].set(self.max_active)
        self.thread = threading.Thread(target=self._run, name="llm_ifb", daemon=True)
        self.thread.start()

    def execute(self, requests: list[Any]) -> None:
        with self.lock:
            for request in requests:
                item = _read(request)
                if isinstance(item, str):
                    request.get_response_sender().send(_invalid(f"llm_ifb: {item}"), flags=FINAL)
                    continue
                prompt, generated = int(item[0].sum()), int(item[1].max())
                sequence = _Sequence(request, prompt, generated)
                priority = _priority(request, self.default_priority)
                heapq.heappush(self.waiting, (priority, next(self.order), sequence))
            self.lock.notify()
        return None

    def _run(self) -> None:
        active: list[_Sequence] = []
        while self.running:
            with self.lock:
                joined = []
                while self.waiting and len(active) + len(joined) < self.max_active:
                    joined.append(heapq.heappop(self.waiting)[2])
                if not joined and not active:
                    self.lock.wait(0.1)
                    self._report(len(self.waiting), 0)
                    continue
                waiting = len(self.waiting)
            started = time.monotonic()
            for sequence in joined:
                sequence.joined = started
            active += joined
            self._report(waiting, len(active))
            prefill = (
                self.prefill_base_ms + self.prefill_per_token_ms * sum(s.prompt for s in joined)
                if joined
                else 0.0
            )
            rows = len(active)
            step = self.decode_step_ms * (1.0 + self.decode_batch_slowdown * (rows - 1))
            steps = min(self.iteration_tokens, max(s.target - s.generated for s in active))
            delay = started + (prefill + steps * step) / self.speed / 1000.0 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            now = time.monotonic()
            active = [sequence for sequence in active if not sequence.step(steps, now)]

    def _report(self, waiting: int, active: int) -> None:
        """The gauges, at most every REPORT_S: each set is a round trip through the stub, and
        one per iteration slowed the iterations down several times on a 2-core machine."""
        now = time.monotonic()
        if now - self.reported < REPORT_S and (waiting, active) != (0, 0):
            return
        self.reported = now
        self.gauges["waiting"].set(waiting)
        self.gauges["active"].set(active)

    def finalize(self) -> None:
        with self.lock:
            self.running = False
            self.lock.notify()
        self.thread.join(timeout=2.0)
