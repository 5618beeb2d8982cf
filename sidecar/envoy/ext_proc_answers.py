"""The messages the sidecar answers an ext_proc stream with (see `sidecar.envoy.ext_proc` for
when each is sent): the decision as a header mutation or an ImmediateResponse, the rewritten
body, the continue that waits for the body, and the hold's timeout extension.

A rewritten body can be answered as a `SplitBody`: the answer without its body, encoded by
protobuf, and the body after it with the few octets of field wrapping that put it in
`request_body.response.body_mutation.body`. A parser merges a message field that comes twice,
so Envoy reads the same answer; the body (a megabyte, for a large tensor) is then never copied
into a protobuf message and out of it again. The sidecar's own gRPC server sends the parts as
they are (`grpc_methods`); grpc.aio gets whole messages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import duration_pb2

from sidecar.core.priority import BodyRewrite
from sidecar.core.record import record
from sidecar.core.types import Decision
from sidecar.envoy.common import (
    header_options,
    headers_for_envoy,
    lease_metadata,
)


def override_timeout(seconds: float) -> Any:
    """The reply that extends Envoy's message_timeout for the current phase (once per phase,
    up to the filter's max_message_timeout)."""
    whole = int(seconds)
    return ext_proc_pb2.ProcessingResponse(
        override_message_timeout=duration_pb2.Duration(
            seconds=whole, nanos=int((seconds - whole) * 1e9)
        )
    )


# Answers for the phases the shipped mode does not send (and for a request body after the
# request's end); sent empty (continue unchanged).
EMPTY_ANSWER: dict[str, Callable[[], Any]] = {
    "request_body": lambda: ext_proc_pb2.ProcessingResponse(
        request_body=ext_proc_pb2.BodyResponse()
    ),
    "request_trailers": lambda: ext_proc_pb2.ProcessingResponse(
        request_trailers=ext_proc_pb2.TrailersResponse()
    ),
    "response_headers": lambda: ext_proc_pb2.ProcessingResponse(
        response_headers=ext_proc_pb2.HeadersResponse()
    ),
    "response_body": lambda: ext_proc_pb2.ProcessingResponse(
        response_body=ext_proc_pb2.BodyResponse()
    ),
    "response_trailers": lambda: ext_proc_pb2.ProcessingResponse(
        response_trailers=ext_proc_pb2.TrailersResponse()
    ),
}


def _header_options(headers: tuple[tuple[str, str], ...]) -> list[Any]:
    # ext_proc reads HeaderValue.raw_value only (common.py, rule 2).
    return header_options(headers, raw_value=True)


def headers_response_for(decision: Decision, lease_key: bytes = b"") -> Any:
    """The answer to request_headers: an admit's header mutation, or a shed's local reply."""
    if not decision.admitted:
        return ext_proc_pb2.ProcessingResponse(
            immediate_response=ext_proc_pb2.ImmediateResponse(
                status=http_status_pb2.HttpStatus(code=decision.status),
                headers=ext_proc_pb2.HeaderMutation(set_headers=_header_options(decision.headers)),
                body=decision.body,
                # Envoy's response_code_details (access log): why the sidecar answered.
                details=f"qos_{decision.reason.value}",
            )
        )
    return ext_proc_pb2.ProcessingResponse(
        request_headers=ext_proc_pb2.HeadersResponse(
            response=ext_proc_pb2.CommonResponse(
                header_mutation=ext_proc_pb2.HeaderMutation(
                    set_headers=_header_options(headers_for_envoy(decision))
                ),
                clear_route_cache=True,
            )
        ),
        dynamic_metadata=lease_metadata(decision, lease_key),
    )


# Field numbers of the path from a ProcessingResponse to its new request body, outermost first.
_BODY_PATH = (
    ext_proc_pb2.ProcessingResponse.DESCRIPTOR.fields_by_name["request_body"].number,
    ext_proc_pb2.BodyResponse.DESCRIPTOR.fields_by_name["response"].number,
    ext_proc_pb2.CommonResponse.DESCRIPTOR.fields_by_name["body_mutation"].number,
    ext_proc_pb2.BodyMutation.DESCRIPTOR.fields_by_name["body"].number,
)
_LENGTH_DELIMITED = 2  # protobuf wire type of bytes and of embedded messages


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@record
class SplitBody:
    """An answer whose new body is kept apart from the protobuf message (module comment)."""

    head: Any  # the ProcessingResponse without the body
    body: bytes

    def wire_parts(self) -> tuple[bytes, bytes]:
        """The answer's encoding in two parts: the head's and the wrapping, then the body."""
        wrapping, size = b"", len(self.body)
        for number in reversed(_BODY_PATH):
            field = _varint(number << 3 | _LENGTH_DELIMITED) + _varint(size)
            wrapping, size = field + wrapping, size + len(field)
        return self.head.SerializeToString() + wrapping, self.body

    def message(self) -> Any:
        """The same answer as one protobuf message (what a reader of `wire_parts` gets)."""
        whole = ext_proc_pb2.ProcessingResponse()
        whole.CopyFrom(self.head)
        whole.request_body.response.body_mutation.body = self.body
        return whole


def body_response_for(
    rewrite: BodyRewrite,
    admit: Decision | None = None,
    lease_key: bytes = b"",
    *,
    split: bool = False,
) -> Any:
    """The answer to request_body: the new body with its headers, or continue unchanged.
    With `admit` (a request decided on its body) the decision headers are set too, and the
    route chosen again with them. `split`: a new body comes as a `SplitBody`."""
    headers = (*(headers_for_envoy(admit) if admit is not None else ()), *rewrite.headers)
    metadata = None if admit is None else lease_metadata(admit, lease_key)
    if rewrite.body is None and not headers:
        return ext_proc_pb2.ProcessingResponse(
            request_body=ext_proc_pb2.BodyResponse(), dynamic_metadata=metadata
        )
    inline = rewrite.body is not None and not split
    answer = ext_proc_pb2.ProcessingResponse(
        request_body=ext_proc_pb2.BodyResponse(
            response=ext_proc_pb2.CommonResponse(
                header_mutation=ext_proc_pb2.HeaderMutation(set_headers=_header_options(headers)),
                body_mutation=ext_proc_pb2.BodyMutation(body=rewrite.body) if inline else None,
                clear_route_cache=admit is not None,
            )
        ),
        dynamic_metadata=metadata,
    )
    if rewrite.body is None or inline:
        return answer
    return SplitBody(answer, rewrite.body)


def wait_for_body(meter_response: bool) -> Any:
    """The answer to the headers of a request decided on its body: continue; with
    `meter_response` (a token model), send the response headers and body too, so its token
    usage can be counted."""
    if not meter_response:
        return ext_proc_pb2.ProcessingResponse(request_headers=ext_proc_pb2.HeadersResponse())
    mode = processing_mode_pb2.ProcessingMode
    return ext_proc_pb2.ProcessingResponse(
        request_headers=ext_proc_pb2.HeadersResponse(),
        mode_override=mode(
            request_header_mode=mode.SEND,
            request_body_mode=mode.BUFFERED,
            request_trailer_mode=mode.SKIP,
            response_header_mode=mode.SEND,
            # Streamed either way: a buffered response over Envoy's limit would fail.
            response_body_mode=mode.STREAMED,
            response_trailer_mode=mode.SKIP,
        ),
    )
