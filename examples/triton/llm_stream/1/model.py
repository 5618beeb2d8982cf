"""llm_stream: the streaming twin of ``llm``, a decoupled python-backend model that simulates an
LLM on one GPU with ``time.sleep`` and sends the tokens as they are "generated".

As in ``llm``, ``OUTPUT_TOKENS`` is a row's generation limit (like ``max_tokens``) and the row
generates

    generated = min(OUTPUT_TOKENS, eos_after_tokens)

tokens, where ``eos_after_tokens`` is an optional request parameter (``"parameters":
{"eos_after_tokens": N}`` in a ``generate_stream`` body, or a gRPC request parameter) that
applies to every row of the request: the sequence meets its end-of-sequence token after N
tokens. Without it a row generates its whole ``OUTPUT_TOKENS``.

The cost model is the one of ``llm`` (one call of ``execute`` = one static batch of B rows):

    prefill_ms = prefill_base_ms + prefill_per_token_ms * sum(PROMPT_TOKENS)
    step_ms    = decode_step_ms * (1 + decode_batch_slowdown * (B - 1))
    batch_ms   = (prefill_ms + max(generated) * step_ms) / speed

but the time is spent step by step: after the prefill, every decode step "generates" one token
for every row that still has tokens to go, and every ``chunk_tokens`` steps (config.pbtxt,
default 8) each unfinished request gets one response with the tokens of that chunk. A request's
last response (which carries the FINAL flag) leaves as soon as its own generated tokens are
done, while the batch goes on for its longer members, so time to first token and per-request
latency are real. The next batch starts only when the longest generated sequence of this one is
done.

Each response has ``OUT_TOKENS`` (tokens in this response, per row; a request's responses sum
to its ``generated``) and ``BATCH_MS`` (ms since the batch started, when the step that
produced the response ended: one clock per step, the same for every stream of the batch).
``PROMPT_TOKENS`` is clipped to [0, 32768], ``OUTPUT_TOKENS`` to [1, 2048] and
``eos_after_tokens`` to >= 1; a request with a negative input, or an ``eos_after_tokens`` that
is not a non-negative JSON integer, gets one INVALID_ARG error response (HTTP 400 and an error
event on generate_stream).

This file runs inside Triton's python stub: it must import only the standard library, numpy and
``triton_python_backend_utils``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

MAX_PROMPT_TOKENS = 32768
MAX_OUTPUT_TOKENS = 2048
EOS_PARAMETER = "eos_after_tokens"
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


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
    ones it acts on itself (``priority``, ``timeout``) from gRPC requests, but passes every key
    of a ``generate_stream`` body's ``"parameters"`` (``priority`` included).
    """
    read = getattr(request, "parameters", None)
    parameters = json.loads(read() or "{}") if read is not None else {}
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


class _Stream:
    """One request of the batch: its sender, its rows' generated token counts (the targets),
    what it has been sent."""

    def __init__(self, request: Any, generated_tokens: np.ndarray) -> None:
        self.sender = request.get_response_sender()
        self.request = request
        self.target = generated_tokens
        self.sent = np.zeros_like(generated_tokens)
        self.done = False

    @property
    def last_step(self) -> int:
        return int(self.target.max())

    def cancelled(self) -> bool:
        # Triton >= 23.10 tells a model that the client went away (e.g. closed the stream).
        check = getattr(self.request, "is_cancelled", None)
        return bool(check()) if check is not None else False

    def send(self, step: int, elapsed_ms: float) -> None:
        """Send the tokens generated up to ``step``; the last response carries FINAL."""
        if self.cancelled():
            self.sender.send(flags=FINAL)
            self.done = True
            return
        produced = np.minimum(self.target, step)
        chunk = produced - self.sent
        self.sent = produced
        self.done = step >= self.last_step
        response = pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("OUT_TOKENS", chunk.astype(np.int32).reshape(-1, 1)),
                pb_utils.Tensor("BATCH_MS", np.full((chunk.size, 1), elapsed_ms, dtype=np.float32)),
            ]
        )
        self.sender.send(response, flags=FINAL if self.done else 0)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(
                "llm_stream needs model_transaction_policy { decoupled: true }"
            )
        self.prefill_base_ms = _param(config, "prefill_base_ms", 5.0)
        self.prefill_per_token_ms = _param(config, "prefill_per_token_ms", 0.02)
        self.decode_step_ms = _param(config, "decode_step_ms", 1.0)
        self.decode_batch_slowdown = _param(config, "decode_batch_slowdown", 0.05)
        self.speed = _param(config, "speed", 1.0)
        self.chunk_tokens = max(1, int(_param(config, "chunk_tokens", 1)))
        if self.speed <= 0:
            raise pb_utils.TritonModelException(f"llm_stream: speed must be > 0, got {self.speed}")
        if int(np.__version__.split(".", 1)[0]) >= 2:
            # The python stub of Triton 2.51 (nvidia-pytriton 0.7) is built for the numpy 1.x
            # ABI: under numpy 2 inputs read wrong and outputs arrive with 0 bytes.
            pb_utils.Logger.log_warn(
                f"llm_stream: numpy {np.__version__} in the python stub; Triton <= 2.51 stubs"
                " need numpy<2 (run the stub with the venv's python, see"
                " examples/triton/README.md)"
            )

    def execute(self, requests: list[Any]) -> None:
        started = time.monotonic()
        streams: list[_Stream] = []
        prompt_tokens = 0
        for request in requests:
            item = _read(request)
            if isinstance(item, str):
                request.get_response_sender().send(_invalid(f"llm_stream: {item}"), flags=FINAL)
                continue
            prompt_tokens += int(item[0].sum())
            streams.append(_Stream(request, item[1]))
        if not streams:
            return None

        rows = sum(stream.target.size for stream in streams)
        prefill_ms = self.prefill_base_ms + self.prefill_per_token_ms * prompt_tokens
        step_ms = self.decode_step_ms * (1.0 + self.decode_batch_slowdown * (rows - 1))
        steps = max(stream.last_step for stream in streams)

        # Sleep to absolute deadlines so that per-step sleep overshoot does not add up.
        for step in range(1, steps + 1):
            deadline = started + (prefill_ms + step * step_ms) / self.speed / 1000.0
            delay = deadline - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            # One reading per step: on a loaded host the sends themselves take milliseconds,
            # and a clock read per send put two streams of one step 10 ms apart.
            step_end_ms = (time.monotonic() - started) * 1000.0
            for stream in streams:
                if not stream.done and (step % self.chunk_tokens == 0 or step == stream.last_step):
                    stream.send(step, step_end_ms)
        return None
