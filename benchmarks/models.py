"""The simulated models the benchmark drives, and the model repository it serves them from.

Two models of ``examples/triton`` (the same files the demo and the tests use):

* ``llm``: an LLM-like model (static batches of up to 16; prefill grows with prompt tokens,
  decode with the longest output and the batch size; ``speed`` divides every duration);
* ``simgpu``: a fixed-cost batched model (``base_ms + per_item_ms * B + per_token_ms *
  sum(TOKENS)``); the benchmark sends ``TOKENS = output + prompt // 10``.

``make_model_repo`` copies the model into a scratch repository with its speed set, and for the
siloed baseline adds one copy per class (``<model>_<class>``), each ``n_classes`` times
slower, so that the silos together have the capacity of the one shared model.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from devstack.stack import MODEL_REPO

# The llm model's own clipping (examples/triton/llm/1/model.py).
MAX_PROMPT_TOKENS = 32768
MAX_OUTPUT_TOKENS = 2048


@dataclass(frozen=True, slots=True)
class ModelKind:
    name: str
    max_batch: int
    # config.pbtxt parameters at speed 1 (ms), as the benchmark sets them
    params: dict[str, float]

    @property
    def llm_like(self) -> bool:
        return self.name in ("llm", "llm_ifb")

    @property
    def endpoint(self) -> str:
        """The path suffix the model is called on: a decoupled model cannot serve /infer."""
        return "generate" if self.name == "llm_ifb" else "infer"

    @property
    def streams(self) -> bool:
        """Can it send a request's tokens as they are generated (generate_stream)?"""
        return self.name == "llm_ifb"

    def body(
        self,
        prompt: int,
        output: int,
        priority: int | None,
        *,
        stream: bool = False,
        request_id: str = "",
    ) -> bytes:
        """The request's JSON body; ``request_id`` as its KServe v2 ``id`` (the infer
        endpoint: ``llm``'s batch log writes it, benchmarks/device_log.py joins on it)."""
        if self.name == "llm_ifb":  # the generate extension: inputs by name, parameters beside
            doc: dict[str, object] = {"PROMPT_TOKENS": prompt, "OUTPUT_TOKENS": output}
            parameters: dict[str, object] = {} if priority is None else {"priority": priority}
            if stream:
                parameters["stream_tokens"] = True
            if parameters:
                doc["parameters"] = parameters
            return json.dumps(doc, separators=(",", ":")).encode()
        if self.name == "llm":
            inputs = [
                {"name": "PROMPT_TOKENS", "shape": [1, 1], "datatype": "INT32", "data": [prompt]},
                {"name": "OUTPUT_TOKENS", "shape": [1, 1], "datatype": "INT32", "data": [output]},
            ]
        else:
            tokens = output + prompt // 10
            inputs = [{"name": "TOKENS", "shape": [1, 1], "datatype": "INT32", "data": [tokens]}]
        doc = {"id": request_id, "inputs": inputs} if request_id else {"inputs": inputs}
        if priority is not None:
            doc["parameters"] = {"priority": priority}
        return json.dumps(doc, separators=(",", ":")).encode()

    def batch_ms(self, prompt: Sequence[int], output: Sequence[int], speed: float) -> float:
        """The cost model of one batch, as the model's ``execute`` computes it, with its
        clipping of the token counts (``llm``: prompt to [0, 32768], output to [1, 2048])."""
        p = self.params
        rows = len(output)
        if rows == 0:
            return 0.0
        if self.llm_like:
            prompt = [min(max(0, q), MAX_PROMPT_TOKENS) for q in prompt]
            output = [min(max(1, o), MAX_OUTPUT_TOKENS) for o in output]
            prefill = p["prefill_base_ms"] + p["prefill_per_token_ms"] * sum(prompt)
            step = p["decode_step_ms"] * (1.0 + p["decode_batch_slowdown"] * (rows - 1))
            return (prefill + max(output) * step) / speed
        tokens = sum(o + q // 10 for q, o in zip(prompt, output, strict=True))
        return (p["base_ms"] + p["per_item_ms"] * rows + p["per_token_ms"] * tokens) / speed

    def lone_s(self, prompt: int, output: int, speed: float) -> float:
        """Seconds one request takes alone on an idle device: a deadline below this cannot be
        met by any scheduler."""
        return self.batch_ms([prompt], [output], speed) / 1000.0

    def saturated_throughput(
        self, prompt: npt.NDArray[Any], output: npt.NDArray[Any], speed: float, seed: int = 0
    ) -> float:
        """Requests/s with every batch full (random batches of the given sizes). In flight
        (llm_ifb), the batch is always full and no row waits for a longer one: each request
        costs its prefill and its own decode steps at the full batch's step time, shared."""
        if self.name == "llm_ifb":
            p = self.params
            step = p["decode_step_ms"] * (1.0 + p["decode_batch_slowdown"] * (self.max_batch - 1))
            prefill = p["prefill_base_ms"] + p["prefill_per_token_ms"] * np.clip(prompt, 0, None)
            decode = np.clip(output, 1, MAX_OUTPUT_TOKENS) * step / self.max_batch
            return float(len(prompt) / (float(np.sum(prefill + decode)) / speed / 1000.0))
        rng = np.random.default_rng(seed)
        n = len(prompt) - len(prompt) % self.max_batch
        order = rng.permutation(len(prompt))[:n].reshape(-1, self.max_batch)
        total_ms = sum(self.batch_ms(list(prompt[row]), list(output[row]), speed) for row in order)
        return n / (total_ms / 1000.0)


MODELS: dict[str, ModelKind] = {
    "llm": ModelKind(
        "llm",
        16,
        {
            "prefill_base_ms": 5.0,
            "prefill_per_token_ms": 0.02,
            "decode_step_ms": 1.0,
            "decode_batch_slowdown": 0.05,
        },
    ),
    # In-flight (continuous) batching: the cost model of llm, spent per decode iteration.
    "llm_ifb": ModelKind(
        "llm_ifb",
        16,
        {
            "prefill_base_ms": 5.0,
            "prefill_per_token_ms": 0.02,
            "decode_step_ms": 1.0,
            "decode_batch_slowdown": 0.05,
        },
    ),
    "simgpu": ModelKind("simgpu", 8, {"base_ms": 10.0, "per_item_ms": 2.0, "per_token_ms": 0.05}),
}


def default_model() -> str:
    return "llm" if (MODEL_REPO / "llm" / "config.pbtxt").is_file() else "simgpu"


_PARAM = re.compile(r'parameters\s*\{\s*key:\s*"(?P<key>[^"]+)"\s*value:\s*\{[^}]*\}\s*\}')


def _set_params(text: str, values: dict[str, float]) -> str:
    text = _PARAM.sub(lambda m: "" if m.group("key") in values else m.group(0), text)
    lines = [
        f'parameters {{ key: "{key}" value: {{ string_value: "{value:g}" }} }}'
        for key, value in values.items()
    ]
    return text.rstrip() + "\n" + "\n".join(lines) + "\n"


def _copy_model(
    kind: ModelKind, target: Path, name: str, speed: float, source_repo: Path, instances: int = 1
) -> None:
    source = source_repo / kind.name
    shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__"))
    config = target / name / "config.pbtxt"
    text = config.read_text()
    text = re.sub(r'^name:\s*"[^"]*"', f'name: "{name}"', text, count=1, flags=re.M)
    text, found = re.subn(
        r"instance_group \[ \{ kind: KIND_CPU, count: \d+ \} \]",
        f"instance_group [ {{ kind: KIND_CPU, count: {instances} }} ]",
        text,
    )
    if found != 1:
        raise ValueError(f"{config}: expected one KIND_CPU instance_group line")
    if kind.llm_like:
        values = dict(kind.params) | {"speed": speed}
    else:  # simgpu has no speed: divide its durations instead
        values = {key: value / speed for key, value in kind.params.items()}
    config.write_text(_set_params(text, values))


def make_model_repo(
    kind: ModelKind,
    target: Path,
    speed: float,
    silo_classes: Sequence[str] = (),
    source_repo: Path = MODEL_REPO,
    instances: int = 1,
) -> Path:
    """Write a model repository under ``target``: the model at ``speed`` with ``instances``
    instances (simulated devices), and one copy per class in ``silo_classes`` with one
    instance at ``speed * instances / len(silo_classes)``: the silos together have the
    shared model's hardware. With as many instances as classes, each silo is one full-speed
    device of its own (QoServe's siloed deployment against the same devices shared)."""
    target.mkdir(parents=True, exist_ok=True)
    _copy_model(kind, target, kind.name, speed, source_repo, instances)
    for klass in silo_classes:
        silo_speed = speed * instances / len(silo_classes)
        _copy_model(kind, target, silo_name(kind.name, klass), silo_speed, source_repo)
    return target


def silo_name(model: str, klass: str) -> str:
    return f"{model}_{klass}"


def stream_classes(spec: str, model: ModelKind) -> tuple[str, ...]:
    """The classes ``--stream`` names (comma-separated; "none": none), where ``model`` streams:
    on one that does not, nothing is streamed."""
    if not model.streams or spec.strip().lower() in ("", "none"):
        return ()
    return tuple(name.strip() for name in spec.split(",") if name.strip())
