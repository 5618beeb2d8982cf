"""core.kserve: which paths are inference calls, the model they name, and a gRPC
ModelInferRequest's model_name, with tritonclient's own protobufs as the judge."""

from __future__ import annotations

import gzip
import struct
import zlib

import numpy as np
import pytest
import tritonclient.utils as triton_utils
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from sidecar.core import decide
from sidecar.core.kserve import (
    GRPC_MODEL_INFER_PATH,
    GRPC_MODEL_STREAM_INFER_PATH,
    INFER_HEADER_LENGTH,
    Endpoint,
    Unreadable,
    binary_tensors,
    decode_body,
    decode_tensor,
    encode_varint,
    grpc_model_name,
    is_streamed,
    model_of,
    parse_path,
    protobuf_fields,
    read_varint,
)

E = Endpoint


@pytest.mark.parametrize(
    ("path", "parsed"),
    [
        ("/v2/models/simgpu/infer", (E.INFER, "simgpu")),
        ("/v2/models/llm/generate", (E.GENERATE, "llm")),
        ("/v2/models/llm/generate_stream", (E.GENERATE_STREAM, "llm")),
        # the version segment
        ("/v2/models/simgpu/versions/2/infer", (E.INFER, "simgpu")),
        ("/v2/models/llm/versions/2/generate_stream", (E.GENERATE_STREAM, "llm")),
        ("/v2/models/simgpu/versions//infer", None),
        ("/v2/models/simgpu/versions/2", None),
        # the end of the path: end of string or a query string, nothing else
        ("/v2/models/simgpu/infer?x=1", (E.INFER, "simgpu")),
        ("/v2/models/simgpu/infer?", (E.INFER, "simgpu")),
        ("/v2/models/llm/generate_stream?x=1&y=2", (E.GENERATE_STREAM, "llm")),
        ("/v2/models/simgpu/infer/", None),
        ("/v2/models/simgpu/infer/x", None),
        ("/v2/models/simgpu/infer2", None),
        ("/v2/models/simgpu/inference", None),
        ("/v2/models/simgpu/infer.json", None),
        ("/v2/models/simgpu/infer-x", None),
        ("/v2/models/llm/generate_streamx", None),
        ("/v2/models/llm/generate/", None),
        # percent-encoded model names are decoded
        ("/v2/models/my%20model/generate_stream", (E.GENERATE_STREAM, "my model")),
        ("/v2/models/a%2Fb/infer", (E.INFER, "a/b")),
        ("/v2/models/caf%C3%A9/infer", (E.INFER, "café")),
        ("/v2/models/%3F/infer", (E.INFER, "?")),
        # not inference calls
        ("/v2/models//infer", None),
        ("/v2/models/simgpu/ready", None),
        ("/v2/models/simgpu", None),
        ("/v2/models/simgpu/config", None),
        ("/v2/health/ready", None),
        ("/v2/repository/index", None),
        ("/V2/models/simgpu/infer", None),
        ("/x/v2/models/simgpu/infer", None),
        ("", None),
        ("/", None),
        # gRPC: the two inference methods, exactly; the model is in the body
        (GRPC_MODEL_INFER_PATH, (E.GRPC_INFER, None)),
        (GRPC_MODEL_STREAM_INFER_PATH, (E.GRPC_STREAM_INFER, None)),
        ("/inference.GRPCInferenceService/ModelReady", None),
        ("/inference.GRPCInferenceService/ModelInfer/", None),
        ("/inference.GRPCInferenceService/ModelInferX", None),
    ],
)
def test_parse_path(path: str, parsed: tuple[Endpoint, str | None] | None) -> None:
    assert parse_path(path) == parsed
    assert model_of(path) == (parsed[1] if parsed else None)
    assert is_streamed(path) == (parsed is not None and parsed[0] is E.GENERATE_STREAM)


def test_one_reading_of_the_protocol() -> None:
    # The modules that used to carry their own regex now ask core.kserve.
    assert decide.model_of is model_of
    assert INFER_HEADER_LENGTH == INFER_HEADER_LENGTH.lower() == "inference-header-content-length"
    assert GRPC_MODEL_INFER_PATH == "/inference.GRPCInferenceService/ModelInfer"
    assert GRPC_MODEL_STREAM_INFER_PATH == "/inference.GRPCInferenceService/ModelStreamInfer"


# -- gRPC model_name ---------------------------------------------------------------------------


def frame(message: bytes, flag: int = 0) -> bytes:
    return bytes([flag]) + len(message).to_bytes(4, "big") + message


def infer_request(model: str = "simgpu") -> bytes:
    request = service_pb2.ModelInferRequest(
        model_name=model,
        model_version="1",
        id="req-1",
        inputs=[
            service_pb2.ModelInferRequest.InferInputTensor(
                name="DELAY_MS", datatype="FP32", shape=[1, 1]
            )
        ],
        raw_input_contents=[b"\x00\x00\xa0\x40" * 3],
    )
    request.parameters["priority"].CopyFrom(service_pb2.InferParameter(int64_param=2))
    return request.SerializeToString()


def test_model_name_is_field_1_in_tritons_protobufs() -> None:
    field = service_pb2.ModelInferRequest.DESCRIPTOR.fields_by_name["model_name"]
    assert (field.number, field.type) == (1, field.TYPE_STRING)


@pytest.mark.parametrize(
    ("body", "model"),
    [
        (frame(infer_request()), "simgpu"),
        (frame(infer_request("my model/é")), "my model/é"),
        # ModelStreamInfer: the first message names the model
        (frame(infer_request("a")) + frame(infer_request("b")), "a"),
        # protobuf parsers keep the last value of a field given twice
        (frame(infer_request("a") + b"\x0a\x01b"), "b"),
        # field 1 with another wire type is an unknown field: skipped
        (frame(infer_request("a") + b"\x08\x05"), "a"),
        (frame(b"\x08\x05"), None),
        # no model
        (frame(b""), None),
        (frame(infer_request("")), None),
        (b"", None),
        # compressed, an unknown flag, a cut-off prefix or message
        (frame(infer_request(), flag=1), None),
        (frame(infer_request(), flag=2), None),
        (b"\x00\x00\x00", None),
        (frame(infer_request())[:-1], None),
        # not protobuf, a field longer than the message, a group, not UTF-8
        (frame(b"\xff\xff\xff"), None),
        (frame(b"\x0a\x05ab"), None),
        (frame(b"\x0b\x00"), None),
        (frame(b"\x0a\x02\xc3\x28"), None),
    ],
)
def test_grpc_model_name(body: bytes, model: str | None) -> None:
    assert grpc_model_name(body) == model


@settings(max_examples=200, deadline=None)
@given(
    model=st.text(max_size=30),
    raw=st.lists(st.binary(max_size=200), max_size=3),
    ints=st.dictionaries(st.text(max_size=10), st.integers(-(2**63), 2**63 - 1), max_size=3),
)
def test_any_model_infer_request_gives_its_model_name(
    model: str, raw: list[bytes], ints: dict[str, int]
) -> None:
    request = service_pb2.ModelInferRequest(model_name=model, raw_input_contents=raw)
    for key, value in ints.items():
        request.parameters[key].CopyFrom(service_pb2.InferParameter(int64_param=value))
    assert grpc_model_name(frame(request.SerializeToString())) == (model or None)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_no_body_raises(body: bytes) -> None:
    grpc_model_name(body)
    grpc_model_name(frame(body))


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_varints_round_trip(value: int) -> None:
    encoded = encode_varint(value)
    assert read_varint(encoded, 0) == (value, len(encoded))
    assert read_varint(encoded[:-1], 0) == (0, -1)


def test_protobuf_fields() -> None:
    message = b"\x0a\x02ab" + b"\x10\x96\x01" + b"\x19" + bytes(8) + b"\x25" + bytes(4)
    assert protobuf_fields(message) == [(1, 2, 2, 4), (2, 0, 5, 7), (3, 1, 8, 16), (4, 5, 17, 21)]
    assert protobuf_fields(b"") == []
    assert protobuf_fields(b"\x00") is None  # field number 0
    assert protobuf_fields(b"\x0f") is None  # wire type 7
    assert protobuf_fields(b"\x19\x00") is None  # a fixed64 cut off


# -- bodies as Triton reads them (rules 4 and 5) -------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "body", "read"),
    [
        ({}, b"plain", b"plain"),
        ({"content-encoding": "identity"}, b"plain", b"plain"),
        ({"content-encoding": "gzip"}, gzip.compress(b"zipped"), b"zipped"),
        ({"content-encoding": "deflate"}, zlib.compress(b"zlib"), b"zlib"),
        ({"content-encoding": "Deflate"}, gzip.compress(b"either"), b"either"),
        ({"content-encoding": "gzip"}, b"\x1f\x8b junk", Unreadable("body is not valid gzip")),
        (
            {"content-encoding": "br"},
            b"x",
            Unreadable("content-encoding 'br' is not one Triton reads", True),
        ),
        (
            {"content-encoding": "gzip"},
            gzip.compress(b"y" * 101),
            Unreadable("gzip body inflates to more than 100 bytes"),
        ),
    ],
)
def test_decode_body(headers: dict[str, str], body: bytes, read: bytes | Unreadable) -> None:
    assert decode_body(headers, body, 100) == read


def test_binary_tensors_split_in_order_and_the_first_of_a_name_counts() -> None:
    tensors = [
        {"name": "a", "parameters": {"binary_data_size": 2}},
        {"name": "json", "data": [1]},
        {"name": "b", "parameters": {"binary_data_size": 3}},
        {"name": "a", "parameters": {"binary_data_size": 1}},
    ]
    assert binary_tensors(tensors, b"AABBBc") == {"a": b"AA", "b": b"BBB"}
    assert isinstance(binary_tensors(tensors, b"AABBB"), Unreadable)  # cut short
    assert isinstance(binary_tensors([{"parameters": {"binary_data_size": -1}}], b""), Unreadable)
    assert binary_tensors("not a list", b"") == {}


def test_decode_tensor_agrees_with_tritonclient() -> None:
    texts = np.array([b"hi", "wörld".encode(), b""], dtype=np.object_)
    raw = triton_utils.serialize_byte_tensor(texts).item()
    assert decode_tensor("BYTES", raw) == ["hi", "wörld", ""]
    assert decode_tensor("BYTES", raw[:-1] + b"\x00\x00") is None  # a length past the end
    assert decode_tensor("INT64", np.array([3, -4], dtype=np.int64).tobytes()) == [3, -4]
    assert decode_tensor("FP32", struct.pack("<f", 1.5)) == [1.5]
    assert decode_tensor("INT32", b"abc") is None  # not a whole element
    assert decode_tensor("FP16", b"ab") is None  # no token meaning
    assert decode_tensor(None, b"") is None
