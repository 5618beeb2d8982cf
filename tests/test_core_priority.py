"""core.priority: the class's Triton priority written into KServe v2 JSON and gRPC bodies.

Tables for what is rewritten and what passes unchanged (with the reason), property tests that
nothing but the priority changes, and tritonclient's own protobufs as the judge of the gRPC
rewrite (Triton parses the same messages).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from sidecar.core.kserve import GRPC_MODEL_INFER_PATH, INFER_HEADER_LENGTH
from sidecar.core.priority import (
    RewriteResult,
    queue_timeout_ms,
    rewrite_body,
    with_triton_priority,
)

INFER = "/v2/models/simgpu/infer"
JSON = "application/json"
GRPC = "application/grpc"


def frame(message: bytes, compressed: bool = False) -> bytes:
    return bytes([int(compressed)]) + len(message).to_bytes(4, "big") + message


def unframe(body: bytes) -> list[bytes]:
    messages = []
    while body:
        assert body[0] == 0
        length = int.from_bytes(body[1:5], "big")
        messages.append(body[5 : 5 + length])
        body = body[5 + length :]
    return messages


def infer_request(**parameters: Any) -> Any:
    request = service_pb2.ModelInferRequest(
        model_name="simgpu",
        model_version="1",
        id="req-1",
        inputs=[
            service_pb2.ModelInferRequest.InferInputTensor(
                name="DELAY_MS", datatype="FP32", shape=[1, 1]
            )
        ],
        raw_input_contents=[b"\x00\x00\xa0\x40" * 3],
    )
    for key, value in parameters.items():
        request.parameters[key].CopyFrom(value)
    return request


# -- JSON --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{}", b'{"parameters":{"priority":1}}'),
        (b'{"inputs":[]}', b'{"parameters":{"priority":1},"inputs":[]}'),
        # existing parameters keep their members and their text
        (
            b'{"parameters":{"timeout":5000},"inputs":[]}',
            b'{"parameters":{"priority":1,"timeout":5000},"inputs":[]}',
        ),
        (b'{"parameters":{}}', b'{"parameters":{"priority":1}}'),
        # a priority the client set is replaced, in place
        (
            b'{"id":"a","parameters":{"priority":3,"x":"y"}}',
            b'{"id":"a","parameters":{"priority":1,"x":"y"}}',
        ),
        (b'{"parameters":{"priority":"high"}}', b'{"parameters":{"priority":1}}'),
        # whitespace and number text survive byte for byte, even where Python would change them
        (
            b' {\n  "inputs": [1.10, 1e400, -0.0]\n}\n',
            b' {"parameters":{"priority":1},\n  "inputs": [1.10, 1e400, -0.0]\n}\n',
        ),
        # structural characters inside strings are not structure
        (
            b'{"id":"}\\"{[","inputs":[{"data":["]","\\\\"]}]}',
            b'{"parameters":{"priority":1},"id":"}\\"{[","inputs":[{"data":["]","\\\\"]}]}',
        ),
        # an escaped key is still the key it decodes to
        (b'{"param\\u0065ters":{}}', b'{"param\\u0065ters":{"priority":1}}'),
        ('{"id":"café ☕"}'.encode(), '{"parameters":{"priority":1},"id":"café ☕"}'.encode()),
    ],
)
def test_json_bodies_get_parameters_priority(body: bytes, expected: bytes) -> None:
    assert with_triton_priority(body, JSON, 1) == expected


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   ",
        b"[1, 2]",
        b'"text"',
        b"42",
        b"{",
        b'{"inputs":[1,2}',
        b'{"inputs":[1,2]]}',
        b'{"a":1,}',
        b'{"a" 1}',
        b'{"a":1} trailing',
        b'{"a":NaN}',
        b'{"a":"unterminated}',
        b"\xff\xfe{}",
        b'{"parameters":[]}',
        b'{"parameters":"p"}',
        b'{"parameters":{},"parameters":{}}',  # which one counts differs between parsers
        b'{"parameters":{"priority":1,"priority":2}}',
        b"{" * 100_000,
    ],
)
def test_malformed_json_is_left_alone(body: bytes) -> None:
    assert with_triton_priority(body, JSON, 1) is None
    assert rewrite_body(INFER, {"content-type": JSON}, body, 1).result is RewriteResult.MALFORMED


@pytest.mark.parametrize(
    ("content_type", "rewritten"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("Application/JSON", True),
        ("", True),
        ("text/plain", False),
        ("application/x-www-form-urlencoded", False),
        ("application/octet-stream", False),  # only with inference-header-content-length
        ("application/grpc-web", False),
    ],
)
def test_content_types(content_type: str, rewritten: bool) -> None:
    body = b'{"inputs":[]}'
    assert (with_triton_priority(body, content_type, 2) is not None) is rewritten


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
json_objects = st.dictionaries(st.text(max_size=12), json_values, max_size=6)


@settings(max_examples=150, deadline=None)
@given(
    request=json_objects,
    parameters=st.none() | st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    priority=st.integers(min_value=0, max_value=2**31),
    indent=st.none() | st.integers(min_value=0, max_value=3),
    ascii_only=st.booleans(),
)
def test_any_json_object_changes_only_in_parameters_priority(
    request: dict[str, Any],
    parameters: dict[str, Any] | None,
    priority: int,
    indent: int | None,
    ascii_only: bool,
) -> None:
    request.pop("parameters", None)  # `parameters` below decides it (hypothesis drew this key)
    if parameters is not None:
        request["parameters"] = parameters
    body = json.dumps(request, indent=indent, ensure_ascii=ascii_only).encode()
    rewritten = with_triton_priority(body, JSON, priority)
    assert rewritten is not None
    expected = dict(request)
    expected["parameters"] = {**(parameters or {}), "priority": priority}
    assert json.loads(rewritten) == expected


def test_large_tensors_are_skipped_not_decoded() -> None:
    numbers = b",".join([b"0.5"] * 200_000)
    strings = b",".join([b'"ab\\"c"'] * 20_000)  # dense: handed to the C decoder
    body = b'{"inputs":[{"data":[' + numbers + b']},{"data":[' + strings + b"]}]}"
    rewritten = with_triton_priority(body, JSON, 1)
    assert rewritten == b'{"parameters":{"priority":1},' + body[1:]


# -- the binary-tensor extension ---------------------------------------------------------------


def test_binary_tensor_requests_rewrite_only_the_json_header() -> None:
    header = b'{"inputs":[{"name":"X","parameters":{"binary_data_size":4}}]}'
    binary = b'{"\x00\xff'  # bytes that would confuse a JSON scanner
    body = header + binary
    result = rewrite_body(INFER, {INFER_HEADER_LENGTH: str(len(header))}, body, 2)
    assert result.result is RewriteResult.REWRITTEN
    assert result.body is not None
    new_header = b'{"parameters":{"priority":2},' + header[1:]
    assert result.body == new_header + binary
    assert dict(result.headers) == {
        "content-length": str(len(result.body)),
        INFER_HEADER_LENGTH: str(len(new_header)),
    }


@pytest.mark.parametrize("length", ["0", "-1", "x", "1000"])
def test_binary_tensor_requests_with_a_bad_header_length_are_left_alone(length: str) -> None:
    result = rewrite_body(INFER, {INFER_HEADER_LENGTH: length}, b'{"inputs":[]}', 2)
    assert result.result is RewriteResult.MALFORMED


# -- which requests ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "headers", "result"),
    [
        (INFER, {"content-type": JSON}, RewriteResult.REWRITTEN),
        ("/v2/models/simgpu/versions/2/infer", {}, RewriteResult.REWRITTEN),
        ("/v2/models/simgpu/infer?x=1", {}, RewriteResult.REWRITTEN),
        ("/v2/models/llm/generate", {}, RewriteResult.NOT_INFERENCE),
        ("/v2/models/llm/generate_stream", {}, RewriteResult.NOT_INFERENCE),
        ("/v2/models/simgpu/inference", {}, RewriteResult.NOT_INFERENCE),
        ("/v2/repository/index", {}, RewriteResult.NOT_INFERENCE),
        (INFER, {"content-encoding": "gzip"}, RewriteResult.UNSUPPORTED),
        (INFER, {"content-encoding": "identity"}, RewriteResult.REWRITTEN),
        (INFER, {"content-type": "text/csv"}, RewriteResult.UNSUPPORTED),
        # gRPC: only ModelInfer, and never a JSON path
        ("/inference.GRPCInferenceService/ModelInfer", {"content-type": GRPC}, "grpc"),
        ("/inference.GRPCInferenceService/ModelReady", {"content-type": GRPC}, "not"),
        (INFER, {"content-type": GRPC}, "not"),
    ],
)
def test_which_requests_are_rewritten(
    path: str, headers: dict[str, str], result: RewriteResult | str
) -> None:
    grpc = headers.get("content-type") == GRPC
    body = frame(infer_request().SerializeToString()) if grpc else b'{"inputs":[]}'
    got = rewrite_body(path, headers, body, 1).result
    if result == "grpc":
        result = RewriteResult.REWRITTEN
    elif result == "not":
        result = RewriteResult.NOT_INFERENCE
    assert got is result


def test_a_rewrite_sets_content_length() -> None:
    result = rewrite_body(INFER, {"content-type": JSON}, b'{"inputs":[]}', 3)
    assert result.body == b'{"parameters":{"priority":3},"inputs":[]}'
    assert result.headers == (("content-length", str(len(result.body))),)


# -- gRPC --------------------------------------------------------------------------------------


def test_wire_numbers_match_tritons_protobufs() -> None:
    request = service_pb2.ModelInferRequest.DESCRIPTOR
    assert request.fields_by_name["parameters"].number == 4
    entry = request.fields_by_name["parameters"].message_type
    assert (entry.fields_by_name["key"].number, entry.fields_by_name["value"].number) == (1, 2)
    assert service_pb2.InferParameter.DESCRIPTOR.fields_by_name["int64_param"].number == 2


@pytest.mark.parametrize(
    "existing",
    [
        {},
        {"priority": service_pb2.InferParameter(uint64_param=7)},
        {"priority": service_pb2.InferParameter(int64_param=3)},
        {"timeout": service_pb2.InferParameter(int64_param=5000)},
    ],
)
def test_grpc_model_infer_request_gets_parameters_priority(
    existing: dict[str, Any],
) -> None:
    original = infer_request(**existing)
    rewritten = with_triton_priority(frame(original.SerializeToString()), GRPC, 1)
    assert rewritten is not None
    (message,) = unframe(rewritten)
    parsed = service_pb2.ModelInferRequest.FromString(message)
    assert parsed.parameters["priority"].WhichOneof("parameter_choice") == "int64_param"
    assert parsed.parameters["priority"].int64_param == 1
    expected = infer_request(**existing)
    expected.parameters["priority"].CopyFrom(service_pb2.InferParameter(int64_param=1))
    assert parsed == expected


def test_every_grpc_message_in_the_body_is_rewritten() -> None:
    body = frame(infer_request().SerializeToString()) * 2
    rewritten = with_triton_priority(body, GRPC + "+proto", 2)
    assert rewritten is not None
    messages = unframe(rewritten)
    assert len(messages) == 2
    for message in messages:
        assert service_pb2.ModelInferRequest.FromString(message).parameters["priority"] == (
            service_pb2.InferParameter(int64_param=2)
        )


@pytest.mark.parametrize(
    ("body", "result"),
    [
        (b"", RewriteResult.MALFORMED),
        (b"\x00\x00\x00", RewriteResult.MALFORMED),  # a cut-off prefix
        (b"\x00\x00\x00\x00\x09abc", RewriteResult.MALFORMED),  # shorter than it says
        (frame(b"\xff\xff\xff"), RewriteResult.MALFORMED),  # not protobuf
        (frame(b"\x0b\x00"), RewriteResult.MALFORMED),  # a group: not in ModelInferRequest
        (frame(b"\x0a\x05ab"), RewriteResult.MALFORMED),  # a field longer than the message
        (b"\x02" + frame(b"")[1:], RewriteResult.MALFORMED),  # an unknown flag
        (frame(b"\x0a\x01a", compressed=True), RewriteResult.UNSUPPORTED),
    ],
)
def test_bad_grpc_bodies_are_left_alone(body: bytes, result: RewriteResult) -> None:
    headers = {"content-type": GRPC}
    assert rewrite_body(GRPC_MODEL_INFER_PATH, headers, body, 1).result is result
    assert with_triton_priority(body, GRPC, 1) is None


def test_an_empty_grpc_message_is_a_request_with_defaults() -> None:
    rewritten = with_triton_priority(frame(b""), GRPC, 4)
    assert rewritten is not None
    (message,) = unframe(rewritten)
    parsed = service_pb2.ModelInferRequest.FromString(message)
    assert parsed.parameters["priority"].int64_param == 4


@settings(max_examples=200, deadline=None)
@given(
    model=st.text(max_size=20),
    request_id=st.text(max_size=20),
    raw=st.lists(st.binary(max_size=300), max_size=3),
    ints=st.dictionaries(st.text(max_size=10), st.integers(-(2**63), 2**63 - 1), max_size=4),
    priority=st.integers(min_value=0, max_value=2**63 - 1),
)
def test_any_model_infer_request_changes_only_in_parameters_priority(
    model: str, request_id: str, raw: list[bytes], ints: dict[str, int], priority: int
) -> None:
    original = service_pb2.ModelInferRequest(
        model_name=model, id=request_id, raw_input_contents=raw
    )
    for key, value in ints.items():
        original.parameters[key].int64_param = value
    rewritten = with_triton_priority(frame(original.SerializeToString()), GRPC, priority)
    assert rewritten is not None
    (message,) = unframe(rewritten)
    original.parameters["priority"].CopyFrom(service_pb2.InferParameter(int64_param=priority))
    assert service_pb2.ModelInferRequest.FromString(message) == original


# -- rule 6: the class's Triton timeout beside its priority --------------------------------------


@pytest.mark.parametrize(
    ("body", "parameters"),
    [
        (b'{"inputs":[]}', {"priority": 2, "timeout": 150000}),
        (b'{"parameters":{"priority":9},"inputs":[]}', {"priority": 2, "timeout": 150000}),
        (  # the client's own timeout is replaced, its other parameters kept
            b'{"inputs":[],"parameters":{"timeout":99999999,"x":"y"}}',
            {"timeout": 150000, "priority": 2, "x": "y"},
        ),
    ],
)
def test_json_gets_the_classes_timeout_in_microseconds(
    body: bytes, parameters: dict[str, Any]
) -> None:
    rewrite = rewrite_body(INFER, {"content-type": JSON}, body, 2, 150)
    assert rewrite.result is RewriteResult.REWRITTEN and rewrite.body is not None
    doc = json.loads(rewrite.body)
    assert doc["parameters"] == parameters
    assert doc["inputs"] == []
    assert dict(rewrite.headers)["content-length"] == str(len(rewrite.body))


def test_no_timeout_without_the_classes_setting() -> None:
    rewrite = rewrite_body(INFER, {"content-type": JSON}, b'{"inputs":[]}', 2)
    assert rewrite.body is not None
    assert json.loads(rewrite.body)["parameters"] == {"priority": 2}


def test_grpc_gets_the_timeout_as_int64_microseconds() -> None:
    original = infer_request(timeout=service_pb2.InferParameter(int64_param=5))
    rewrite = rewrite_body(
        GRPC_MODEL_INFER_PATH, {"content-type": GRPC}, frame(original.SerializeToString()), 1, 40
    )
    assert rewrite.body is not None
    (message,) = unframe(rewrite.body)
    parsed = service_pb2.ModelInferRequest.FromString(message)
    assert parsed.parameters["timeout"].WhichOneof("parameter_choice") == "int64_param"
    assert parsed.parameters["timeout"].int64_param == 40000
    assert parsed.parameters["priority"].int64_param == 1


def test_binary_tensors_get_the_timeout_in_their_json_header() -> None:
    tensor = b'{"name":"X","datatype":"BYTES","shape":[1],"parameters":{"binary_data_size":3}}'
    header = b'{"inputs":[' + tensor + b"]}"
    headers = {"content-type": "application/octet-stream", INFER_HEADER_LENGTH: str(len(header))}
    rewrite = rewrite_body(INFER, headers, header + b"abc", 1, 7)
    assert rewrite.body is not None and rewrite.body.endswith(b"abc")
    new_length = int(dict(rewrite.headers)[INFER_HEADER_LENGTH])
    assert json.loads(rewrite.body[:new_length])["parameters"] == {"priority": 1, "timeout": 7000}


def test_a_timeout_is_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        rewrite_body(INFER, {"content-type": JSON}, b'{"inputs":[]}', 1, 0)


# -- rule 7: what is left of the client's stated wait ---------------------------------------------


@pytest.mark.parametrize(
    ("class_ms", "client_wait_s", "waited_s", "expected"),
    [
        (None, None, 0.5, None),  # nobody asked for one
        (150, None, 0.5, 150),  # the class's alone
        (None, 0.6, 0.2, 400),  # what is left of the client's
        (None, 0.6, 0.2004, 400),  # rounded up to a whole millisecond: never cut short
        (150, 0.6, 0.2, 150),  # the shorter wins: the class's
        (500, 0.6, 0.2, 400),  # the shorter wins: the client's
        (None, 0.6, 0.6, 1),  # nothing left: at least 1 ms (0 would mean none to Triton)
        (None, 0.6, 9.0, 1),
        (150, 0.6, 9.0, 1),
    ],
)
def test_the_timeout_is_the_class_or_what_is_left_of_the_clients_wait(
    class_ms: int | None, client_wait_s: float | None, waited_s: float, expected: int | None
) -> None:
    assert queue_timeout_ms(class_ms, client_wait_s, waited_s) == expected


@given(
    class_ms=st.none() | st.integers(1, 10**7),
    client_wait_s=st.none() | st.floats(0.0, 1e4),
    waited_s=st.floats(0.0, 1e4),
)
def test_a_timeout_asked_for_is_always_one_triton_accepts(
    class_ms: int | None, client_wait_s: float | None, waited_s: float
) -> None:
    timeout = queue_timeout_ms(class_ms, client_wait_s, waited_s)
    if class_ms is None and client_wait_s is None:
        assert timeout is None
        return
    assert timeout is not None and timeout >= 1
    assert class_ms is None or timeout <= class_ms
    if client_wait_s is not None:  # never less than the client has left, within the class's
        limit = float("inf") if class_ms is None else class_ms
        assert timeout >= min(limit, (client_wait_s - waited_s) * 1000.0)
    # and it goes into a body as Triton reads it
    body = rewrite_body(INFER, {"content-type": JSON}, b'{"inputs":[]}', 1, timeout).body
    assert body is not None and json.loads(body)["parameters"]["timeout"] == timeout * 1000
