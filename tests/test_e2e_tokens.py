"""Issue 4 §5 on the real stack: LLM token accounting through Envoy's ext_proc filter.

Real Envoy (the shipped ext_proc bootstrap), Triton running the simulated LLMs of
examples/triton (which stop early when a request's `eos_after_tokens` parameter says so, as a
real model stops at its end-of-sequence before max_tokens), Valkey, the sidecar as its own
process. A tenant's token bucket is charged the estimate (prompt + max tokens) at admission and
made good with the tokens Triton really generated, for plain and for streamed responses.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.stack import LocalStack
from tests.binaries import require_binaries
from tests.stack_client import Reply, metric_value, post, wait_for

pytestmark = pytest.mark.stack
BURST = 2000  # the tenant's token bucket; it refills at 1 token per second, nearly not at all
KEY = "k-chat"


def write_policy(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    (directory / "policy.yaml").write_text(
        f"""
classes:
  interactive: {{rank: 1, latency_objective_ms: 2000, max_wait_ms: 100, triton_priority: 1}}
models:
  llm:
    cost_per_request: 600
    tokens: {{prompt_tokens: PROMPT_TOKENS, max_tokens: OUTPUT_TOKENS, output_tokens: OUT_TOKENS}}
  llm_stream:
    cost_per_request: 600
    tokens: {{prompt_tokens: PROMPT_TOKENS, max_tokens: OUTPUT_TOKENS, output_tokens: OUT_TOKENS}}
tenants:
  chat:
    match: {{api_key_sha256: [{digest}]}}
    allowed_classes: [interactive]
    default_class: interactive
    buckets:
    - {{unit: cost, rate: 1, per: second, burst: {BURST}}}
"""
    )
    return directory


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    require_binaries("envoy", "triton", "valkey")
    work = tmp_path_factory.mktemp("tokens")
    with LocalStack(work, write_policy(work / "policies"), modes=("extproc",)) as running:
        yield running


def admin(stack: LocalStack) -> str:
    assert stack.sidecar is not None
    return stack.sidecar.admin_url


def llm(stack: LocalStack, prompt: int, max_tokens: int, eos_after: int) -> Reply:
    body = {
        "inputs": [
            {"name": "PROMPT_TOKENS", "shape": [1, 1], "datatype": "INT32", "data": [prompt]},
            {"name": "OUTPUT_TOKENS", "shape": [1, 1], "datatype": "INT32", "data": [max_tokens]},
        ],
        "parameters": {"eos_after_tokens": eos_after},
    }
    return post(stack.url("extproc") + "/v2/models/llm/infer", body, {"x-api-key": KEY})


def accounted(stack: LocalStack, result: str) -> float:
    return metric_value(admin(stack), "qos_token_accounting_total", result=result)


def test_estimates_are_charged_and_reconciled_with_real_usage(stack: LocalStack) -> None:
    # Estimate 500 + 1000 = 1500 of the 2000; the model stops after 50 tokens, so 550 is used.
    first = llm(stack, 500, 1000, 50)
    assert first.status == 200, first.body
    out = {o["name"]: o["data"] for o in first.json()["outputs"]}
    assert out["OUT_TOKENS"] == [50]
    wait_for(lambda: accounted(stack, "reconciled") >= 1, 10, "the first request reconciled")
    generated = metric_value(admin(stack), "qos_tokens_total", tenant="chat", kind="generated")
    assert generated == 50

    # Only the refund of 950 makes room for a second estimate of 1400 (2000 - 1500 < 1400).
    second = llm(stack, 500, 900, 50)
    assert second.status == 200, second.body
    wait_for(lambda: accounted(stack, "reconciled") >= 2, 10, "the second request reconciled")

    # 2000 - 550 - 550 = 900 left: the estimate (not the smaller real use) is what must fit.
    third = llm(stack, 500, 900, 50)
    assert third.status == 429, third.body
    assert third.json()["limit"] == "cost" and int(third.headers["retry-after"]) >= 400

    # Every lease came back through the access log, though these were decided on the body.
    assert stack.sidecar is not None
    wait_for(
        lambda: metric_value(admin(stack), "qos_completions_total", result="released") >= 2,
        10,
        "leases released by the access log",
    )


def test_a_streamed_response_is_reconciled_from_its_events(stack: LocalStack) -> None:
    before = metric_value(admin(stack), "qos_tokens_total", tenant="chat", kind="generated")
    reconciled = accounted(stack, "reconciled")
    body = {"PROMPT_TOKENS": 100, "OUTPUT_TOKENS": 300, "parameters": {"eos_after_tokens": 20}}
    reply = post(
        stack.url("extproc") + "/v2/models/llm_stream/generate_stream", body, {"x-api-key": KEY}
    )
    assert reply.status == 200, reply.body
    events = [json.loads(line[5:]) for line in reply.body.splitlines() if line.startswith(b"data:")]
    assert sum(e["OUT_TOKENS"] for e in events) == 20 and len(events) >= 3
    wait_for(lambda: accounted(stack, "reconciled") > reconciled, 10, "the stream reconciled")
    after = metric_value(admin(stack), "qos_tokens_total", tenant="chat", kind="generated")
    assert after - before == 20


def test_a_request_that_could_never_fit_is_400(stack: LocalStack) -> None:
    reply = llm(stack, 1500, 1000, 10)
    assert reply.status == 400
    assert reply.json()["reason"] == "cost_over_burst" and reply.json()["limit"] == "cost"
