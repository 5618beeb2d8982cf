"""Issue 4 §5 and issue 9 §2 on the real stack: LLM token accounting through Envoy's ext_proc
filter, and the ways around it closed (binary tensors, gzip, duplicate keys, unreadable
bodies, requests Triton refuses).

Real Envoy (the shipped ext_proc bootstrap), Triton running the simulated LLMs of
examples/triton (which stop early when a request's `eos_after_tokens` parameter says so, as a
real model stops at its end-of-sequence before max_tokens), Valkey, the sidecar as its own
process. A tenant's token bucket is charged the estimate (prompt + max tokens) at admission and
made good with the tokens Triton really generated, for plain and for streamed responses.
"""

from __future__ import annotations

import gzip
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton_http

from devstack.stack import LocalStack
from tests.binaries import require_binaries
from tests.stack_client import Reply, key_digest, metric_value, post, wait_for, write_policy_file

pytestmark = [pytest.mark.stack, pytest.mark.faults]
BURST = 2000  # the tenant's token bucket; it refills at 1 token per second, nearly not at all
KEY = "k-chat"
# Issue 9 §2: one tenant per bypass, each with its own cost bucket (burst, refilled at
# 1 unit per second), so that what one test charged cannot change what another sees.
PROBES = {"binary": 31000, "gzip": 31000, "duplicate": 31000, "rejected": 1000, "maxed": 5000}


def _probe_tenants() -> str:
    return "".join(
        f"""
  {name}:
    match: {{api_key_sha256: [{key_digest(f"k-{name}")}]}}
    allowed_classes: [interactive]
    default_class: interactive
    buckets:
    - {{unit: cost, rate: 1, per: second, burst: {burst}}}"""
        for name, burst in PROBES.items()
    )


def write_policy(directory: Path) -> Path:
    digest = key_digest(KEY)
    return write_policy_file(
        directory,
        f"""
classes:
  interactive: {{rank: 1, latency_objective_ms: 2000, max_wait_ms: 100, triton_priority: 1}}
models:
  llm:
    cost_per_request: 600
    tokens:
      prompt_tokens: PROMPT_TOKENS
      max_tokens: OUTPUT_TOKENS
      output_tokens: OUT_TOKENS
      unreadable: charge_max
  llm_stream:
    cost_per_request: 600
    tokens: {{prompt_tokens: PROMPT_TOKENS, max_tokens: OUTPUT_TOKENS, output_tokens: OUT_TOKENS}}
tenants:
  chat:
    match: {{api_key_sha256: [{digest}]}}
    allowed_classes: [interactive]
    default_class: interactive
    buckets:
    - {{unit: cost, rate: 1, per: second, burst: {BURST}}}{_probe_tenants()}
""",
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    require_binaries("envoy", "triton", "valkey")
    work = tmp_path_factory.mktemp("tokens")
    with LocalStack(work, write_policy(work / "policies"), modes=("extproc",)) as running:
        yield running


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
    return metric_value(stack.admin_url, "qos_token_accounting_total", result=result)


def test_estimates_are_charged_and_reconciled_with_real_usage(stack: LocalStack) -> None:
    # Estimate 500 + 1000 = 1500 of the 2000; the model stops after 50 tokens, so 550 is used.
    first = llm(stack, 500, 1000, 50)
    assert first.status == 200, first.body
    out = {o["name"]: o["data"] for o in first.json()["outputs"]}
    assert out["OUT_TOKENS"] == [50]
    wait_for(lambda: accounted(stack, "reconciled") >= 1, 10, "the first request reconciled")
    generated = metric_value(stack.admin_url, "qos_tokens_total", tenant="chat", kind="generated")
    assert generated == 50
    per_model = {"tenant": "chat", "model": "llm", "kind": "generated"}
    assert metric_value(stack.admin_url, "qos_usage_tokens_total", **per_model) == 50

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
        lambda: metric_value(stack.admin_url, "qos_completions_total", result="released") >= 2,
        10,
        "leases released by the access log",
    )


def test_a_streamed_response_is_reconciled_from_its_events(stack: LocalStack) -> None:
    before = metric_value(stack.admin_url, "qos_tokens_total", tenant="chat", kind="generated")
    reconciled = accounted(stack, "reconciled")
    body = {"PROMPT_TOKENS": 100, "OUTPUT_TOKENS": 300, "parameters": {"eos_after_tokens": 20}}
    reply = post(
        stack.url("extproc") + "/v2/models/llm_stream/generate_stream", body, {"x-api-key": KEY}
    )
    assert reply.status == 200, reply.body
    events = [json.loads(line[5:]) for line in reply.body.splitlines() if line.startswith(b"data:")]
    assert sum(e["OUT_TOKENS"] for e in events) == 20 and len(events) >= 3
    wait_for(lambda: accounted(stack, "reconciled") > reconciled, 10, "the stream reconciled")
    after = metric_value(stack.admin_url, "qos_tokens_total", tenant="chat", kind="generated")
    assert after - before == 20


def test_a_request_that_could_never_fit_is_400(stack: LocalStack) -> None:
    reply = llm(stack, 1500, 1000, 10)
    assert reply.status == 400
    assert reply.json()["reason"] == "cost_over_burst" and reply.json()["limit"] == "cost"


# -- issue 9 §2: token accounting cannot be bypassed ---------------------------------------------


def post_bytes(url: str, body: bytes, headers: dict[str, str]) -> Reply:
    """POST `body` as it is (binary tensors, gzip); any status comes back as a Reply."""
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return Reply(response.status, dict(response.headers.items()), response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return Reply(exc.code, dict(exc.headers.items()), exc.read())


def binary_llm_body(prompt: int, max_tokens: int, eos_after: int) -> tuple[bytes, dict[str, str]]:
    """What tritonclient sends by default: the inputs as binary tensors after a JSON header."""
    inputs = []
    for name, value in (("PROMPT_TOKENS", prompt), ("OUTPUT_TOKENS", max_tokens)):
        tensor = triton_http.InferInput(name, [1, 1], "INT32")
        tensor.set_data_from_numpy(np.array([[value]], dtype=np.int32))
        inputs.append(tensor)
    body, json_size = triton_http.InferenceServerClient.generate_request_body(
        inputs, parameters={"eos_after_tokens": eos_after}
    )
    assert json_size is not None
    return body, {"inference-header-content-length": str(json_size)}


def tokens_of(stack: LocalStack, tenant: str, kind: str) -> float:
    return metric_value(stack.admin_url, "qos_tokens_total", tenant=tenant, kind=kind)


def llm_as(stack: LocalStack, tenant: str, prompt: int, max_tokens: int, eos: object) -> Reply:
    body = {
        "inputs": [
            {"name": "PROMPT_TOKENS", "shape": [1, 1], "datatype": "INT32", "data": [prompt]},
            {"name": "OUTPUT_TOKENS", "shape": [1, 1], "datatype": "INT32", "data": [max_tokens]},
        ],
        "parameters": {"eos_after_tokens": eos},
    }
    return post(stack.url("extproc") + "/v2/models/llm/infer", body, {"x-api-key": f"k-{tenant}"})


@pytest.mark.parametrize("tenant", ["binary", "gzip"])
def test_binary_and_gzip_bodies_pay_their_real_estimate(stack: LocalStack, tenant: str) -> None:
    """The issue's case: a 30,000-token prompt in tritonclient's binary tensors (or gzipped)
    paid the flat 600 of cost_per_request. Now it pays its estimate, 30,100 of 31,000."""
    body, headers = binary_llm_body(30000, 100, 10)
    if tenant == "gzip":
        body = gzip.compress(body)
        headers["content-encoding"] = "gzip"
    url = stack.url("extproc") + "/v2/models/llm/infer"
    reply = post_bytes(url, body, {**headers, "x-api-key": f"k-{tenant}"})
    assert reply.status == 200, reply.body
    assert tokens_of(stack, tenant, "prompt") == 30000
    wait_for(lambda: tokens_of(stack, tenant, "generated") == 10, 10, "the binary response metered")
    # 31,000 - (30,000 + 10) leaves 990: a request estimated at 1,100 no longer fits (with
    # the flat 600 charged it would have).
    assert llm_as(stack, tenant, 500, 600, 10).status == 429


def test_a_duplicate_key_body_is_charged_for_the_copy_triton_runs(stack: LocalStack) -> None:
    """Triton runs the first of two "inputs" (30,000 prompt tokens); the sidecar used to
    estimate the last (1 token). Now it reads the first, as Triton does."""
    first = json.dumps(binary_free_inputs(30000, 10))
    second = json.dumps(binary_free_inputs(1, 10))
    body = f'{{"inputs":{first},"inputs":{second}}}'.encode()
    url = stack.url("extproc") + "/v2/models/llm/infer"
    headers = {"x-api-key": "k-duplicate", "content-type": "application/json"}
    reply = post_bytes(url, body, headers)
    assert reply.status == 200, reply.body
    assert tokens_of(stack, "duplicate", "prompt") == 30000
    # 31,000 - 30,010 leaves 990: 1,100 more does not fit.
    wait_for(lambda: tokens_of(stack, "duplicate", "generated") == 10, 10, "metered")
    assert llm_as(stack, "duplicate", 500, 600, 10).status == 429


def test_triton_runs_the_first_copy_of_a_duplicate_parameter(stack: LocalStack) -> None:
    """The fact the rule above rests on: Triton (rapidjson) takes a duplicated key's first
    value. eos_after_tokens 3, then 4: the model stopped after 3."""
    body = (
        b'{"PROMPT_TOKENS":10,"OUTPUT_TOKENS":5,'
        b'"parameters":{"eos_after_tokens":3,"eos_after_tokens":4}}'
    )
    url = stack.url("extproc") + "/v2/models/llm_stream/generate_stream"
    reply = post_bytes(url, body, {"x-api-key": KEY, "content-type": "application/json"})
    assert reply.status == 200, reply.body
    events = [json.loads(line[5:]) for line in reply.body.splitlines() if line.startswith(b"data:")]
    assert sum(e["OUT_TOKENS"] for e in events) == 3


def test_unreadable_bodies_are_refused_with_a_json_reason(stack: LocalStack) -> None:
    """llm_stream keeps the default, tokens.unreadable: refuse."""
    refused = accounted(stack, "refused_unreadable")
    url = stack.url("extproc") + "/v2/models/llm_stream/generate_stream"
    headers = {"x-api-key": KEY, "content-type": "application/json"}
    reply = post_bytes(url, b'{"PROMPT_TOKENS": [1, ', headers)
    assert reply.status == 400, reply.body
    assert reply.json()["reason"] == "unreadable_body"
    assert reply.json()["message"] == "body is not JSON"
    # An encoding Triton does not read either: 415.
    reply = post_bytes(url, b"{}", {**headers, "content-encoding": "br"})
    assert reply.status == 415, reply.body
    assert reply.json()["reason"] == "unsupported_encoding"
    wait_for(lambda: accounted(stack, "refused_unreadable") - refused == 2, 10, "both counted")


def test_charge_max_charges_an_unreadable_body_the_buckets_burst(stack: LocalStack) -> None:
    """llm's policy says charge_max. A gzip body that inflates past the sidecar's 8 MiB cap
    is one Triton runs (it inflates it whole) but the sidecar will not read: it is admitted
    and takes the tenant's whole burst of 5,000, not a flat 600."""
    inputs = binary_free_inputs(10, 5)
    padded = json.dumps({"inputs": inputs, "parameters": {"eos_after_tokens": 2}}).encode()
    padded = padded[:-1] + b" " * (9 << 20) + b"}"  # whitespace: valid JSON, 9 MiB of it
    url = stack.url("extproc") + "/v2/models/llm/infer"
    headers = {"x-api-key": "k-maxed", "content-encoding": "gzip"}
    charged = accounted(stack, "charged_max")
    reply = post_bytes(url, gzip.compress(padded), headers)
    assert reply.status == 200, reply.body
    assert reply.json()["outputs"]  # Triton ran it
    wait_for(lambda: accounted(stack, "charged_max") > charged, 10, "charged the max")
    # The response said no prompt count, so the charge stands: 110 more does not fit.
    assert llm_as(stack, "maxed", 100, 10, 10).status == 429


def binary_free_inputs(prompt: int, max_tokens: int) -> list[dict[str, object]]:
    return [
        {"name": "PROMPT_TOKENS", "shape": [1, 1], "datatype": "INT32", "data": [prompt]},
        {"name": "OUTPUT_TOKENS", "shape": [1, 1], "datatype": "INT32", "data": [max_tokens]},
    ]


def test_a_request_triton_refuses_gets_its_charge_back(stack: LocalStack) -> None:
    """The simulated llm refuses a non-integer eos_after_tokens with 400: the 950 it was
    charged come back whole, so the next 950 fits the tenant's 1,000 again."""
    refunded = accounted(stack, "refunded_rejected")
    rejected = llm_as(stack, "rejected", 900, 50, "not a number")
    assert rejected.status == 400, rejected.body
    wait_for(lambda: accounted(stack, "refunded_rejected") > refunded, 10, "the refund")
    assert llm_as(stack, "rejected", 900, 50, 10).status == 200
