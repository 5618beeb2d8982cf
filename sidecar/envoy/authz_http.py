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

Every answer is JSON with a reason, whoever calls: a header that is not UTF-8 is 400
`malformed` (aiohttp hands such bytes over as surrogate escapes, which no identity can match),
and anything this module did not foresee is 500 `internal_error` with a JSON body, counted in
`qos_adapter_errors_total`, never aiohttp's plain-text page. Header limits are raised to
Envoy's own (`MAX_FIELD_BYTES`) so that the core's length and syntax checks, not aiohttp's
parser, answer an oversized header.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from aiohttp import web
from aiohttp.typedefs import Handler

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
from sidecar.service import AdmissionService

# Set by Envoy from the verified client certificate (authorization_request.headers_to_add),
# which overwrites any copy the client sent.
PRINCIPAL_HEADER = "x-qos-peer-principal"
STATUS_HEADER = "x-qos-status"
# Must match the status_code_filter in envoy/snippets/overload-local-reply.yaml.
OVERLOAD_WIRE_STATUS = 430
API = "http"
# Envoy refuses request headers over 60 KiB in total (max_request_headers_kb), so it never
# forwards a longer field: with these limits aiohttp's parser never answers before the core.
MAX_FIELD_BYTES = 64 * 1024
log = logging.getLogger(__name__)


def not_text(headers: Mapping[str, str]) -> str | None:
    """The name of the first header whose value is not UTF-8 (None: all are)."""
    for name, value in headers.items():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # surrogate escapes: bytes that were not UTF-8
            return name
    return None


def attributes_from_request(request: web.BaseRequest, path_prefix: str) -> RequestAttributes | None:
    """The attributes of the client request Envoy asks about; None when the path lacks the
    prefix (then Envoy did not send it)."""
    path = request.raw_path
    if path_prefix:
        if not path.startswith(path_prefix + "/"):
            return None
        path = path[len(path_prefix) :]
    headers, _ = read_headers(request.headers.items())
    return RequestAttributes(
        method=request.method,
        path=path,
        headers=headers,
        principal=headers.pop(PRINCIPAL_HEADER, None) or None,
        request_id=headers.get("x-request-id"),
    )


def response_for(decision: Decision, lease_key: bytes) -> web.Response:
    headers = dict(headers_for_envoy(decision))
    lease = signed_lease(decision, lease_key)
    if lease is not None:
        headers[HEADER_LEASE] = lease
    status = decision.status
    if status >= 500:
        headers[STATUS_HEADER] = str(status)
        status = OVERLOAD_WIRE_STATUS
    return web.Response(status=status, headers=headers, body=decision.body)


def build_authz_app(
    service: AdmissionService,
    *,
    lease_key: bytes,
    auth: TokenCheck | None = None,
    path_prefix: str = "/authz",
) -> web.Application:
    @web.middleware
    async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise  # none is raised here: every path is routed to `check`
        except Exception:
            log.exception("authz request failed")
            service.metrics.adapter_errors.labels(API).inc()
            body = {"error": "internal", "reason": "internal_error", "retry_after_ms": None}
            return web.Response(
                status=500,
                body=json.dumps(body, separators=(",", ":")).encode(),
                content_type="application/json",
            )

    async def check(request: web.Request) -> web.Response:
        # Without the token (common.py, rule 5): 401, and nothing is read or taken.
        if auth is not None and not auth.admits(request.headers.get(AUTH_HEADER), API):
            return web.Response(
                status=401, body=UNAUTHENTICATED_BODY, content_type="application/json"
            )
        attrs = attributes_from_request(request, path_prefix)
        if attrs is None:
            refused = service.refuse_malformed(f"authz path must start with {path_prefix}/", API)
            return response_for(refused, lease_key)
        bad = not_text(attrs.headers)
        if bad is not None:
            refused = service.refuse_malformed(f"header {bad!r} is not UTF-8", API)
            return response_for(refused, lease_key)
        decision = await service.check(attrs, API)
        # Envoy hung up while we decided: nobody will carry this lease to completion.
        connected = request.transport is not None and not request.transport.is_closing()
        await release_if_undelivered(service, decision, delivered=connected)
        return response_for(decision, lease_key)

    async def health(_: web.Request) -> web.Response:
        return web.Response(status=HEALTH_STATUS)  # common.py, rule 6

    app = web.Application(middlewares=[json_errors])
    app.router.add_get(HEALTH_PATH, health)
    app.router.add_route("*", "/{tail:.*}", check)
    return app
