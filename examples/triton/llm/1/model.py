"""llm: a python-backend model that simulates an LLM on one GPU with ``time.sleep``.

Every row of a request is one sequence. ``OUTPUT_TOKENS`` is its generation limit (like
``max_tokens``); the tokens it actually generates are

    generated = min(OUTPUT_TOKENS, eos_after_tokens)

where ``eos_after_tokens`` is an optional request parameter (KServe v2 ``"parameters":
{"eos_after_tokens": N}``, on ``/infer`` and in the ``"parameters"`` of ``/generate``): the
sequence meets its end-of-sequence token after N tokens, as a real LLM usually stops before
its limit. It applies to every row of the request. Without it a sequence generates its whole
``OUTPUT_TOKENS``. It is a parameter, not an input tensor, so that it cannot change how
Triton's dynamic batcher groups requests.

Cost model (one call of ``execute`` = one batch of B rows on one simulated device; the batch is
static: it runs until its longest sequence is done):

    prefill_ms = prefill_base_ms + prefill_per_token_ms * sum(PROMPT_TOKENS)
    decode_ms  = max(generated) * decode_step_ms * (1 + decode_batch_slowdown * (B - 1))
    batch_ms   = (prefill_ms + decode_ms) / speed

The parameters come from the ``parameters`` in config.pbtxt. ``PROMPT_TOKENS`` is clipped to
[0, 32768], ``OUTPUT_TOKENS`` to [1, 2048] and ``eos_after_tokens`` to >= 1. A request with a
negative input, or an ``eos_after_tokens`` that is not a non-negative JSON integer, gets an
INVALID_ARG error (HTTP 400) and takes no part in the batch. Every other request gets
``OUT_TOKENS`` (``generated``, per row) and ``BATCH_MS`` (the measured wall time of its batch).

With the config parameter ``batch_log`` set to a file path (it is not in the shipped
config.pbtxt), every batch appends one line to it: ``<start> <end> <rows>``, the start and end
as ``time.monotonic()`` seconds (the clock every process of the host shares) and the batch's
row count, then, when any of its requests has an id (KServe v2 ``"id"``), the ids of its
requests in order, comma-joined (``-`` for none, or for one holding a space or a comma). It
shows when the simulated device was busy and when it sat idle, and which requests ran in each
batch (``benchmarks/triton_stalls.py`` reads it). Unset or empty: nothing is written. A failed write
is logged once and writing stops; the batch is served anyway.

This file runs inside Triton's python stub, not in the sidecar: it must import only the
standard library, numpy and ``triton_python_backend_utils``.
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


def _param(config: dict[str, Any], key: str, default: float) -> float:
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return float(value) if value not in (None, "") else default


def _log_id(request_id: str) -> str:
    """A request's id as the batch log writes it: ``-`` for none, or for one that would break
    the line's fields."""
    if not request_id or any(c in request_id for c in " ,\t\r\n"):
        return "-"
    return request_id


def _invalid(message: str) -> Any:
    # INVALID_ARG maps to HTTP 400 / gRPC INVALID_ARGUMENT (the default code would be 500).
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def _eos_after_tokens(request: Any) -> int | None:
    """The request's ``eos_after_tokens`` parameter clipped to >= 1, or None without one.

    Raises ValueError when it is not a non-negative integer. ``request.parameters()`` is the
    request's parameters as a JSON object in a string ("{}" without any); Triton removes the
    ones it acts on itself (``priority``, ``timeout``) from ``/infer`` and gRPC requests, but
    passes every key of a ``/generate`` body's ``"parameters"`` (``priority`` included).
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


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.prefill_base_ms = _param(config, "prefill_base_ms", 5.0)
        self.prefill_per_token_ms = _param(config, "prefill_per_token_ms", 0.02)
        self.decode_step_ms = _param(config, "decode_step_ms", 1.0)
        self.decode_batch_slowdown = _param(config, "decode_batch_slowdown", 0.05)
        self.speed = _param(config, "speed", 1.0)
        log_path = config.get("parameters", {}).get("batch_log", {}).get("string_value", "")
        # Kept open for the model's life (one line a batch), closed in finalize.
        self.batch_log = open(log_path, "a", buffering=1) if log_path else None  # noqa: SIM115
        if self.speed <= 0:
            raise pb_utils.TritonModelException(f"llm: speed must be > 0, got {self.speed}")
        if int(np.__version__.split(".", 1)[0]) >= 2:
            # The python stub of Triton 2.51 (nvidia-pytriton 0.7) is built for the numpy 1.x
            # ABI: under numpy 2 inputs read wrong and outputs arrive with 0 bytes.
            pb_utils.Logger.log_warn(
                f"llm: numpy {np.__version__} in the python stub; Triton <= 2.51 stubs need"
                " numpy<2 (run the stub with the venv's python, see examples/triton/README.md)"
            )

    def batch_ms(self, prompt_tokens: list[int], generated_tokens: list[int]) -> float:
        """Simulated time of a batch whose rows have these (clipped) token counts."""
        if not generated_tokens:
            return 0.0
        rows = len(generated_tokens)
        prefill = self.prefill_base_ms + self.prefill_per_token_ms * sum(prompt_tokens)
        step = self.decode_step_ms * (1.0 + self.decode_batch_slowdown * (rows - 1))
        return (prefill + max(generated_tokens) * step) / self.speed

    @staticmethod
    def _read(request: Any) -> tuple[np.ndarray, np.ndarray] | str:
        """The clipped (prompt, generated) token counts of one request, one entry per row, or
        an error message."""
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

    def finalize(self) -> None:
        if self.batch_log is not None:
            self.batch_log.close()

    def _log_batch(self, started: float, ended: float, rows: int, requests: list[Any]) -> None:
        if self.batch_log is None:
            return
        ids = [_log_id(request.request_id()) for request in requests]
        tail = " " + ",".join(ids) if any(i != "-" for i in ids) else ""
        try:
            self.batch_log.write(f"{started:.6f} {ended:.6f} {rows}{tail}\n")
        except OSError as exc:
            pb_utils.Logger.log_warn(f"llm: batch_log write failed, no more lines: {exc}")
            self.batch_log = None

    def execute(self, requests: list[Any]) -> list[Any]:
        started = time.monotonic()
        parsed = [self._read(request) for request in requests]
        prompt_tokens: list[int] = []
        generated_tokens: list[int] = []
        for item in parsed:
            if not isinstance(item, str):
                prompt_tokens.extend(int(v) for v in item[0])
                generated_tokens.extend(int(v) for v in item[1])

        time.sleep(self.batch_ms(prompt_tokens, generated_tokens) / 1000.0)
        ended = time.monotonic()
        elapsed_ms = (ended - started) * 1000.0
        self._log_batch(started, ended, len(generated_tokens), requests)

        responses = []
        for item in parsed:
            if isinstance(item, str):
                responses.append(_invalid(f"llm: {item}"))
                continue
            generated = item[1]
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("OUT_TOKENS", generated.astype(np.int32).reshape(-1, 1)),
                        pb_utils.Tensor(
                            "BATCH_MS", np.full((generated.size, 1), elapsed_ms, dtype=np.float32)
                        ),
                    ]
                )
            )
        return responses
