"""Token accounting in the ext_proc adapter, in process against the in-memory store with a
frozen clock, so every bucket level is exact: a request to a model with a token policy is
decided on its body (its prompt and max tokens are its cost), and the response it gets makes
that estimate good. The real-stack version is in test_e2e_tokens.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from dataclasses import replace
from types import MappingProxyType
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.http as triton_http
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from prometheus_client import CollectorRegistry

from sidecar.core.compiled import CompiledPolicy, compile_policy
from sidecar.core.tokens import MAX_JSON_BYTES
from sidecar.core.types import BucketCheck, QuotaCheck
from sidecar.metrics import UNKNOWN, Metrics
from sidecar.policy.model import ModelPolicy, TokenPolicy, UnreadableBody
from sidecar.service import AdmissionService
from sidecar.state.memory import MemoryQuotaStore
from tests.core_fixtures import make_policy
from tests.test_adapters import sample
from tests.test_ext_proc import (
    JSON,
    body_message,
    headers_message,
    lease_of,
    send_all,
    set_headers,
    with_ext_proc,
)

LLM = "/v2/models/llm/infer"
STREAM = "/v2/models/llm/generate_stream"
SEARCH = {"x-api-key": "k-search", "x-qos-class": "interactive", **JSON}
BURST = 4000.0  # the search tenant's `tokens` bucket (core_fixtures), 1000 per second
TOKENS = TokenPolicy(
    prompt_tokens="PROMPT_TOKENS", max_tokens="OUTPUT_TOKENS", output_tokens="OUT_TOKENS"
)
MODE = processing_mode_pb2.ProcessingMode


def make_service(tokens: TokenPolicy = TOKENS) -> AdmissionService:
    policy = make_policy()
    policy = replace(policy, models=MappingProxyType({"llm": ModelPolicy("llm", 600.0, tokens)}))
    store = MemoryQuotaStore(clock=lambda: 1000.0)  # frozen: buckets never refill
    return AdmissionService(policy, store, Metrics(CollectorRegistry()))


def llm_body(prompt: int, output: int) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {"name": "PROMPT_TOKENS", "datatype": "INT32", "shape": [1, 1], "data": [prompt]},
                {"name": "OUTPUT_TOKENS", "datatype": "INT32", "shape": [1, 1], "data": [output]},
            ]
        }
    ).encode()


def tokens_left(service: AdmissionService) -> float:
    """What the search tenant's token bucket holds now (to the unit)."""

    async def fits(cost: float) -> bool:
        check = QuotaCheck(
            "search", "interactive", (BucketCheck("tokens", 1000.0, BURST, cost),), None, None, 60
        )
        return (await service.store.peek(check)).allowed

    async def search() -> float:
        low, high = 0.0, BURST
        while high - low > 0.5:
            middle = (low + high) / 2
            low, high = (middle, high) if await fits(middle) else (low, middle)
        return round(low)

    return asyncio.run(search())


def response_headers(status: int) -> Any:
    return ep.ProcessingRequest(
        response_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=":status", raw_value=str(status).encode())]
            )
        )
    )


def response_body(body: bytes, end_of_stream: bool = True) -> Any:
    return ep.ProcessingRequest(response_body=ep.HttpBody(body=body, end_of_stream=end_of_stream))


def converse(service: AdmissionService, *messages: Any, cancel: bool = False) -> list[Any]:
    """One stream: each message and its answer; then end it as Envoy does, or reset it."""
    answers: list[Any] = []

    async def body(stub: Any, _: Any) -> None:
        call = stub.Process()
        if cancel:
            for message in messages:
                await call.write(message)
                answers.append(await call.read())
            call.cancel()
        else:
            answers.extend(await send_all(call, messages))
        # The settlement runs as the stream ends; give it its turn.
        for _ in range(50):
            await asyncio.sleep(0.01)

    asyncio.run(with_ext_proc(service, body))
    return answers


def test_headers_wait_for_the_body_and_ask_for_the_response() -> None:
    service = make_service()
    (answer,) = converse(service, headers_message(SEARCH, path=LLM))
    assert answer.WhichOneof("response") == "request_headers"
    assert not answer.request_headers.response.header_mutation.set_headers  # not decided yet
    assert answer.mode_override.request_body_mode == MODE.BUFFERED
    assert answer.mode_override.response_header_mode == MODE.SEND
    assert answer.mode_override.response_body_mode == MODE.STREAMED
    assert asyncio.run(service.store.in_flight("search", None)) == 0


def test_the_estimate_is_charged_then_made_good_by_the_response() -> None:
    service = make_service()
    answers = converse(
        service,
        headers_message(SEARCH, path=LLM),
        body_message(llm_body(500, 1000)),
    )
    decided = answers[1].request_body.response
    headers = set_headers(decided.header_mutation)
    assert headers["x-qos-granted-class"] == "interactive" and lease_of(answers[1])
    assert decided.clear_route_cache  # route priority may depend on the decision headers
    assert json.loads(decided.body_mutation.body)["parameters"] == {"priority": 1}
    # No response seen (the stream ended first): the whole estimate stands.
    assert tokens_left(service) == BURST - 1500
    assert sample(service, "qos_token_accounting_total", result="estimated") == 1
    assert sample(service, "qos_token_accounting_total", result="unfinished") == 1

    service = make_service()
    output = json.dumps({"outputs": [{"name": "OUT_TOKENS", "data": [100]}]}).encode()
    converse(
        service,
        headers_message(SEARCH, path=LLM),
        body_message(llm_body(500, 1000)),
        response_headers(200),
        response_body(output[:7], end_of_stream=False),
        response_body(output[7:]),
    )
    # 500 prompt + 100 generated: 900 of the 1500 charged come back.
    assert tokens_left(service) == BURST - 600
    labels = {"tenant": "search", "class": "interactive"}
    assert sample(service, "qos_tokens_total", kind="prompt", **labels) == 500
    assert sample(service, "qos_tokens_total", kind="max", **labels) == 1000
    assert sample(service, "qos_tokens_total", kind="generated", **labels) == 100
    assert sample(service, "qos_token_accounting_total", result="reconciled") == 1
    usage = {"tenant": "search", "model": "llm"}  # per tenant and model (docs/usage.md)
    assert sample(service, "qos_usage_tokens_total", kind="prompt", **usage) == 500
    assert sample(service, "qos_usage_tokens_total", kind="generated", **usage) == 100


def test_a_streamed_response_is_counted_event_by_event_even_when_cut_short() -> None:
    service = make_service()
    event = b'data: {"model_name":"llm","OUT_TOKENS":8}\n\n'
    converse(
        service,
        headers_message(SEARCH, path=STREAM),
        body_message(json.dumps({"PROMPT_TOKENS": 100, "OUTPUT_TOKENS": 400}).encode()),
        response_headers(200),
        response_body(event * 2, end_of_stream=False),
        response_body(event[:9], end_of_stream=False),
        cancel=True,  # the client went away mid-stream
    )
    assert tokens_left(service) == BURST - (100 + 16)


def test_a_request_triton_refuses_gets_its_whole_charge_back() -> None:
    service = make_service()
    converse(
        service,
        headers_message(SEARCH, path=LLM),
        body_message(llm_body(300, 700)),
        response_headers(400),
        response_body(b'{"error":"bad input"}'),
    )
    assert tokens_left(service) == BURST  # it never ran: prompt and max tokens refunded
    assert sample(service, "qos_token_accounting_total", result="refunded_rejected") == 1


def test_a_server_error_generated_nothing_but_the_prompt_stands() -> None:
    service = make_service()
    converse(
        service,
        headers_message(SEARCH, path=LLM),
        body_message(llm_body(300, 700)),
        response_headers(500),
        response_body(b'{"error":"model crashed"}'),
    )
    assert tokens_left(service) == BURST - 300


def test_a_request_costing_more_than_the_burst_is_400_not_429() -> None:
    service = make_service()
    answers = converse(
        service, headers_message(SEARCH, path=LLM), body_message(llm_body(3000, 2000))
    )
    reply = answers[1].immediate_response
    assert reply.status.code == 400
    assert json.loads(reply.body)["reason"] == "cost_over_burst"
    assert json.loads(reply.body)["limit"] == "tokens"
    assert tokens_left(service) == BURST  # nothing taken


def test_over_the_bucket_is_429_decided_on_the_body() -> None:
    service = make_service()
    standard = {**SEARCH, "x-qos-class": "standard"}  # interactive allows 2 in flight only
    for _ in range(2):
        converse(service, headers_message(standard, path=LLM), body_message(llm_body(1000, 1000)))
    answers = converse(
        service, headers_message(standard, path=LLM), body_message(llm_body(1000, 1000))
    )
    reply = answers[1].immediate_response
    assert reply.status.code == 429
    assert json.loads(reply.body)["limit"] == "tokens"
    assert (
        dict((h.header.key, h.header.raw_value) for h in reply.headers.set_headers)["retry-after"]
        == b"2"
    )  # 2000 tokens at 1000 per second


@pytest.mark.parametrize(
    ("body", "headers", "status", "reason"),
    [
        (b"not json", {}, 400, "unreadable_body"),
        (b'{"inputs":[]}', {}, 400, "unreadable_body"),  # no prompt
        (llm_body(500, 100), {"content-encoding": "br"}, 415, "unsupported_encoding"),
        (gzip.compress(b" " * (MAX_JSON_BYTES + 1)), {"content-encoding": "gzip"}, 400,
         "unreadable_body"),
    ],
)  # fmt: skip
def test_an_unreadable_body_is_refused_by_default(
    body: bytes, headers: dict[str, str], status: int, reason: str
) -> None:
    service = make_service()
    answers = converse(
        service, headers_message({**SEARCH, **headers}, path=LLM), body_message(body)
    )
    reply = answers[1].immediate_response
    assert reply.status.code == status
    assert json.loads(reply.body)["reason"] == reason
    assert tokens_left(service) == BURST  # nothing taken
    assert sample(service, "qos_token_accounting_total", result="refused_unreadable") == 1
    assert sample(service, "qos_decisions_total", **decision_labels(reason)) == 1


def decision_labels(reason: str) -> dict[str, str]:
    return {
        "outcome": "shed",
        "reason": reason,
        "tenant": UNKNOWN,
        "class": UNKNOWN,
        "shadow": "false",
    }


def test_charge_max_admits_an_unreadable_body_at_the_buckets_burst() -> None:
    service = make_service(replace(TOKENS, unreadable=UnreadableBody.CHARGE_MAX))
    answers = converse(
        service,
        headers_message(SEARCH, path=LLM),
        body_message(b"not json"),
        response_headers(200),
        response_body(b'{"OUT_TOKENS": 3}'),  # no prompt count: the charge stands
    )
    assert lease_of(answers[1])
    assert tokens_left(service) == 0  # the whole burst: no flat cost_per_request
    assert sample(service, "qos_token_accounting_total", result="charged_max") == 1
    assert sample(service, "qos_token_accounting_total", result="no_usage") == 1


def test_charge_max_is_made_good_when_the_response_reports_the_prompt() -> None:
    tokens = replace(
        TOKENS, unreadable=UnreadableBody.CHARGE_MAX, response_prompt_tokens="num_input_tokens"
    )
    service = make_service(tokens)
    converse(
        service,
        headers_message(SEARCH, path=LLM),
        body_message(b"not json"),
        response_headers(200),
        response_body(b'{"OUT_TOKENS": 30, "num_input_tokens": 470}'),
    )
    assert tokens_left(service) == BURST - 500


def test_the_prompt_is_reconciled_with_the_responses_count() -> None:
    service = make_service(replace(TOKENS, response_prompt_tokens="PROMPT_USED"))
    output = {
        "outputs": [
            {"name": "OUT_TOKENS", "data": [100]},
            {"name": "PROMPT_USED", "data": [1200]},  # the client said 300
        ]
    }
    converse(
        service,
        headers_message(SEARCH, path=LLM),
        body_message(llm_body(300, 100)),
        response_headers(200),
        response_body(json.dumps(output).encode()),
    )
    assert tokens_left(service) == BURST - 1300


def test_binary_and_gzip_bodies_are_charged_their_estimate() -> None:
    prompt = triton_http.InferInput("PROMPT_TOKENS", [1, 1], "INT32")
    prompt.set_data_from_numpy(np.array([[2500]], dtype=np.int32))
    limit = triton_http.InferInput("OUTPUT_TOKENS", [1, 1], "INT32")
    limit.set_data_from_numpy(np.array([[100]], dtype=np.int32))
    body, json_size = triton_http.InferenceServerClient.generate_request_body([prompt, limit])
    headers = {**SEARCH, "inference-header-content-length": str(json_size)}
    for sent, extra in ((body, {}), (gzip.compress(body), {"content-encoding": "gzip"})):
        service = make_service()
        answers = converse(
            service, headers_message({**headers, **extra}, path=LLM), body_message(sent)
        )
        assert lease_of(answers[1])
        assert tokens_left(service) == BURST - 2600


def test_models_without_a_token_policy_are_decided_on_the_headers() -> None:
    service = make_service()
    answers = converse(
        service,
        headers_message(SEARCH, path="/v2/models/simgpu/infer"),
        body_message(b'{"inputs":[]}'),
    )
    assert lease_of(answers[0])
    assert not answers[0].HasField("mode_override")


def test_tokens_are_counted_for_a_tenant_without_a_cost_bucket() -> None:
    service = make_service()
    analytics = {"x-api-key": "k-analytics", **JSON}  # a requests bucket only
    output = json.dumps({"outputs": [{"name": "OUT_TOKENS", "data": [42]}]}).encode()
    converse(
        service,
        headers_message(analytics, path=LLM),
        body_message(llm_body(200, 300)),
        response_headers(200),
        response_body(output),
    )
    labels = {"tenant": "analytics", "class": "batch"}
    assert sample(service, "qos_tokens_total", kind="max", **labels) == 300
    assert sample(service, "qos_tokens_total", kind="generated", **labels) == 42
    assert sample(service, "qos_token_accounting_total", result="reconciled") == 1


def test_a_stream_keeps_the_policy_it_started_with() -> None:
    """A reload between the headers and the body changes nothing for the request: its token
    policy and its decision come from the snapshot taken at its headers."""

    class Reloaded:
        """A policy source reloaded by the test (as PolicyHolder is by SIGHUP)."""

        def __init__(self) -> None:
            self.current = compile_policy(make_service().policy)

        def snapshot(self) -> CompiledPolicy:
            return self.current

    source = Reloaded()
    service = AdmissionService(
        source, MemoryQuotaStore(clock=lambda: 1000.0), Metrics(CollectorRegistry())
    )
    answers: list[Any] = []

    async def body(stub: Any, _: Any) -> None:
        call = stub.Process()
        await call.write(headers_message(SEARCH, path=LLM))
        answers.append(await call.read())
        # The new policy knows neither the llm model's tokens nor the search tenant.
        without_search = make_policy()
        tenants = {k: v for k, v in without_search.tenants.items() if k != "search"}
        source.current = compile_policy(replace(without_search, tenants=MappingProxyType(tenants)))
        await call.write(body_message(llm_body(500, 1000)))
        answers.append(await call.read())
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF

    asyncio.run(with_ext_proc(service, body))
    headers = set_headers(answers[1].request_body.response.header_mutation)
    assert headers["x-qos-tenant"] == "search"
    assert tokens_left(service) == BURST - 1500  # the estimate, not a cost_per_request
