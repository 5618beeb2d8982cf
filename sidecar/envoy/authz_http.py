"""ext_authz over HTTP: Envoy sends the request's method, path and allowed headers.

Envoy is configured with `path_prefix: /authz`, so `/authz/v2/models/m/infer` arrives here
for a client request to `/v2/models/m/infer`. A 200 admits and Envoy copies the decision
headers upstream (`allowed_upstream_headers`); any other status is forwarded to the client
with our body and headers. Envoy treats a 5xx from the authorization server as an error of
the server itself (`status_on_error`), so overload sheds travel as the unassigned status 430
with `x-qos-status: 503`, and the shipped Envoy config's local-reply mapper
(envoy/snippets/overload-local-reply.yaml) restores the 503 with our headers and body.
"""

from __future__ import annotations

from aiohttp import web

from sidecar.core.types import Decision, RequestAttributes
from sidecar.envoy.common import read_headers, release_if_undelivered
from sidecar.service import AdmissionService

# Set by Envoy from the verified client certificate (authorization_request.headers_to_add),
# which overwrites any copy the client sent.
PRINCIPAL_HEADER = "x-qos-peer-principal"
STATUS_HEADER = "x-qos-status"
# Must match the status_code_filter in envoy/snippets/overload-local-reply.yaml.
OVERLOAD_WIRE_STATUS = 430
API = "http"


def attributes_from_request(request: web.BaseRequest, path_prefix: str) -> RequestAttributes:
    path = request.raw_path
    if path_prefix and path.startswith(path_prefix):
        path = path[len(path_prefix) :] or "/"
    headers, _ = read_headers(request.headers.items())
    return RequestAttributes(
        method=request.method,
        path=path,
        headers=headers,
        principal=headers.pop(PRINCIPAL_HEADER, None) or None,
        request_id=headers.get("x-request-id"),
    )


def response_for(decision: Decision) -> web.Response:
    headers = dict(decision.headers)
    status = decision.status
    if status >= 500:
        headers[STATUS_HEADER] = str(status)
        status = OVERLOAD_WIRE_STATUS
    return web.Response(status=status, headers=headers, body=decision.body)


def build_authz_app(service: AdmissionService, path_prefix: str = "/authz") -> web.Application:
    async def check(request: web.Request) -> web.Response:
        decision = await service.check(attributes_from_request(request, path_prefix), API)
        # Envoy hung up while we decided: nobody will carry this lease to completion.
        connected = request.transport is not None and not request.transport.is_closing()
        await release_if_undelivered(service, decision, delivered=connected)
        return response_for(decision)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", check)
    return app
