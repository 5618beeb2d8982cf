"""Nudges: requests that wake Triton's dynamic batcher and are rejected before they run.

Why (examples/triton/README.md, "Priority levels cost Triton its prefetching"): a dynamic
batcher whose queue has priority levels, or a queue policy with a timeout or a size, does not
prefetch. It forms the next batch only once the instance waits for one, and it waits for that
on a condition variable with a 500 ms timeout. The end of a batch can notify it before the
instance is back waiting; it then sleeps on with requests queued and the instance idle, until
a request is enqueued, one is cancelled, or the 500 ms pass (Triton core 2.51 to at least
its head in 2026-12). `python -m benchmarks.triton_stalls` measures it.

A nudge is an enqueue that ends such a stall and does no work. The rules:
1. A model is nudged only if its configuration (Triton's `/v2/models/<m>/config`) says the
   stall can happen and the nudge cannot run: a dynamic batcher that does not prefetch, and
   at the nudge's priority level (the lowest) a queue policy that REJECTs on timeout, with a
   default timeout (a 0 default means no timeout at all, which an override cannot shorten)
   and `allow_timeout_override`, and no `max_queue_size` (nudges waiting there would take
   the room of requests). The nudge asks for a 1 us timeout, so the batcher rejects it
   the first time it looks at it, before any batch could take it.
2. Its inputs are the smallest valid tensors: zeros (empty strings for BYTES), every
   variable dimension 1, the batch dimension 1; the required inputs, or the first input where
   all are optional. A model with a shape tensor, an input type
   JSON cannot carry, or inputs of more than MAX_ELEMENTS elements is not nudged.
3. The answer proves what happened (`classify`): a 503 naming the timeout is the expected
   rejection. A 200 means it ran: the model is never nudged again. A 400 means Triton refused
   the tensors: never again either. Anything else (a 5xx, no answer) is transient.
4. Triton counts every rejected nudge as a failed request (reason REJECTED), which the load
   signals never read as a completion (`core/load.py`), and shows those still queued in
   `nv_inference_pending_request_count`. Nudges wait there while a batch runs (the batcher
   looks at the queue only between batches), so `NudgeLedger.discount` takes this replica's
   nudges sent and not yet answered off the queue depth (never below 0; it errs low by the
   few in transit either way, for the moment they are). Another replica's nudges it cannot
   see: in a gateway tier a reading may hold one per other replica that heard of an end,
   until the batch it landed in ends.
5. A model is nudged on an endpoint after a request of it ends, since a stall starts at a
   batch's end: once per end this replica sees (several ends between two ticks of the nudger
   make one nudge), while the model still has requests in flight (fleet-wide in the gateway
   topology) or Triton's last scrape showed it queueing there (`busy_pairs`,
   `NudgeLedger.due`). An end is seen a few milliseconds after the batch's (Envoy's access log
   or the ext_proc stream), well after the instance is back waiting, so the nudge's enqueue
   wakes the batcher. Nudging on a clock instead (every interval while busy) piles nudges
   up in the queue during every batch: in a gateway tier each replica then reads the
   others' as queue depth, which broke the fleet benchmark's fairness (14-142% off its share).
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sidecar.core.load import ModelLoad, TritonCounters

NUDGE_TIMEOUT_US = 1  # expired by the time the batcher looks at it
MAX_ELEMENTS = 4096  # of all inputs together: a nudge must stay cheap to send and parse

# Triton's data types and a JSON value of each that is zero (or empty).
_ZERO: dict[str, object] = {
    **dict.fromkeys(
        (f"TYPE_{kind}{bits}" for kind in ("INT", "UINT") for bits in (8, 16, 32, 64)), 0
    ),
    **dict.fromkeys(("TYPE_FP16", "TYPE_FP32", "TYPE_FP64"), 0.0),
    "TYPE_BOOL": False,
    "TYPE_STRING": "",
}


@dataclass(frozen=True, slots=True)
class NudgePlan:
    """What to send to nudge one model: a KServe v2 inference body."""

    model: str
    body: bytes
    priority: int  # the level it asks for (0: the model has no levels)


class NudgeOutcome(enum.Enum):
    REJECTED = "rejected"  # the expected answer: it woke the batcher and did no work
    RAN = "ran"  # it was served: never nudge this model again
    REFUSED = "refused"  # Triton refused its tensors (400): never nudge this model again
    FAILED = "failed"  # anything else: transient

    @property
    def stops(self) -> bool:
        return self in (NudgeOutcome.RAN, NudgeOutcome.REFUSED)


def plan_nudge(model: str, config: Mapping[str, Any]) -> NudgePlan | str:
    """The nudge for a model with this configuration, or why it gets none (rules 1 and 2)."""
    batching = config.get("dynamic_batching")
    if not isinstance(batching, Mapping):
        return "no dynamic batcher"
    levels = int(batching.get("priority_levels") or 0)
    policy = _policy_at(batching, levels)
    if levels == 0 and not _stops_prefetching(policy):
        return "its batcher prefetches (no priority levels or queue policy): no stall"
    if str(policy.get("timeout_action") or "REJECT") != "REJECT":
        return "the lowest level's queue policy delays timed-out requests instead of rejecting"
    if not policy.get("allow_timeout_override"):
        return "the lowest level's queue policy does not allow a request's own timeout"
    if not int(policy.get("default_timeout_microseconds") or 0):
        return "the lowest level's queue policy has no timeout for an override to shorten"
    if int(policy.get("max_queue_size") or 0):
        return "the lowest level's queue has a size limit: nudges would take its room"
    inputs = _zero_inputs(config)
    if isinstance(inputs, str):
        return inputs
    doc: dict[str, object] = {"inputs": inputs}
    parameters: dict[str, object] = {"timeout": NUDGE_TIMEOUT_US}
    if levels:
        parameters["priority"] = levels
    doc["parameters"] = parameters
    body = json.dumps(doc, separators=(",", ":")).encode()
    return NudgePlan(model=model, body=body, priority=levels)


def _policy_at(batching: Mapping[str, Any], level: int) -> Mapping[str, Any]:
    """The queue policy of a priority level: its own, else the default (Triton's rule)."""
    own = (batching.get("priority_queue_policy") or {}).get(str(level))
    if isinstance(own, Mapping):
        return own
    policy = batching.get("default_queue_policy")
    return policy if isinstance(policy, Mapping) else {}


def _stops_prefetching(policy: Mapping[str, Any]) -> bool:
    """Without priority levels, the batcher prefetches unless its one queue has a policy."""
    return bool(
        int(policy.get("default_timeout_microseconds") or 0)
        or policy.get("allow_timeout_override")
        or int(policy.get("max_queue_size") or 0)
    )


def _zero_inputs(config: Mapping[str, Any]) -> list[dict[str, object]] | str:
    batched = int(config.get("max_batch_size") or 0) > 0
    specs = list(config.get("input") or ())
    required = [spec for spec in specs if not spec.get("optional")]
    inputs: list[dict[str, object]] = []
    elements = 0
    for spec in required or specs[:1]:  # every input optional: the first one
        name = str(spec.get("name", ""))
        if spec.get("is_shape_tensor"):
            return f"input {name} is a shape tensor"
        zero = _ZERO.get(str(spec.get("data_type", "")))
        if zero is None:
            return f"input {name}: type {spec.get('data_type')} cannot be sent as JSON"
        dims = [1 if int(d) < 0 else int(d) for d in spec.get("dims") or ()]
        shape = [1, *dims] if batched else dims
        count = math.prod(shape)
        elements += count
        if elements > MAX_ELEMENTS:
            return f"inputs of more than {MAX_ELEMENTS} elements"
        datatype = "BYTES" if zero == "" else str(spec["data_type"]).removeprefix("TYPE_")
        inputs.append({"name": name, "shape": shape, "datatype": datatype, "data": [zero] * count})
    if not inputs:
        return "no input"
    return inputs


def busy_pairs(
    models: Mapping[str, Sequence[ModelLoad]], in_flight: Callable[[str], int | None]
) -> list[tuple[str, str]]:
    """The (endpoint, model) pairs to nudge now (rule 5), from the load view's models."""
    pairs: list[tuple[str, str]] = []
    for model, loads in models.items():
        running = (in_flight(model) or 0) > 0
        pairs.extend((load.endpoint, model) for load in loads if running or load.queue_depth)
    return pairs


def classify(status: int | None, body: bytes) -> NudgeOutcome:
    """What a nudge's answer says happened (rule 3); `status` None: no answer."""
    if status == 503 and b"timeout" in body.lower():
        return NudgeOutcome.REJECTED
    if status == 200:
        return NudgeOutcome.RAN
    if status == 400:
        return NudgeOutcome.REFUSED
    return NudgeOutcome.FAILED


class NudgeLedger:
    """Per endpoint and model: this replica's nudges sent and not answered (rule 4), and
    whether one is due (rule 5)."""

    def __init__(self) -> None:
        self._waiting: dict[tuple[str, str], int] = {}
        self._ends: dict[str, int] = {}  # per model: requests seen to end
        self._nudged: dict[tuple[str, str], int] = {}  # the ends seen at the last nudge

    def ended(self, model: str) -> None:
        """A request of `model` ended."""
        self._ends[model] = self._ends.get(model, 0) + 1

    def due(self, endpoint: str, model: str) -> bool:
        """Whether a request of the model ended since its last nudge on the endpoint."""
        return self._ends.get(model, 0) > self._nudged.get((endpoint, model), 0)

    def sent(self, endpoint: str, model: str) -> None:
        key = (endpoint, model)
        self._waiting[key] = self._waiting.get(key, 0) + 1
        self._nudged[key] = self._ends.get(model, 0)

    def answered(self, endpoint: str, model: str) -> None:
        key = (endpoint, model)
        self._waiting[key] = max(0, self._waiting.get(key, 0) - 1)

    def waiting(self, endpoint: str, model: str) -> int:
        return self._waiting.get((endpoint, model), 0)

    def discount(self, endpoint: str, model: str, counters: TritonCounters) -> TritonCounters:
        """A scrape's counters without this replica's waiting nudges in the queue depth."""
        waiting = self._waiting.get((endpoint, model), 0)
        if not waiting:
            return counters
        return replace(counters, pending=max(0.0, counters.pending - waiting))
