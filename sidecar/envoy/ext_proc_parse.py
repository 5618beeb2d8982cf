"""Reading an ext_proc `ProcessingRequest` off the wire without copying a large request body
through protobuf (the sidecar's own gRPC server; grpc.aio parses its messages itself).

Rules:
1. A message whose `request_body.body` is at least APART_FROM bytes is read in two parts:
   protobuf parses the message without that one field (its headers, attributes, metadata and
   `end_of_stream` as sent), and the body is taken from the message's bytes as they are, one
   copy. Parsed whole, a megabyte body was copied into protobuf's arena and out of it again
   (`.body`) before the priority rewrite read it.
2. The result reads as the parsed message does for everything the servicer asks of it:
   `WhichOneof`, every other field, and `request_body.body` / `request_body.end_of_stream`.
3. Anything else is parsed whole as before: a smaller body, another kind of message, and
   whatever this reading does not expect (the body field twice, which protobuf would join,
   a field that is not well formed): protobuf then reads it, or refuses it, as it always did.
"""

from __future__ import annotations

from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2

from sidecar.core.kserve import encode_varint, protobuf_fields
from sidecar.core.record import record

APART_FROM = 64 * 1024  # octets of body from which it is read apart (rule 1)
_LENGTH_DELIMITED = 2
_REQUEST_BODY = ext_proc_pb2.ProcessingRequest.DESCRIPTOR.fields_by_name["request_body"].number
_BODY = ext_proc_pb2.HttpBody.DESCRIPTOR.fields_by_name["body"].number


@record
class HttpBodyApart:
    """`request_body` of a message read in two parts: the body and what protobuf read."""

    body: bytes
    parsed: Any  # the HttpBody without its body: end_of_stream and the rest as sent

    def __getattr__(self, name: str) -> Any:
        return getattr(self.parsed, name)


@record
class RequestApart:
    """A `ProcessingRequest` whose request body was read apart from the rest (rule 2)."""

    parsed: Any  # the ProcessingRequest without the body
    request_body: HttpBodyApart

    def WhichOneof(self, name: str) -> str | None:  # protobuf's name and signature
        return self.parsed.WhichOneof(name)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.parsed, name)


def parse_processing_request(data: bytes) -> Any:
    """The message in `data`: a `RequestApart` when rule 1 applies, else protobuf's."""
    apart = _body_apart(data)
    if apart is None:
        return ext_proc_pb2.ProcessingRequest.FromString(data)
    rest, body = apart
    parsed = ext_proc_pb2.ProcessingRequest.FromString(rest)
    return RequestApart(parsed, HttpBodyApart(body, parsed.request_body))


def _body_apart(data: bytes) -> tuple[bytes, bytes] | None:
    """(the message without its request body's body, the body), or None (rule 3)."""
    if len(data) < APART_FROM:
        return None
    fields = protobuf_fields(data)
    wrapped = _only(fields, _REQUEST_BODY)
    if fields is None or wrapped is None:
        return None
    begin, end = wrapped
    inner = protobuf_fields(data, begin, end)
    body = _only(inner, _BODY)
    if inner is None or body is None or body[1] - body[0] < APART_FROM:
        return None
    body_start, body_end = body
    # A field runs from its tag, just after the end of the field before it, to its end.
    body_tag = max((f[3] for f in inner if f[3] <= body_start), default=begin)
    inner_rest = data[begin:body_tag] + data[body_end:end]
    wrapper_tag = max((f[3] for f in fields if f[3] <= begin), default=0)
    rest = b"".join(
        (
            data[:wrapper_tag],
            encode_varint(_REQUEST_BODY << 3 | _LENGTH_DELIMITED),
            encode_varint(len(inner_rest)),
            inner_rest,
            data[end:],
        )
    )
    return rest, data[body_start:body_end]


def _only(fields: list[tuple[int, int, int, int]] | None, number: int) -> tuple[int, int] | None:
    """Where the one length-delimited field `number` is; None if absent, twice or another type."""
    found = [f for f in fields or () if f[0] == number]
    if len(found) != 1 or found[0][1] != _LENGTH_DELIMITED:
        return None
    return found[0][2], found[0][3]
