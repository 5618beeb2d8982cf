"""Reading a ProcessingRequest with its large request body apart (sidecar/envoy/ext_proc_parse.py):
whatever the servicer reads must be what protobuf's own parse of the whole message gives."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.kserve import encode_varint, protobuf_fields
from sidecar.envoy.ext_proc_parse import APART_FROM, RequestApart, parse_processing_request


def body_request(body: bytes, end_of_stream: bool = True, *, extras: bool = True) -> Any:
    request = pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=end_of_stream))
    if extras:  # fields before and after the body in the encoding
        request.metadata_context.CopyFrom(
            base_pb2.Metadata(filter_metadata={"f": struct_pb2.Struct()})
        )
        request.attributes["x"].fields["y"].string_value = "z"
        request.observability_mode = True
    return request


def as_read(request: Any) -> Any:
    """What the servicer reads, as one protobuf message."""
    if not isinstance(request, RequestApart):
        return request
    whole = pb.ProcessingRequest()
    whole.CopyFrom(request.parsed)
    whole.request_body.body = request.request_body.body
    return whole


@pytest.mark.parametrize("end_of_stream", [True, False])
@pytest.mark.parametrize("extras", [True, False])
def test_a_large_body_is_read_apart_and_reads_as_protobufs_parse(
    end_of_stream: bool, extras: bool
) -> None:
    body = b'{"inputs":[{"data":["' + b"x" * (1 << 20) + b'"]}]}'
    data = body_request(body, end_of_stream, extras=extras).SerializeToString()
    read = parse_processing_request(data)
    assert isinstance(read, RequestApart)
    assert read.WhichOneof("request") == "request_body"
    assert read.request_body.body == body
    assert read.request_body.end_of_stream is end_of_stream
    assert read.observability_mode is extras
    assert dict(read.attributes) == dict(pb.ProcessingRequest.FromString(data).attributes)
    assert as_read(read) == pb.ProcessingRequest.FromString(data)


def test_a_small_body_and_other_messages_are_parsed_whole() -> None:
    for request in (
        body_request(b"x" * (APART_FROM - 1)),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=b"y" * (1 << 20))),
        pb.ProcessingRequest(request_headers=pb.HttpHeaders(end_of_stream=True)),
    ):
        read = parse_processing_request(request.SerializeToString())
        assert isinstance(read, pb.ProcessingRequest)
        assert read == request


def test_a_body_sent_in_two_fields_is_left_to_protobuf_which_joins_them() -> None:
    first = body_request(b"a" * APART_FROM, extras=False).SerializeToString()
    second = pb.ProcessingRequest(request_body=pb.HttpBody(body=b"b" * 10)).SerializeToString()
    read = parse_processing_request(first + second)
    assert isinstance(read, pb.ProcessingRequest)
    assert read.request_body.body == b"b" * 10  # a bytes field given twice: the last wins
    assert read.request_body.end_of_stream


def test_what_protobuf_refuses_is_still_refused() -> None:
    data = body_request(b"x" * (1 << 17)).SerializeToString()
    with pytest.raises(DecodeError):
        parse_processing_request(data[:-1])  # cut short
    with pytest.raises(DecodeError):
        parse_processing_request(data[:1000])


@st.composite
def encodings(draw: st.DrawFn) -> bytes:
    """A ProcessingRequest's encoding with its top-level fields, and the body's, in any order
    (a parser must accept any order; Envoy writes them by number)."""
    chunk = draw(st.binary(min_size=1, max_size=64))
    size = draw(st.integers(APART_FROM - 8, APART_FROM + 5000))  # mostly read apart
    body = (chunk * (size // len(chunk) + 1))[:size]
    inner = [_field(1, body)]
    if draw(st.booleans()):
        inner.append(bytes([2 << 3 | 0, 1]))  # end_of_stream: true
    wrapped = _field(4, b"".join(draw(st.permutations(inner))))
    others = body_request(b"", extras=draw(st.booleans()))
    others.ClearField("request_body")
    return b"".join(draw(st.permutations([wrapped, *_fields(others.SerializeToString())])))


def _field(number: int, value: bytes) -> bytes:
    return encode_varint(number << 3 | 2) + encode_varint(len(value)) + value


def _fields(data: bytes) -> list[bytes]:
    fields = protobuf_fields(data)
    assert fields is not None
    raw, prev = [], 0
    for _, _, _, end in fields:
        raw.append(data[prev:end])
        prev = end
    return raw


@settings(max_examples=60, deadline=None)
@given(data=encodings())
def test_any_encoding_reads_as_protobufs_parse(data: bytes) -> None:
    assert as_read(parse_processing_request(data)) == pb.ProcessingRequest.FromString(data)
