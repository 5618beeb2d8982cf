"""Token estimates from request bodies and usage from responses (sidecar.core.tokens)."""

from __future__ import annotations

import gzip
import json
import math
import zlib
from dataclasses import replace

import numpy as np
import pytest
import tritonclient.http as triton_http

from sidecar.core.compiled import compile_policy
from sidecar.core.decide import Admission, plan_request, refuse_unreadable
from sidecar.core.kserve import Unreadable, is_streamed
from sidecar.core.tokens import (
    CHARGE_MAX,
    MAX_JSON_BYTES,
    TokenEstimate,
    UsageMeter,
    charge_max,
    estimate,
    priced,
    settlement,
)
from sidecar.core.types import Reason, RequestAttributes
from sidecar.policy.model import TokenPolicy, UnreadableBody
from tests.core_fixtures import make_policy

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
    assert isinstance(found, Unreadable) and why in found.why
    assert not found.unsupported_encoding


def test_binary_tensor_requests_are_read_from_their_json_header() -> None:
    header = infer_body([70], [30])
    body = header + b"\x00\x01\x02\x03"
    found = estimate(COUNTS, {"inference-header-content-length": str(len(header))}, body)
    assert isinstance(found, TokenEstimate) and found.cost == 100
    bad = estimate(COUNTS, {"inference-header-content-length": "999999"}, body)
    assert isinstance(bad, Unreadable)


def triton_body(prompt: int, output: int) -> tuple[bytes, dict[str, str]]:
    """The body tritonclient sends by default: every input as binary data."""
    inputs = []
    for name, value in (("PROMPT_TOKENS", prompt), ("OUTPUT_TOKENS", output)):
        tensor = triton_http.InferInput(name, [1, 1], "INT32")
        tensor.set_data_from_numpy(np.array([[value]], dtype=np.int32))
        inputs.append(tensor)
    body, json_size = triton_http.InferenceServerClient.generate_request_body(inputs)
    assert json_size is not None  # binary data follows the JSON
    return body, {"inference-header-content-length": str(json_size)}


def test_tritonclients_binary_tensors_are_counted() -> None:
    body, headers = triton_body(30000, 100)
    found = estimate(COUNTS, headers, body)
    assert isinstance(found, TokenEstimate)
    assert (found.prompt_tokens, found.max_tokens, found.cost) == (30000, 100, 30100)


def test_binary_bytes_prompts_are_counted_in_characters() -> None:
    text = triton_http.InferInput("text_input", [2], "BYTES")
    text.set_data_from_numpy(np.array([b"x" * 400, "é".encode() * 8], dtype=np.object_))
    limit = triton_http.InferInput("max_tokens", [1], "INT64")
    limit.set_data_from_numpy(np.array([7], dtype=np.int64))
    body, json_size = triton_http.InferenceServerClient.generate_request_body([text, limit])
    found = estimate(TEXT, {"inference-header-content-length": str(json_size)}, body)
    assert isinstance(found, TokenEstimate)
    # 400 characters = 100 tokens; 8 characters (16 UTF-8 bytes) = 2 tokens.
    assert (found.prompt_tokens, found.max_tokens) == (102, 7)


@pytest.mark.parametrize(
    ("cut", "why"),
    [
        (-1, "larger than the body"),  # the binary data cut short
        (None, "does not fit"),  # a header length past the end
    ],
)
def test_binary_tensors_that_do_not_fit_are_unreadable(cut: int | None, why: str) -> None:
    body, headers = triton_body(500, 100)
    if cut is None:
        headers = {"inference-header-content-length": str(len(body) + 1)}
    else:
        body = body[:cut]
    found = estimate(COUNTS, headers, body)
    assert isinstance(found, Unreadable) and why in found.why


def test_a_binary_tensor_of_the_wrong_size_has_no_count() -> None:
    header = json.dumps({"inputs": [
        {"name": "PROMPT_TOKENS", "datatype": "INT32", "parameters": {"binary_data_size": 3}},
    ]}).encode()  # fmt: skip
    found = estimate(COUNTS, {"inference-header-content-length": str(len(header))}, header + b"abc")
    assert isinstance(found, Unreadable) and "prompt" in found.why


@pytest.mark.parametrize(
    "compress",
    [gzip.compress, zlib.compress, lambda b: zlib.compress(b, wbits=31)],
    ids=["gzip", "zlib", "gzip-as-deflate"],
)
@pytest.mark.parametrize("encoding", ["gzip", "deflate", " GZIP "])
def test_compressed_bodies_are_inflated_as_triton_does(compress: object, encoding: str) -> None:
    # Triton inflates both names with windowBits 15|32: either header, whichever name.
    assert callable(compress)
    found = estimate(COUNTS, {"content-encoding": encoding}, compress(infer_body([900], [100])))
    assert isinstance(found, TokenEstimate) and found.cost == 1000


def test_compressed_binary_tensors_are_read() -> None:
    body, headers = triton_body(30000, 100)
    found = estimate(COUNTS, {**headers, "content-encoding": "gzip"}, gzip.compress(body))
    assert isinstance(found, TokenEstimate) and found.cost == 30100


def test_a_zip_bomb_stops_at_the_cap() -> None:
    bomb = gzip.compress(b" " * (MAX_JSON_BYTES + 1))
    assert len(bomb) < MAX_JSON_BYTES // 100
    found = estimate(COUNTS, {"content-encoding": "gzip"}, bomb)
    assert isinstance(found, Unreadable) and "more than" in found.why


@pytest.mark.parametrize(
    ("encoding", "body", "unsupported"),
    [
        ("br", b"anything", True),
        ("gzip, gzip", b"anything", True),  # Triton reads one coding, not a list
        ("gzip", b"not gzip at all", False),
        ("identity", b"{}", False),  # read, but no prompt
    ],
)
def test_encodings_triton_refuses_are_unreadable(
    encoding: str, body: bytes, unsupported: bool
) -> None:
    found = estimate(COUNTS, {"content-encoding": encoding}, body)
    assert isinstance(found, Unreadable) and found.unsupported_encoding is unsupported


@pytest.mark.parametrize(
    ("policy", "body", "cost"),
    [
        # The bypass: Triton runs the first "inputs"; a last-wins reader saw the second.
        (COUNTS, b'{"inputs":[{"name":"PROMPT_TOKENS","data":[30000]},'
         b'{"name":"OUTPUT_TOKENS","data":[1]}],"inputs":[{"name":"PROMPT_TOKENS","data":[1]},'
         b'{"name":"OUTPUT_TOKENS","data":[1]}]}', 30001),
        (COUNTS, b'{"inputs":[{"name":"PROMPT_TOKENS","data":[5],"data":[1]},'
         b'{"name":"OUTPUT_TOKENS","data":[1]}]}', 6),
        (TEXT, b'{"text_input":"xxxx","parameters":{"max_tokens":2000,"max_tokens":1}}', 2001),
    ],
)  # fmt: skip
def test_duplicate_keys_are_read_as_triton_reads_them(
    policy: TokenPolicy, body: bytes, cost: float
) -> None:
    found = estimate(policy, {}, body)
    assert isinstance(found, TokenEstimate) and found.cost == cost


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


def test_charge_max_is_an_estimate_no_bucket_can_hold() -> None:
    found = charge_max(Unreadable("body is not JSON"))
    assert found.cost == CHARGE_MAX and math.isinf(found.cost) and not found.readable
    assert "body is not JSON" in found.why


def metered(status: int, body: bytes, policy: TokenPolicy = COUNTS) -> UsageMeter:
    meter = UsageMeter(policy, streamed=False)
    meter.on_headers(status, {})
    meter.feed(body)
    return meter


PROMPTED = TokenPolicy(
    prompt_tokens="PROMPT_TOKENS",
    max_tokens="OUTPUT_TOKENS",
    output_tokens="OUT_TOKENS",
    response_prompt_tokens="num_input_tokens",
)
READ = TokenEstimate(500, 100, 600.0, "estimated")
MAXED = charge_max(Unreadable("x"))


@pytest.mark.parametrize(
    ("policy", "estimate_", "charged", "status", "body", "settled"),
    [
        # Output reconciled; the prompt stays the estimate's without a reported count.
        (COUNTS, READ, 600, 200, b'{"outputs":[{"name":"OUT_TOKENS","data":[40]}]}',
         (-60, "reconciled")),
        # The response's own prompt count replaces the estimate's, both ways.
        (PROMPTED, READ, 600, 200, b'{"OUT_TOKENS":40,"num_input_tokens":800}',
         (240, "reconciled")),
        (PROMPTED, READ, 600, 200, b'{"OUT_TOKENS":40,"num_input_tokens":100}',
         (-460, "reconciled")),
        # Triton refused the request (4xx): it never ran, everything comes back.
        (COUNTS, READ, 600, 400, b'{"error":"bad input"}', (-600, "refunded_rejected")),
        (COUNTS, MAXED, 4000, 422, b"", (-4000, "refunded_rejected")),
        # A 5xx generated nothing; the prompt is still charged.
        (COUNTS, READ, 600, 503, b'{"error":"queue full"}', (-100, "reconciled")),
        # charge_max is made good only with both counts from the response.
        (PROMPTED, MAXED, 4000, 200, b'{"OUT_TOKENS":40,"num_input_tokens":800}',
         (-3160, "reconciled")),
        (COUNTS, MAXED, 4000, 200, b'{"OUT_TOKENS":40}', (None, "no_usage")),
        (COUNTS, READ, 600, 200, b'{"outputs":[]}', (None, "no_usage")),
    ],
)  # fmt: skip
def test_settlement(
    policy: TokenPolicy,
    estimate_: TokenEstimate,
    charged: float,
    status: int,
    body: bytes,
    settled: tuple[float | None, str],
) -> None:
    assert settlement(policy, estimate_, charged, metered(status, body, policy), ended=True) == (
        settled
    )


def test_a_streamed_prompt_count_is_taken_once_not_summed() -> None:
    meter = UsageMeter(PROMPTED, streamed=True)
    meter.on_headers(200, {})
    meter.feed(b'data: {"OUT_TOKENS":8,"num_input_tokens":300}\n\n' * 3)
    assert settlement(PROMPTED, READ, 600, meter, ended=True) == (300 + 24 - 600, "reconciled")


def test_a_binary_and_compressed_response_is_metered() -> None:
    # What Triton sends for `"binary_data_output": true` (tritonclient's default), gzipped
    # for a client that sent Accept-Encoding: gzip.
    header = json.dumps({"outputs": [
        {"name": "BATCH_MS", "datatype": "FP32", "shape": [1, 1],
         "parameters": {"binary_data_size": 4}},
        {"name": "OUT_TOKENS", "datatype": "INT32", "shape": [1, 1],
         "parameters": {"binary_data_size": 4}},
    ]}).encode()  # fmt: skip
    body = header + np.float32(1.5).tobytes() + np.int32(37).tobytes()
    meter = UsageMeter(COUNTS, streamed=False)
    headers = {"inference-header-content-length": str(len(header)), "content-encoding": "gzip"}
    meter.on_headers(200, headers)
    meter.feed(gzip.compress(body))
    assert meter.finish() == 37


# -- what core.decide makes of an unreadable body ----------------------------------------------


def test_refusing_an_unreadable_body_is_400_or_415_with_a_json_reason() -> None:
    bad = refuse_unreadable(Unreadable("body is not JSON"))
    assert (bad.status, bad.reason) == (400, Reason.UNREADABLE_BODY)
    assert json.loads(bad.body) == {
        "error": "bad_request",
        "reason": "unreadable_body",
        "message": "body is not JSON",
        "tenant": None,
        "class": None,
        "retry_after_ms": None,
    }
    encoding = refuse_unreadable(Unreadable("content-encoding 'br' ...", True))
    assert (encoding.status, encoding.reason) == (415, Reason.UNSUPPORTED_ENCODING)
    assert json.loads(encoding.body)["error"] == "unsupported_media_type"
    assert ("x-qos-reason", "unsupported_encoding") in encoding.headers


def test_charge_max_charges_the_smallest_cost_burst_of_the_tenant() -> None:
    attrs = RequestAttributes(
        "POST", "/v2/models/llm/infer", {"x-api-key": "k-search", "x-qos-class": "interactive"}
    )
    found = charge_max(Unreadable("x"))
    planned = plan_request(attrs, compile_policy(make_policy()), (found.cost, found.why))
    assert isinstance(planned, Admission)
    # The search tenant's only cost bucket holds 4000: the most a request can be charged
    # and still be admitted when the bucket is full (not cost_over_burst, not a flat cost).
    assert planned.cost == 4000
    assert [b.cost for b in planned.check.buckets if b.by_cost] == [4000]


def test_the_policy_chooses_what_an_unreadable_body_becomes() -> None:
    problem = Unreadable("body is not JSON")
    assert priced(COUNTS, problem) is problem  # refuse, the default
    maxed = priced(replace(COUNTS, unreadable=UnreadableBody.CHARGE_MAX), problem)
    assert isinstance(maxed, TokenEstimate) and maxed.cost == CHARGE_MAX
    assert priced(COUNTS, READ) is READ
