"""llm: a python-backend model that simulates an LLM on one GPU with ``time.sleep``.

Cost model (one call of ``execute`` = one batch of B rows on one simulated device; every row is
one sequence, and the batch is static: it runs until its longest sequence is done):

    prefill_ms = prefill_base_ms + prefill_per_token_ms * sum(PROMPT_TOKENS)
    decode_ms  = max(OUTPUT_TOKENS) * decode_step_ms * (1 + decode_batch_slowdown * (B - 1))
    batch_ms   = (prefill_ms + decode_ms) / speed

The parameters come from the ``parameters`` in config.pbtxt. ``PROMPT_TOKENS`` is clipped to
[0, 32768] and ``OUTPUT_TOKENS`` to [1, 2048]; a request with a negative value gets an
INVALID_ARG error (HTTP 400) and takes no part in the batch. Every other request gets
``OUT_TOKENS`` (the tokens "generated") and ``BATCH_MS`` (the measured wall time of its batch).

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


def _param(config: dict[str, Any], key: str, default: float) -> float:
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return float(value) if value not in (None, "") else default


def _invalid(message: str) -> Any:
    # INVALID_ARG maps to HTTP 400 / gRPC INVALID_ARGUMENT (the default code would be 500).
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.prefill_base_ms = _param(config, "prefill_base_ms", 5.0)
        self.prefill_per_token_ms = _param(config, "prefill_per_token_ms", 0.02)
        self.decode_step_ms = _param(config, "decode_step_ms", 1.0)
        self.decode_batch_slowdown = _param(config, "decode_batch_slowdown", 0.05)
        self.speed = _param(config, "speed", 1.0)
        if self.speed <= 0:
            raise pb_utils.TritonModelException(f"llm: speed must be > 0, got {self.speed}")
        if int(np.__version__.split(".", 1)[0]) >= 2:
            # The python stub of Triton 2.51 (nvidia-pytriton 0.7) is built for the numpy 1.x
            # ABI: under numpy 2 inputs read wrong and outputs arrive with 0 bytes.
            pb_utils.Logger.log_warn(
                f"llm: numpy {np.__version__} in the python stub; Triton <= 2.51 stubs need"
                " numpy<2 (run the stub with the venv's python, see examples/triton/README.md)"
            )

    def batch_ms(self, prompt_tokens: list[int], output_tokens: list[int]) -> float:
        """Simulated time of a batch whose rows have these (clipped) token counts."""
        if not output_tokens:
            return 0.0
        rows = len(output_tokens)
        prefill = self.prefill_base_ms + self.prefill_per_token_ms * sum(prompt_tokens)
        step = self.decode_step_ms * (1.0 + self.decode_batch_slowdown * (rows - 1))
        return (prefill + max(output_tokens) * step) / self.speed

    @staticmethod
    def _read(request: Any) -> tuple[np.ndarray, np.ndarray] | str:
        """The clipped (prompt, output) token counts of one request, one entry per row, or an
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
        return (
            np.clip(prompt, 0, MAX_PROMPT_TOKENS),
            np.clip(output, 1, MAX_OUTPUT_TOKENS),
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        started = time.monotonic()
        parsed = [self._read(request) for request in requests]
        prompt_tokens: list[int] = []
        output_tokens: list[int] = []
        for item in parsed:
            if not isinstance(item, str):
                prompt_tokens.extend(int(v) for v in item[0])
                output_tokens.extend(int(v) for v in item[1])

        time.sleep(self.batch_ms(prompt_tokens, output_tokens) / 1000.0)
        elapsed_ms = (time.monotonic() - started) * 1000.0

        responses = []
        for item in parsed:
            if isinstance(item, str):
                responses.append(_invalid(f"llm: {item}"))
                continue
            output = item[1]
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("OUT_TOKENS", output.astype(np.int32).reshape(-1, 1)),
                        pb_utils.Tensor(
                            "BATCH_MS", np.full((output.size, 1), elapsed_ms, dtype=np.float32)
                        ),
                    ]
                )
            )
        return responses
