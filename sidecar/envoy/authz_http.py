"""ext_authz over HTTP: Envoy sends the request's method, path and allowed headers.

Envoy is configured with `path_prefix: /authz`, so `/authz/v2/models/m/infer` arrives here
for a client request to `/v2/models/m/infer`. A 200 admits and Envoy copies the decision
headers upstream (`allowed_upstream_headers`); any other status is forwarded to the client
with our body and headers. Envoy treats a 5xx from the authorization server as an error of
the server itself (`status_on_error`), so overload sheds travel as the unassigned status 430
with `x-qos-status: 503`, and the shipped Envoy config's local-reply mapper
(envoy/snippets/overload-local-reply.yaml) restores the 503 with our headers and body.

The lease goes back as the response header `x-qos-lease`, signed; the shipped filter turns it
into dynamic metadata (`dynamic_metadata_from_headers`) and does not copy it upstream (see
`common.py`, rule 4). A call whose path does not start with the prefix was not written by
Envoy: it is refused 400 (counted as malformed) and takes nothing. The one exception is
Envoy's health check, `GET /healthz`, answered 204 (`common.py`, rule 6).

The listener is `http_wire.WireListener`, a small HTTP/1.1 server for Envoy's dialect. Every
answer is JSON with a reason, whoever calls: a request the wire refuses (a malformed line, a
header section over Envoy's own limits, a transfer-encoding) and a header that is not UTF-8
(handed over as surrogate escapes, which no identity can match) are 400 `malformed`, counted
in `qos_malformed_requests_total`; anything this module did not foresee is 500
`internal_error` with a JSON body, counted in `qos_adapter_errors_total`. The wire takes a
header section larger than Envoy ever sends (`http_wire.MAX_HEAD_BYTES`), so the core's
length and syntax checks, not the wire, answer an oversized header.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping

from sidecar.core.decide import HEADER_LEASE
from sidecar.core.types import Decision, RequestAttributes
from sidecar.envoy.common import (
    AUTH_HEADER,
    HEALTH_PATH,
    HEALTH_STATUS,
    UNAUTHENTICATED_BODY,
    TokenCheck,
    headers_for_envoy,
    read_headers,
    release_if_undelivered,
    signed_lease,
)
from sidecar.envoy.http_wire import WireError, WireListener, WireRequest, WireResponse
from sidecar.service import AdmissionService

# Set by Envoy from the verified client certificate (authorization_request.headers_to_add),
# which overwrites any copy the client sent.
PRINCIPAL_HEADER = "x-qos-peer-principal"
STATUS_HEADER = "x-qos-status"
# Must match the status_code_filter in envoy/snippets/overload-local-reply.yaml.
OVERLOAD_WIRE_STATUS = 430
API = "http"
_JSON = (("content-type", "application/json"),)
_INTERNAL = WireResponse(
    500,
    _JSON,
    json.dumps(
        {"error": "internal", "reason": "internal_error", "retry_after_ms": None},
        separators=(",", ":"),
    ).encode(),
)
_UNAUTHENTICATED = WireResponse(401, _JSON, UNAUTHENTICATED_BODY)
_HEALTHY = WireResponse(HEALTH_STATUS)
log = logging.getLogger(__name__)


def not_text(headers: Mapping[str, str]) -> str | None:
    """The name of the first header whose value is not UTF-8 (None: all are)."""
    for name, value in headers.items():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # surrogate escapes: bytes that were not UTF-8
            return name
    return None


def headers_of(request: WireRequest) -> dict[str, str]:
    """`read_headers` of the request's fields. The wire's names are lower-case tokens already
    (`http_wire.py`, rule 1) and never pseudo-headers, so where no name repeats they are one
    `dict` call; a repeat is joined as `read_headers` joins it."""
    headers = dict(request.headers)
    if len(headers) == len(request.headers):
        return headers
    return read_headers(request.headers)[0]


def attributes_of(
    request: WireRequest, headers: dict[str, str], path_prefix: str
) -> RequestAttributes | None:
    """The attributes of the client request Envoy asks about; None when the path lacks the
    prefix (then Envoy did not send it)."""
    path = request.target
    if path_prefix:
        if not path.startswith(path_prefix + "/"):
            return None
        path = path[len(path_prefix) :]
    return RequestAttributes(
        method=request.method,
        path=path,
        headers=headers,
        principal=headers.pop(PRINCIPAL_HEADER, None) or None,
        request_id=headers.get("x-request-id"),
    )


def response_for(decision: Decision, lease_key: bytes) -> WireResponse:
    headers = headers_for_envoy(decision)
    lease = signed_lease(decision, lease_key)
    if lease is not None:
        headers = (*headers, (HEADER_LEASE, lease))
    status = decision.status
    if status >= 500:
        headers = (*headers, (STATUS_HEADER, str(status)))
        status = OVERLOAD_WIRE_STATUS
    return WireResponse(status, headers, decision.body)


class AuthzHttp:
    """The ext_authz HTTP adapter: a `WireListener`'s handler, refusal and failure."""

    def __init__(
        self,
        service: AdmissionService,
        *,
        lease_key: bytes,
        auth: TokenCheck | None = None,
        path_prefix: str = "/authz",
    ) -> None:
        self._service = service
        self._lease_key = lease_key
        self._auth = auth
        self._path_prefix = path_prefix

    def listener(self) -> WireListener:
        return WireListener(self.answer, self.refuse, self.fail)

    async def answer(self, request: WireRequest, transport: asyncio.Transport) -> WireResponse:
        headers = headers_of(request)
        if request.method in ("GET", "HEAD") and request.target.split("?", 1)[0] == HEALTH_PATH:
            return _HEALTHY  # common.py, rule 6
        # Without the token (common.py, rule 5): 401, and nothing is read or taken.
        if self._auth is not None and not self._auth.admits(headers.get(AUTH_HEADER), API):
            return _UNAUTHENTICATED
        attrs = attributes_of(request, headers, self._path_prefix)
        if attrs is None:
            detail = f"authz path must start with {self._path_prefix}/"
            return response_for(self._service.refuse_malformed(detail, API), self._lease_key)
        bad = None if request.utf8 else not_text(attrs.headers)
        if bad is not None:
            detail = f"header {bad!r} is not UTF-8"
            return response_for(self._service.refuse_malformed(detail, API), self._lease_key)
        decision = await self._service.check(attrs, API)
        # Envoy hung up while we decided: nobody will carry this lease to completion.
        await release_if_undelivered(self._service, decision, delivered=not transport.is_closing())
        return response_for(decision, self._lease_key)

    def refuse(self, error: WireError) -> WireResponse:
        """A request the wire could not read: 400 `malformed`, counted, nothing taken."""
        refused = self._service.refuse_malformed(error.detail, API)
        return response_for(refused, self._lease_key)

    def fail(self, error: Exception) -> WireResponse:
        """Anything unforeseen: a JSON 500, logged and counted."""
        log.error("authz request failed", exc_info=error)
        self._service.metrics.adapter_errors.labels(API).inc()
        return _INTERNAL
