"""ext_authz over gRPC (`envoy.service.auth.v3.Authorization/Check`).

An admit is `status.code = OK` with the decision headers in `ok_response`, each set with
OVERWRITE_IF_EXISTS_OR_ADD so a client-sent copy can never survive next to ours. A shed is a
non-OK status with `denied_response` carrying the HTTP status, headers and JSON body that the
client receives. The lease goes back signed in `dynamic_metadata`, never as a header (see
`common.py`, rule 4). A Check without an HTTP request or without a path was not written by
Envoy: it is refused 400 (counted as malformed) and takes nothing.
"""

from __future__ import annotations

from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from sidecar.core.types import Decision, RequestAttributes
from sidecar.envoy.common import (
    LEASE_KEY,
    header_options,
    headers_for_envoy,
    read_headers,
    release_if_undelivered,
    signed_lease,
)
from sidecar.service import AdmissionService

API = "grpc"
_RPC_CODE = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    429: code_pb2.RESOURCE_EXHAUSTED,
    503: code_pb2.UNAVAILABLE,
}


def attributes_from_check(request: Any) -> RequestAttributes | None:
    """The request's attributes, or None when the CheckRequest has no HTTP request in it or
    no path (Envoy always sends one: such a call came from elsewhere)."""
    if not request.attributes.request.HasField("http"):
        return None
    http = request.attributes.request.http
    if not http.path.startswith("/"):
        return None
    # Envoy has already joined repeated headers: the map holds one value per name.
    headers, _ = read_headers(http.headers.items())
    return RequestAttributes(
        method=http.method,
        path=http.path,
        headers=headers,
        principal=request.attributes.source.principal or None,
        request_id=http.id or headers.get("x-request-id"),
    )


def _header_options(headers: tuple[tuple[str, str], ...]) -> list[Any]:
    # ext_authz gRPC reads HeaderValue.value (common.py, rule 2).
    return header_options(headers, raw_value=False)


def check_response_for(decision: Decision, lease_key: bytes) -> Any:
    if decision.admitted:
        lease = signed_lease(decision, lease_key)
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=_header_options(headers_for_envoy(decision))
            ),
            dynamic_metadata=None if lease is None else _struct({LEASE_KEY: lease}),
        )
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(
            code=_RPC_CODE.get(decision.status, code_pb2.PERMISSION_DENIED),
            message=decision.reason.value,
        ),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=decision.status),
            headers=_header_options(decision.headers),
            body=decision.body.decode(),
        ),
    )


def _struct(fields: dict[str, str]) -> Any:
    struct = struct_pb2.Struct()
    struct.update(fields)
    return struct


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, service: AdmissionService, *, lease_key: bytes) -> None:
        self._service = service
        self._lease_key = lease_key

    async def Check(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        attrs = attributes_from_check(request)
        if attrs is None:
            decision = self._service.refuse_malformed(
                "CheckRequest has no attributes.request.http with a path", API
            )
            return check_response_for(decision, self._lease_key)
        decision = await self._service.check(attrs, API)
        await release_if_undelivered(self._service, decision, delivered=not context.cancelled())
        return check_response_for(decision, self._lease_key)
