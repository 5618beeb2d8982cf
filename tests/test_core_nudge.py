"""core/nudge.py: which models get nudged, with what, and what the answers and scrapes say."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from sidecar.core.load import ModelLoad, TritonCounters, parse_triton_metrics
from sidecar.core.nudge import (
    MAX_ELEMENTS,
    NudgeLedger,
    NudgeOutcome,
    NudgePlan,
    busy_pairs,
    classify,
    plan_nudge,
)

# What Triton 2.51 answers for examples/triton/llm's /v2/models/llm/config (abridged).
LLM: dict[str, Any] = {
    "name": "llm",
    "max_batch_size": 16,
    "input": [
        {"name": "PROMPT_TOKENS", "data_type": "TYPE_INT32", "dims": [1], "optional": False},
        {"name": "OUTPUT_TOKENS", "data_type": "TYPE_INT32", "dims": [1], "optional": False},
    ],
    "dynamic_batching": {
        "preferred_batch_size": [16],
        "max_queue_delay_microseconds": 2000,
        "priority_levels": 4,
        "default_priority_level": 3,
        "default_queue_policy": {
            "timeout_action": "REJECT",
            "default_timeout_microseconds": 3600000000,
            "allow_timeout_override": True,
            "max_queue_size": 0,
        },
        "priority_queue_policy": {},
    },
}


def llm_with(**batching: Any) -> dict[str, Any]:
    config = copy.deepcopy(LLM)
    config["dynamic_batching"].update(batching)
    return config


def test_the_shipped_llm_gets_a_lowest_priority_nudge_with_a_1us_timeout() -> None:
    plan = plan_nudge("llm", LLM)
    assert isinstance(plan, NudgePlan) and plan.priority == 4
    assert json.loads(plan.body) == {
        "inputs": [
            {"name": "PROMPT_TOKENS", "shape": [1, 1], "datatype": "INT32", "data": [0]},
            {"name": "OUTPUT_TOKENS", "shape": [1, 1], "datatype": "INT32", "data": [0]},
        ],
        "parameters": {"timeout": 1, "priority": 4},
    }


DEFAULT = LLM["dynamic_batching"]["default_queue_policy"]


@pytest.mark.parametrize(
    ("config", "why"),
    [
        ({k: v for k, v in LLM.items() if k != "dynamic_batching"}, "no dynamic batcher"),
        (llm_with(priority_levels=0, default_queue_policy={}), "prefetches"),
        (llm_with(default_queue_policy=DEFAULT | {"timeout_action": "DELAY"}), "delays"),
        (llm_with(default_queue_policy=DEFAULT | {"allow_timeout_override": False}), "own"),
        (llm_with(default_queue_policy=DEFAULT | {"default_timeout_microseconds": 0}), "no tim"),
        (llm_with(default_queue_policy=DEFAULT | {"max_queue_size": 64}), "size limit"),
        # Level 4 has a policy of its own, which wins over the default (Triton's rule).
        (llm_with(priority_queue_policy={"4": DEFAULT | {"timeout_action": "DELAY"}}), "delays"),
        # Priority levels without a queue policy: Triton's default has no timeout at all.
        (llm_with(default_queue_policy=None), "does not allow"),
    ],
)
def test_a_model_that_cannot_stall_or_whose_nudge_could_run_gets_none(
    config: dict[str, Any], why: str
) -> None:
    plan = plan_nudge("llm", config)
    assert isinstance(plan, str) and why in plan


def test_a_level_policy_of_its_own_can_allow_what_the_default_does_not() -> None:
    config = llm_with(
        default_queue_policy={}, priority_queue_policy={"4": DEFAULT, "1": {"max_queue_size": 3}}
    )
    assert isinstance(plan_nudge("llm", config), NudgePlan)


def test_without_levels_a_queue_policy_stops_prefetching_and_the_nudge_names_no_priority() -> None:
    plan = plan_nudge("llm", llm_with(priority_levels=0))
    assert isinstance(plan, NudgePlan) and plan.priority == 0
    assert json.loads(plan.body)["parameters"] == {"timeout": 1}


def test_where_every_input_is_optional_the_first_one_is_sent() -> None:
    config = copy.deepcopy(LLM)
    config["input"] = [
        {"name": "DELAY_MS", "data_type": "TYPE_FP32", "dims": [1], "optional": True},
        {"name": "TOKENS", "data_type": "TYPE_INT32", "dims": [1], "optional": True},
    ]
    plan = plan_nudge("simgpu", config)
    assert isinstance(plan, NudgePlan)
    assert json.loads(plan.body)["inputs"] == [
        {"name": "DELAY_MS", "shape": [1, 1], "datatype": "FP32", "data": [0.0]}
    ]
    config["input"] = []
    assert plan_nudge("m", config) == "no input"


def test_inputs_are_zeros_of_the_least_shape_and_optional_ones_are_left_out() -> None:
    config = copy.deepcopy(LLM)
    config["max_batch_size"] = 0  # no batch dimension
    config["input"] = [
        {"name": "ids", "data_type": "TYPE_INT64", "dims": [-1, 3]},
        {"name": "text", "data_type": "TYPE_STRING", "dims": [2]},
        {"name": "flag", "data_type": "TYPE_BOOL", "dims": [1]},
        {"name": "scale", "data_type": "TYPE_FP32", "dims": [1], "optional": True},
    ]
    plan = plan_nudge("m", config)
    assert isinstance(plan, NudgePlan)
    assert json.loads(plan.body)["inputs"] == [
        {"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": [0, 0, 0]},
        {"name": "text", "shape": [2], "datatype": "BYTES", "data": ["", ""]},
        {"name": "flag", "shape": [1], "datatype": "BOOL", "data": [False]},
    ]


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ({"name": "s", "data_type": "TYPE_INT32", "dims": [1], "is_shape_tensor": True}, "shape"),
        ({"name": "b", "data_type": "TYPE_BF16", "dims": [1]}, "cannot be sent"),
        ({"name": "img", "data_type": "TYPE_FP32", "dims": [3, 224, 224]}, f"{MAX_ELEMENTS}"),
    ],
)
def test_inputs_a_nudge_cannot_carry_cheaply_mean_no_nudge(spec: dict[str, Any], why: str) -> None:
    config = copy.deepcopy(LLM)
    config["input"] = [spec]
    plan = plan_nudge("m", config)
    assert isinstance(plan, str) and why in plan


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (503, b'{"error":"Request timeout expired"}', NudgeOutcome.REJECTED),
        (503, b'{"error":"Exceeds maximum queue size"}', NudgeOutcome.FAILED),
        (200, b"{}", NudgeOutcome.RAN),
        (400, b'{"error":"unexpected shape"}', NudgeOutcome.REFUSED),
        (500, b"", NudgeOutcome.FAILED),
        (None, b"", NudgeOutcome.FAILED),
    ],
)
def test_the_answer_says_what_happened(status: int | None, body: bytes, outcome: Any) -> None:
    assert classify(status, body) is outcome
    assert outcome.stops == (outcome in (NudgeOutcome.RAN, NudgeOutcome.REFUSED))


def test_the_ledger_takes_waiting_nudges_off_the_depth_and_never_below_zero() -> None:
    ledger = NudgeLedger()
    for _ in range(3):
        ledger.sent("t0", "llm")
    ledger.answered("t0", "llm")
    assert ledger.waiting("t0", "llm") == 2
    scraped = TritonCounters(pending=7, success=5, failure=1)
    assert ledger.discount("t0", "llm", scraped) == TritonCounters(pending=5, success=5, failure=1)
    assert ledger.discount("t0", "llm", TritonCounters(pending=1)).pending == 0
    assert ledger.discount("t1", "llm", scraped) is scraped  # another endpoint: none of ours
    ledger.answered("t0", "llm")
    ledger.answered("t0", "llm")
    ledger.answered("t0", "llm")  # one answer too many (a bug elsewhere) cannot go negative
    assert ledger.waiting("t0", "llm") == 0


def test_a_nudge_is_due_once_after_requests_end_and_per_endpoint() -> None:
    ledger = NudgeLedger()
    assert not ledger.due("t0", "llm")  # nothing ended: no batch end to follow
    ledger.ended("llm")
    ledger.ended("llm")  # two ends between ticks (one batch): one nudge
    assert ledger.due("t0", "llm") and ledger.due("t1", "llm") and not ledger.due("t0", "x")
    ledger.sent("t0", "llm")
    assert not ledger.due("t0", "llm") and ledger.due("t1", "llm")
    ledger.answered("t0", "llm")
    assert not ledger.due("t0", "llm")  # an answer is no end of a request
    ledger.ended("llm")
    assert ledger.due("t0", "llm")


def test_rejected_failures_are_not_completions() -> None:
    page = (
        'nv_inference_request_success{model="llm",version="1"} 10\n'
        'nv_inference_request_failure{model="llm",reason="REJECTED",version="1"} 500\n'
        'nv_inference_request_failure{model="llm",reason="BACKEND",version="1"} 2\n'
        'nv_inference_request_failure{model="llm",reason="CANCELED",version="1"} 1\n'
    )
    counters = parse_triton_metrics(page)["llm"]
    assert (counters.success, counters.failure) == (10, 3)


def load(endpoint: str, model: str, depth: int) -> ModelLoad:
    return ModelLoad(endpoint, model, depth, 0.0, 0.0, 0.0, 0.0)


def test_a_model_is_busy_where_it_queues_or_everywhere_while_requests_are_in_flight() -> None:
    models = {
        "a": (load("t0", "a", 0), load("t1", "a", 2)),
        "b": (load("t0", "b", 0), load("t1", "b", 0)),
        "c": (load("t0", "c", 0),),
    }
    in_flight = {"a": 0, "b": 3}.get
    assert busy_pairs(models, in_flight) == [("t1", "a"), ("t0", "b"), ("t1", "b")]
