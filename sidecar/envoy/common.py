"""What every Envoy adapter does the same way, written once.

Rules:
1. Headers reach the core with lower-case names and one value each: a repeated header's
   values are joined with "," (RFC 9110 5.3), so every adapter hands the core the same
   `RequestAttributes.headers` for the same request. Pseudo-headers (`:path`, `:status`) are
   kept apart; a repeated one keeps its last value.
2. Decision headers go back to Envoy as `HeaderValueOption`s with OVERWRITE_IF_EXISTS_OR_ADD,
   so a client-sent copy can never survive next to ours. The value travels in the field the
   receiving Envoy filter reads: ext_proc reads `raw_value` only (bytes; Envoy has done so
   since 1.27, `send_header_raw_value`), ext_authz gRPC reads `value`.
3. Deliver the answer or release the admit: a decision that holds a lease but whose answer
   the caller can no longer receive (the call was cancelled, the connection closed, the stream
   ended before Envoy could forward the request) is released at once by the adapter, because
   no access-log entry will ever carry that lease.
4. The lease never travels in a request header, where a client could put one of its own (an
   access-log entry of a request Envoy rejected before the strip filter ran carries the
   client's headers). It goes from the decision to the access log in Envoy's dynamic
   metadata, which only filters write: ext_authz stores what its server returns (gRPC:
   `CheckResponse.dynamic_metadata`; HTTP: the response headers named in
   `dynamic_metadata_from_headers`) under `envoy.filters.http.ext_authz`; ext_proc stores
   `ProcessingResponse.dynamic_metadata` under the namespaces its filter lets it write
   (`metadata_options.receiving_namespaces`). It is signed with the deployment's key
   (`core.lease.sign_lease`) so that only this sidecar's tokens release anything.
5. With an auth token configured (`Settings.auth_token`), a call that does not carry it is
   refused before it is read, so it takes nothing, charges nothing and releases nothing:
   ext_authz HTTP answers 401 with a JSON reason; every gRPC call (Check, Process,
   StreamAccessLogs) ends UNAUTHENTICATED. Envoy sends the token as the header `x-qos-auth`
   (`http_service.authorization_request.headers_to_add`) or as gRPC metadata of that name
   (`grpc_service.initial_metadata`). `TokenCheck` is the one place this is decided.
6. Envoy health-checks both listeners (`envoy/snippets/clusters.yaml`), so that a sidecar that
   hangs (alive, not answering) is taken out within seconds and new requests get Envoy's 503
   at once instead of waiting the whole check timeout: ext_authz HTTP answers `GET
   HEALTH_PATH` with 204, the gRPC server the standard `grpc.health.v1.Health/Check` with
   SERVING. Both answer from the event loop that answers checks, so they say what Envoy
   needs to know: whether a check would be answered now. 204 is not 200, so to the ext_authz
   filter the health route can only ever deny, whoever calls it. Neither needs the token of
   rule 5: they read nothing, take nothing and say only that the loop runs.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from sidecar.core.decide import HEADER_LEASE
from sidecar.core.lease import format_lease, sign_lease
from sidecar.core.types import Decision
from sidecar.service import AdmissionService

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# Rule 4: where the lease is in Envoy's dynamic metadata (namespace, key). The key is the
# header's name because ext_authz HTTP names its metadata after the response header.
LEASE_KEY = HEADER_LEASE
EXT_AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
# Must be listed in the ext_proc filter's metadata_options.receiving_namespaces.untyped.
EXT_PROC_NAMESPACE = "qos.sidecar"
LEASE_NAMESPACES = (EXT_AUTHZ_NAMESPACE, EXT_PROC_NAMESPACE)
# Rule 5: the header (HTTP) or metadata key (gRPC) that carries the auth token.
AUTH_HEADER = "x-qos-auth"
UNAUTHENTICATED_REASON = f"missing or wrong {AUTH_HEADER}: only Envoy may call this listener"
UNAUTHENTICATED_BODY = json.dumps(
    {"error": "unauthenticated", "reason": "unauthenticated", "detail": UNAUTHENTICATED_REASON},
    separators=(",", ":"),
).encode()
# Rule 6.
HEALTH_PATH = "/healthz"
HEALTH_STATUS = 204
GRPC_HEALTH_SERVICE = "grpc.health.v1.Health"
GRPC_HEALTH_METHOD = f"/{GRPC_HEALTH_SERVICE}/Check"
# grpc.health.v1.HealthCheckResponse{status: SERVING}: field 1 (varint) = 1.
SERVING = b"\x08\x01"
# The gRPC methods, named by the API label of qos_unauthenticated_calls_total (bounded).
_GRPC_APIS = {
    "/envoy.service.auth.v3.Authorization/Check": "grpc",
    "/envoy.service.ext_proc.v3.ExternalProcessor/Process": "ext_proc",
    "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs": "access_log",
}


class TokenCheck:
    """Rule 5. `token` empty: every call passes. `on_refused(api)` returns what counts a
    refusal (a labelled Prometheus counter: `Counter.labels`)."""

    def __init__(self, token: str, on_refused: Callable[[str], Any]) -> None:
        self._token = token.encode()
        self._on_refused = on_refused

    def admits(self, presented: str | bytes | None, api: str) -> bool:
        """Whether a call that presented `presented` may go on; counts a refusal. Compared
        in constant time, so the answer's timing does not reveal how much of a guess was
        right."""
        if not self._token:
            return True
        if isinstance(presented, str):
            presented = presented.encode()
        if presented is not None and hmac.compare_digest(presented, self._token):
            return True
        self._on_refused(api).inc()
        return False

    def grpc_interceptor(self) -> grpc.aio.ServerInterceptor:
        """Rule 5 for every method of a grpc.aio server, before the servicer sees the call."""
        return _TokenInterceptor(self)


class _TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, check: TokenCheck) -> None:
        self._check = check

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler_call_details.method == GRPC_HEALTH_METHOD:  # rule 6
            return handler
        presented = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == AUTH_HEADER:
                presented = value
        api = _GRPC_APIS.get(handler_call_details.method, "other")
        if handler is None or self._check.admits(presented, api):
            return handler
        return _refusing(handler)


def _refusing(handler: Any) -> Any:
    """A method handler of `handler`'s kind that ends the call UNAUTHENTICATED, never reading
    the request."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_REASON)

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def headers_for_envoy(decision: Decision) -> tuple[tuple[str, str], ...]:
    """Rule 4: the decision headers that go upstream or to the client, without the lease."""
    return tuple((name, value) for name, value in decision.headers if name != HEADER_LEASE)


def signed_lease(decision: Decision, key: bytes) -> str | None:
    """Rule 4: the decision's lease as it travels through Envoy, signed; None without one."""
    if decision.lease is None:
        return None
    return sign_lease(format_lease(decision.lease), key)


def lease_metadata(decision: Decision, key: bytes) -> Any:
    """Rule 4, ext_proc: the signed lease as ProcessingResponse.dynamic_metadata (namespace →
    fields), or None without a lease."""
    lease = signed_lease(decision, key)
    if lease is None:
        return None
    metadata = struct_pb2.Struct()
    metadata.update({EXT_PROC_NAMESPACE: {LEASE_KEY: lease}})
    return metadata


def read_headers(pairs: Iterable[tuple[str, str]]) -> tuple[dict[str, str], dict[str, str]]:
    """Rule 1: (headers, pseudo-headers) of `pairs` (name, value), names in lower case."""
    headers: dict[str, str] = {}
    pseudo: dict[str, str] = {}
    for name, value in pairs:
        key = name.lower()
        if key.startswith(":"):
            pseudo[key] = value
        else:
            headers[key] = f"{headers[key]},{value}" if key in headers else value
    return headers, pseudo


def header_map_pairs(header_map: Any) -> Iterable[tuple[str, str]]:
    """The (name, value) pairs of an Envoy `HeaderMap`. Envoy 1.40 sends values in
    `raw_value` (bytes); `value` is read when that is empty."""
    for entry in header_map.headers:
        value = entry.raw_value.decode("utf-8", "replace") if entry.raw_value else entry.value
        yield entry.key, value


def header_options(headers: Iterable[tuple[str, str]], *, raw_value: bool) -> list[Any]:
    """Rule 2: `headers` as HeaderValueOptions that overwrite; the value in `raw_value` (for
    ext_proc) or in `value` (for ext_authz gRPC)."""
    return [
        base_pb2.HeaderValueOption(
            header=(
                base_pb2.HeaderValue(key=name, raw_value=value.encode())
                if raw_value
                else base_pb2.HeaderValue(key=name, value=value)
            ),
            append_action=_OVERWRITE,
        )
        for name, value in headers
    ]


async def release_if_undelivered(
    service: AdmissionService, decision: Decision | None, *, delivered: bool
) -> None:
    """Rule 3: free `decision`'s lease unless its answer was delivered. Shielded from the
    caller's cancellation (`AdmissionService.release_undelivered`); a lease another path
    freed first is simply found gone (`already_released`)."""
    if decision is not None and decision.lease is not None and not delivered:
        await service.release_undelivered(decision)


def grpc_health_handler() -> grpc.GenericRpcHandler:
    """Rule 6: `grpc.health.v1.Health/Check` answers SERVING for any service name (the
    request is not parsed; there is one service to speak for). Written as raw bytes, which
    keeps the health protos out of the dependencies."""

    async def check(_request: bytes, _context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return SERVING

    return grpc.method_handlers_generic_handler(
        GRPC_HEALTH_SERVICE, {"Check": grpc.unary_unary_rpc_method_handler(check)}
    )
