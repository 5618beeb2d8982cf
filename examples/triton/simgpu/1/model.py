"""simgpu: a python-backend model that simulates GPU time with ``time.sleep``.

Cost model (one call of ``execute`` = one batch on one simulated device):

    batch_ms = base_ms + per_item_ms * batch_size + per_token_ms * sum(TOKENS)

unless a request in the batch sets ``DELAY_MS``: then the batch takes the largest
``DELAY_MS`` in it (a batch cannot finish before its slowest member). ``base_ms``,
``per_item_ms`` and ``per_token_ms`` come from the ``parameters`` in config.pbtxt.
Every request gets ``OUT`` = the simulated batch time in ms, so callers can check it.

This file runs inside Triton's python stub, not in the sidecar: it must import only the
standard library, numpy and ``triton_python_backend_utils``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


def _param(config: dict[str, Any], key: str, default: float) -> float:
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return float(value) if value not in (None, "") else default


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.base_ms = _param(config, "base_ms", 10.0)
        self.per_item_ms = _param(config, "per_item_ms", 2.0)
        self.per_token_ms = _param(config, "per_token_ms", 0.0)
        if int(np.__version__.split(".", 1)[0]) >= 2:
            # The python stub of Triton 2.51 (nvidia-pytriton 0.7) is built for the numpy 1.x
            # ABI: under numpy 2 inputs read wrong and outputs arrive with 0 bytes ("output
            # tensor shape does not match size of output"). Newer Triton images are fine.
            pb_utils.Logger.log_warn(
                f"simgpu: numpy {np.__version__} in the python stub; Triton <= 2.51 stubs need"
                " numpy<2 (run the stub with the venv's python, see examples/triton/README.md)"
            )

    def execute(self, requests: list[Any]) -> list[Any]:
        rows_per_request: list[int] = []
        tokens = 0
        delays_ms: list[float] = []
        for request in requests:
            # With max_batch_size > 0 every input has a leading batch dimension, and one
            # request may itself carry several rows; each row counts as one batch item.
            rows = 1
            delay = pb_utils.get_input_tensor_by_name(request, "DELAY_MS")
            if delay is not None:
                values = delay.as_numpy()
                rows = max(rows, values.shape[0])
                delays_ms.append(float(values.max()))
            count = pb_utils.get_input_tensor_by_name(request, "TOKENS")
            if count is not None:
                values = count.as_numpy()
                rows = max(rows, values.shape[0])
                tokens += int(values.sum())
            else:
                tokens += rows
            rows_per_request.append(rows)

        if delays_ms:
            batch_ms = max(delays_ms)
        else:
            batch_size = sum(rows_per_request)
            batch_ms = self.base_ms + self.per_item_ms * batch_size + self.per_token_ms * tokens
        time.sleep(max(batch_ms, 0.0) / 1000.0)

        return [
            pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("OUT", np.full((rows, 1), batch_ms, dtype=np.float32))
                ]
            )
            for rows in rows_per_request
        ]
