"""Token estimates from request bodies and usage from responses (sidecar.core.tokens)."""

from __future__ import annotations

import json

import pytest

from sidecar.core.kserve import is_streamed
from sidecar.core.tokens import MAX_JSON_BYTES, UsageMeter, estimate
from sidecar.policy.model import TokenPolicy

COUNTS = TokenPolicy(
    prompt_tokens="PROMPT_TOKENS", max_tokens="OUTPUT_TOKENS", output_tokens="OUT_TOKENS"
)
TEXT = TokenPolicy(
    prompt_text="text_input",
    max_tokens="max_tokens",
    output_text="text_output",
    chars_per_token=4,
    default_max_tokens=64,
)


def infer_body(prompt: object, output: object) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {"name": "PROMPT_TOKENS", "datatype": "INT32", "shape": [1, 1], "data": prompt},
                {"name": "OUTPUT_TOKENS", "datatype": "INT32", "shape": [1, 1], "data": output},
            ]
        }
    ).encode()


def test_infer_inputs_give_prompt_and_max_tokens() -> None:
    found = estimate(COUNTS, {}, infer_body([500], [100]))
    assert not isinstance(found, str)
    assert (found.prompt_tokens, found.max_tokens, found.cost) == (500, 100, 600)
    assert "500 prompt tokens, 100 max tokens (asked)" in found.why


def test_rows_of_a_batch_add_up() -> None:
    found = estimate(COUNTS, {}, infer_body([[100], [200]], [[10], [30]]))
    assert not isinstance(found, str)
    assert (found.prompt_tokens, found.max_tokens) == (300, 40)


def test_weights_price_prompt_and_output_tokens_apart() -> None:
    policy = TokenPolicy(
        prompt_tokens="PROMPT_TOKENS",
        max_tokens="OUTPUT_TOKENS",
        output_tokens="OUT_TOKENS",
        prompt_weight=0.5,
        output_weight=2.0,
    )
    found = estimate(policy, {}, infer_body([500], [100]))
    assert not isinstance(found, str)
    assert found.cost == 0.5 * 500 + 2.0 * 100
    assert found.actual_cost(policy, 10) == 0.5 * 500 + 2.0 * 10


def test_generate_fields_and_parameters_are_read() -> None:
    body = {"text_input": "x" * 401, "parameters": {"max_tokens": 50, "temperature": 0.1}}
    found = estimate(TEXT, {}, json.dumps(body).encode())
    assert not isinstance(found, str)
    # 401 characters at 4 per token: 101 tokens (rounded up).
    assert (found.prompt_tokens, found.max_tokens, found.cost) == (101, 50, 151)


def test_without_max_tokens_the_default_is_charged() -> None:
    found = estimate(TEXT, {}, json.dumps({"text_input": "abcd"}).encode())
    assert not isinstance(found, str)
    assert (found.prompt_tokens, found.max_tokens) == (1, 64)
    assert "(default)" in found.why


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b"\xff\xfe", "not JSON"),
        (json.dumps({"inputs": []}).encode(), "prompt 'PROMPT_TOKENS' not found"),
        (infer_body(["five hundred"], [100]), "prompt 'PROMPT_TOKENS' not found"),
        (b"[" * 100_000, "not JSON"),
    ],
)
def test_unreadable_bodies_have_no_estimate(body: bytes, why: str) -> None:
    found = estimate(COUNTS, {}, body)
    assert isinstance(found, str) and why in found


def test_binary_tensor_requests_are_read_from_their_json_header() -> None:
    header = infer_body([70], [30])
    body = header + b"\x00\x01\x02\x03"
    found = estimate(COUNTS, {"inference-header-content-length": str(len(header))}, body)
    assert not isinstance(found, str) and found.cost == 100
    bad = estimate(COUNTS, {"inference-header-content-length": "999999"}, body)
    assert isinstance(bad, str)


def test_odd_numbers_cannot_lower_the_estimate_below_zero_or_break_it() -> None:
    found = estimate(COUNTS, {}, b'{"inputs":[{"name":"PROMPT_TOKENS","data":[-50]},'
                     b'{"name":"OUTPUT_TOKENS","data":[Infinity, 7, true]}]}')  # fmt: skip
    assert not isinstance(found, str)
    assert (found.prompt_tokens, found.max_tokens) == (0, 7)


def test_usage_of_an_infer_response() -> None:
    meter = UsageMeter(COUNTS, streamed=False)
    meter.on_headers(200, {})
    response = {"outputs": [{"name": "OUT_TOKENS", "data": [37]}, {"name": "X", "data": [9]}]}
    body = json.dumps(response).encode()
    meter.feed(body[:10])
    assert meter.generated() is None  # nothing decoded before the end
    meter.feed(body[10:])
    assert meter.finish() == 37


def test_usage_of_a_generate_stream_split_anywhere() -> None:
    events = b"".join(
        b'data: {"model_name":"llm_stream","OUT_TOKENS":%d,"BATCH_MS":1.5}\n\n' % n
        for n in (8, 8, 3)
    )
    for cut in range(1, len(events)):
        meter = UsageMeter(COUNTS, streamed=True)
        meter.on_headers(200, {"content-type": "text/event-stream"})
        meter.feed(events[:cut])
        meter.feed(events[cut:])
        assert meter.finish() == 19


def test_a_stream_cut_short_counts_what_it_generated() -> None:
    meter = UsageMeter(COUNTS, streamed=True)
    meter.on_headers(200, {})
    meter.feed(b'data: {"OUT_TOKENS":8}\n\ndata: {"OUT_TOKENS":8}\n\ndata: {"OUT_')
    assert meter.generated() == 16


def test_text_usage_is_estimated_from_characters() -> None:
    meter = UsageMeter(TEXT, streamed=True)
    meter.feed(b'data: {"text_output":"Hello"}\n\ndata: {"text_output":" world"}\n\n')
    # 5 and 6 characters, 4 per token, each event rounded up: 2 + 2.
    assert meter.finish() == 4


def test_error_responses_generated_nothing() -> None:
    meter = UsageMeter(COUNTS, streamed=False)
    meter.on_headers(400, {})
    meter.feed(b'{"error":"llm: OUTPUT_TOKENS must not be negative"}')
    assert meter.finish() == 0


def test_a_response_without_usage_says_so() -> None:
    for body in (b'{"outputs":[]}', b"garbage", b""):
        meter = UsageMeter(COUNTS, streamed=False)
        meter.on_headers(200, {})
        meter.feed(body)
        assert meter.finish() is None
    assert UsageMeter(TokenPolicy(prompt_tokens="P"), streamed=False).finish() is None


def test_a_huge_response_is_not_kept() -> None:
    meter = UsageMeter(COUNTS, streamed=False)
    meter.on_headers(200, {})
    chunk = b" " * (1024 * 1024)
    for _ in range(MAX_JSON_BYTES // len(chunk) + 2):
        meter.feed(chunk)
    assert meter.finish() is None


def test_stream_paths() -> None:
    assert is_streamed("/v2/models/llm/generate_stream")
    assert is_streamed("/v2/models/llm/versions/2/generate_stream?x=1")
    assert not is_streamed("/v2/models/llm/generate")
    assert not is_streamed("/v2/models/llm/infer")
