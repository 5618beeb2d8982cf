"""Issue 12 §2 on the real stack: a request that cannot meet its class's objective even alone
is recognised from its token estimate and the pace the model has shown, and refused at once
(`tokens.infeasible: refuse`) or relegated (`relegate`), before it takes any quota or any
place in Triton's batches (core/pace.py).

Real Envoy (the shipped ext_proc bootstrap), Triton running the simulated LLMs of
examples/triton (1 ms per decoded token alone, never faster: they sleep to each step's
deadline), Valkey, the sidecar as its own process. Nothing tells the sidecar the models'
speed: it learns their pace from the responses it settles.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devstack.stack import LocalStack
from sidecar.core.pace import MIN_SEEN
from tests.binaries import require_binaries
from tests.stack_client import Reply, key_digest, metric_value, post, wait_for, write_policy_file

pytestmark = [pytest.mark.stack]
KEY = "k-chat"
OBJECTIVE_MS = 300  # the interactive class's; 1,000 tokens take at least 1 s alone
LEARN_TOKENS = 150  # each learning request: about 155 ms alone, well inside the objective


def write_policy(directory: Path) -> Path:
    return write_policy_file(
        directory,
        f"""
classes:
  interactive:
    rank: 1
    latency_objective_ms: {OBJECTIVE_MS}
    max_wait_ms: 0
    triton_priority: 1
    relegate_to: bulk
  bulk: {{rank: 2, latency_objective_ms: 60000, max_wait_ms: 0, triton_priority: 2}}
models:
  llm:
    tokens:
      prompt_tokens: PROMPT_TOKENS
      max_tokens: OUTPUT_TOKENS
      output_tokens: OUT_TOKENS
      infeasible: refuse
  llm_stream:
    tokens:
      prompt_tokens: PROMPT_TOKENS
      max_tokens: OUTPUT_TOKENS
      output_tokens: OUT_TOKENS
      infeasible: relegate
tenants:
  chat:
    match: {{api_key_sha256: [{key_digest(KEY)}]}}
    allowed_classes: [interactive, bulk]
    default_class: interactive
    buckets:
    - {{unit: cost, rate: 100000, per: second, burst: 1000000}}
""",
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    require_binaries("envoy", "triton", "valkey")
    work = tmp_path_factory.mktemp("infeasible")
    with LocalStack(work, write_policy(work / "policies"), modes=("extproc",)) as running:
        yield running


def llm(stack: LocalStack, max_tokens: int) -> Reply:
    body = {
        "inputs": [
            {"name": "PROMPT_TOKENS", "shape": [1, 1], "datatype": "INT32", "data": [10]},
            {"name": "OUTPUT_TOKENS", "shape": [1, 1], "datatype": "INT32", "data": [max_tokens]},
        ]
    }
    return post(stack.url("extproc") + "/v2/models/llm/infer", body, {"x-api-key": KEY})


def stream(stack: LocalStack, max_tokens: int) -> Reply:
    body = {"PROMPT_TOKENS": 10, "OUTPUT_TOKENS": max_tokens}
    url = stack.url("extproc") + "/v2/models/llm_stream/generate_stream"
    return post(url, body, {"x-api-key": KEY})


def settled(stack: LocalStack) -> float:
    return metric_value(stack.admin_url, "qos_token_accounting_total", result="reconciled")


def triton_requests(stack: LocalStack, model: str) -> int:
    """Every request Triton finished for `model`, succeeded or failed, but those rejected in
    its queue: the sidecar's nudges are (sidecar/core/nudge.py), and no client request here."""
    assert stack.triton is not None
    with urllib.request.urlopen(stack.triton.metrics_url, timeout=5) as response:
        text = response.read().decode()
    pattern = rf'^nv_inference_request_(?:success|failure)\{{([^}}]*model="{model}"[^}}]*)\}} (\S+)'
    found = re.findall(pattern, text, re.M)
    return int(sum(float(v) for labels, v in found if 'reason="REJECTED"' not in labels))


def learn(stack: LocalStack, send: Callable[[LocalStack, int], Reply], count: int) -> None:
    """`count` feasible requests, each settled: the pace the sidecar reads."""
    for _ in range(count):
        before = settled(stack)
        reply = send(stack, LEARN_TOKENS)
        assert reply.status == 200, reply.body
        wait_for(lambda b=before: settled(stack) > b, 10, "the response settled")


def decisions(stack: LocalStack, **labels: str) -> float:
    return metric_value(stack.admin_url, "qos_decisions_total", tenant="chat", **labels)


def test_refused_at_once_once_the_model_has_shown_its_pace(stack: LocalStack) -> None:
    # No pace yet: nothing is assumed about the model, so the long request is served; its
    # response is the one long enough to judge the next such request by (core/pace.py).
    first = llm(stack, 1000)
    assert first.status == 200, first.body
    learn(stack, llm, MIN_SEEN)
    assert decisions(stack, reason="infeasible") == 0
    # The pace it learnt, on /metrics: never below the model's 1 ms per token floor.
    pace = metric_value(stack.admin_url, "qos_model_seconds_per_token", model="llm")
    assert 0.001 <= pace < OBJECTIVE_MS / 1000 / 200, pace

    served = triton_requests(stack, "llm")
    refused = llm(stack, 1000)
    assert refused.status == 422, refused.body
    body = refused.json()
    assert body["reason"] == "infeasible" and body["class"] == "interactive"
    assert "retry-after" not in refused.headers  # waiting does not make it fit
    most = body["most_max_tokens"]
    # The pace is at least 1 ms per token (the model's own floor), and the learning requests
    # showed it at most at their own elapsed time per token.
    assert 0 < most <= OBJECTIVE_MS, body
    assert decisions(stack, reason="infeasible", outcome="shed") == 1

    # What the refusal says the class can take is admitted.
    fits = llm(stack, most)
    assert fits.status == 200, fits.body
    # Triton ran the one that fits and never saw the refused one.
    wait_for(lambda: triton_requests(stack, "llm") >= served + 1, 10, "Triton counted it")
    assert triton_requests(stack, "llm") == served + 1


def test_relegated_to_the_class_relegate_to_names(stack: LocalStack) -> None:
    relegated = decisions(stack, reason="admitted_relegated", **{"class": "bulk"})
    # Short responses only (150 tokens): nothing as long as the next request was seen, so it
    # is judged by the longest responses' pace, which puts 1,000 tokens at over 1 s.
    learn(stack, stream, MIN_SEEN)
    long = stream(stack, 1000)
    assert long.status == 200, long.body
    events = [json.loads(line[5:]) for line in long.body.splitlines() if line.startswith(b"data:")]
    assert sum(e["OUT_TOKENS"] for e in events) == 1000  # served, in full
    after = decisions(stack, reason="admitted_relegated", **{"class": "bulk"})
    assert after == relegated + 1
    # A short one stays in its class.
    short = stream(stack, 20)
    assert short.status == 200
    assert decisions(stack, reason="admitted_relegated", **{"class": "bulk"}) == after
