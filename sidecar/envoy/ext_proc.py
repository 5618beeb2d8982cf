"""ext_proc (`envoy.service.ext_proc.v3.ExternalProcessor/Process`): admission, plus the
granted class's Triton priority written into the request body.

Envoy opens one bidirectional stream per HTTP request. With the shipped processing mode
(envoy/snippets/ext-proc.filter.yaml) it sends the request headers and then, when the request
has a body, the whole buffered body; each message waits for its answer:

    request_headers  admit: HeadersResponse setting the decision headers (each
                     OVERWRITE_IF_EXISTS_OR_ADD) with clear_route_cache, so a route may match
                     on them; shed: ImmediateResponse with the decision's status, headers and
                     JSON body, which reaches the client as it is (any status, 503 included)
    request_body     BodyResponse carrying the body with the class's Triton priority and the
                     content-length that goes with it (core.priority); unchanged when there is
                     nothing to rewrite
    anything else    an empty answer of the same kind, so a wider processing mode cannot stall
                     a request

A stream whose first message is not request_headers, or whose headers lack `:method` or
`:path`, is answered 400 (`core.decide.malformed`) and counted.

Leases. The decision headers are set on the request Envoy forwards, so its access-log entry
carries x-qos-lease and the completion stream releases it exactly as in ext_authz mode, however
the request ends. This adapter frees a lease itself only when Envoy cannot forward the request:
the stream ended after the admit but before Envoy had every answer it waits for (a message
timeout, a client gone mid-upload, a body over Envoy's buffer limit: Envoy 1.40 may answer that
413 before it applies the admit, and then logs no lease). A lease released both ways is simply
found gone the second time (`already_released`). A stream cancelled while the sidecar is still
deciding cancels the decision itself, as in the other adapters: `AdmissionService` gives back
what a request held in its deferral queue had taken.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import duration_pb2

from sidecar.core.priority import BodyRewrite, RewriteResult, rewrite_body, triton_priority_of
from sidecar.core.types import Decision, RequestAttributes
from sidecar.service import AdmissionService

API = "ext_proc"
# Envoy's clock starts before ours: extend the phase a little beyond the longest hold.
HOLD_MARGIN_S = 0.5


def override_timeout(seconds: float) -> Any:
    """The reply that extends Envoy's message_timeout for the current phase (once per phase,
    up to the filter's max_message_timeout)."""
    whole = int(seconds)
    return ext_proc_pb2.ProcessingResponse(
        override_message_timeout=duration_pb2.Duration(
            seconds=whole, nanos=int((seconds - whole) * 1e9)
        )
    )


# ProcessingRequest.attributes is keyed by filter name; the shipped filter config asks for the
# mTLS client's URI SAN (request_attributes), the principal ext_authz reads from the peer.
ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"
PRINCIPAL_ATTRIBUTE = "connection.uri_san_peer_certificate"

# Answers for the phases the shipped mode does not send; sent empty (continue unchanged).
_EMPTY_ANSWER: dict[str, Callable[[], Any]] = {
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


def attributes_from_headers(request: Any) -> RequestAttributes | None:
    """The request's attributes from a `request_headers` message; None without :method or
    :path. Envoy 1.40 sends values in `raw_value` (bytes); `value` is read when that is empty.
    Repeated headers are joined with "," as in the other adapters."""
    method = path = None
    headers: dict[str, str] = {}
    for entry in request.request_headers.headers.headers:
        key = entry.key.lower()
        value = entry.raw_value.decode("utf-8", "replace") if entry.raw_value else entry.value
        if key == ":method":
            method = value
        elif key == ":path":
            path = value
        elif not key.startswith(":"):
            headers[key] = f"{headers[key]},{value}" if key in headers else value
    if not method or not path:
        return None
    return RequestAttributes(
        method=method,
        path=path,
        headers=headers,
        principal=_principal(request),
        request_id=headers.get("x-request-id"),
    )


def _principal(request: Any) -> str | None:
    if ATTRIBUTES_KEY not in request.attributes:
        return None
    fields = request.attributes[ATTRIBUTES_KEY].fields
    if PRINCIPAL_ATTRIBUTE not in fields:
        return None
    return str(fields[PRINCIPAL_ATTRIBUTE].string_value) or None


def _header_options(headers: tuple[tuple[str, str], ...]) -> list[Any]:
    return [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=name, raw_value=value.encode()),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        )
        for name, value in headers
    ]


def headers_response_for(decision: Decision) -> Any:
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
                    set_headers=_header_options(decision.headers)
                ),
                clear_route_cache=True,
            )
        )
    )


def body_response_for(rewrite: BodyRewrite) -> Any:
    """The answer to request_body: the new body with its headers, or continue unchanged."""
    if rewrite.body is None:
        return ext_proc_pb2.ProcessingResponse(request_body=ext_proc_pb2.BodyResponse())
    return ext_proc_pb2.ProcessingResponse(
        request_body=ext_proc_pb2.BodyResponse(
            response=ext_proc_pb2.CommonResponse(
                header_mutation=ext_proc_pb2.HeaderMutation(
                    set_headers=_header_options(rewrite.headers)
                ),
                body_mutation=ext_proc_pb2.BodyMutation(body=rewrite.body),
            )
        )
    )


@dataclass
class _Stream:
    """What one stream (one HTTP request) has seen and answered so far."""

    attrs: RequestAttributes | None = None
    admitted: Decision | None = None
    partial_body: bool = False  # a body chunk without end_of_stream: the body is not buffered
    # The answer being written is the last one Envoy waits for before forwarding the request.
    completes: bool = False
    # Envoy has every answer it needs to forward the request: from then on only the access log
    # may release the lease.
    forwardable: bool = False


class ExternalProcessorServicer(ext_proc_pb2_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, service: AdmissionService) -> None:
        self._service = service

    async def Process(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Answer each message of one request's stream. Raises CancelledError when Envoy
        resets the stream (client gone, message timeout); an admit Envoy cannot have used is
        released first."""
        stream = _Stream()
        try:
            async for request in request_iterator:
                response, last = await self._answer(stream, request, context.write)
                await context.write(response)
                stream.forwardable = stream.forwardable or stream.completes
                if last:
                    return
        finally:
            if stream.admitted is not None and not stream.forwardable:
                await self._service.release_undelivered(stream.admitted)

    async def _answer(
        self, stream: _Stream, request: Any, write: Callable[[Any], Awaitable[None]]
    ) -> tuple[Any, bool]:
        """The answer to one message, and whether it is the last this stream gets."""
        kind = request.WhichOneof("request")
        if stream.attrs is None:
            attrs = attributes_from_headers(request) if kind == "request_headers" else None
            if attrs is None:
                decision = self._service.refuse_malformed(
                    "ext_proc stream did not start with request headers"
                    if kind != "request_headers"
                    else "ext_proc request headers lack :method or :path",
                    API,
                )
                return headers_response_for(decision), True
            stream.attrs = attrs

            async def extend_timeout(max_wait_s: float) -> None:
                # Held until Triton has room: tell Envoy not to give up on this phase.
                await write(override_timeout(max_wait_s + HOLD_MARGIN_S))

            decision = await self._service.check(attrs, API, on_hold=extend_timeout)
            if decision.admitted:
                stream.admitted = decision
                stream.completes = request.request_headers.end_of_stream  # no body to come
            return headers_response_for(decision), not decision.admitted
        if kind == "request_body":
            return self._body_answer(stream, request.request_body), False
        empty = _EMPTY_ANSWER.get(kind)
        if empty is not None:
            return empty(), False
        decision = self._service.refuse_malformed(
            f"ext_proc stream sent {kind or 'an empty message'} mid-request", API
        )
        return headers_response_for(decision), True

    def _body_answer(self, stream: _Stream, body: Any) -> Any:
        stream.completes = body.end_of_stream
        if not body.end_of_stream or stream.partial_body:
            # Chunks (STREAMED or BUFFERED_PARTIAL mode): a priority cannot be spliced into
            # part of a body, so every chunk passes unchanged; counted once.
            if not stream.partial_body:
                stream.partial_body = True
                self._service.metrics.priority_rewrites.labels(
                    RewriteResult.UNSUPPORTED.value
                ).inc()
            return body_response_for(BodyRewrite(RewriteResult.UNSUPPORTED))
        assert stream.attrs is not None and stream.admitted is not None
        priority = triton_priority_of(stream.admitted)
        if priority is None:
            return body_response_for(BodyRewrite(RewriteResult.UNSUPPORTED))
        rewrite = rewrite_body(stream.attrs.path, stream.attrs.headers, body.body, priority)
        self._service.metrics.priority_rewrites.labels(rewrite.result.value).inc()
        return body_response_for(rewrite)
