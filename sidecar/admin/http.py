"""The admin listener: /metrics, /healthz, /readyz, /v1/policy, /v1/explain, /v1/refusals.

`/v1/policy`: the loaded policy's version, sources, classes and tenants, the last reload's
problems, and `notes`: settings that are valid but change nothing, and classes that none of
a tenant's limits bound (`core/policy_notes.py`; `qos-sidecar validate` prints the same).

It binds to localhost unless configured otherwise: explain reveals policy details, the
policy endpoint lists tenants and refusals shows the load, which are not for the public side
of a mesh.

`/v1/refusals` (sidecar/recent_refusals.py): this process's last refusals, newest first, each
with the steps of its decision; `?tenant=NAME` for one tenant's, `?limit=N` for at most N.

Liveness and readiness are separate questions:
- `/healthz` (liveness): the process answers. 200 always; restart the sidecar only if not.
- `/readyz` (readiness): send traffic here. 200 `{"status": "ready"}` when the sidecar can
  decide AND, when it fronts Triton (`--triton-urls`), every Triton endpoint answered ready at
  a recent check; else 503 `{"status": "not_ready", "reason": ..., "not_ready": [why, ...]}`.
  "Can decide" is the policy being loaded (always so once started: a bad policy at start stops
  the process, a bad reload keeps the last good one). The quota store is reported but is not a
  condition: every class has a fail mode (`on_state_error`, closed unless it says open), so
  the sidecar still decides without it, and an outage of the shared store affects every
  replica alike: taking them all out of rotation would only turn defined answers into
  Envoy's bodiless 503s.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar.core.explain import Explanation, decided
from sidecar.core.policy_notes import policy_notes
from sidecar.core.types import Decision, RequestAttributes
from sidecar.errors import StateUnavailable
from sidecar.policy.reload import PolicyHolder
from sidecar.recent_refusals import KEPT
from sidecar.service import AdmissionService

# Readiness of what the sidecar fronts: (why it is not ready, empty when it is; report).
ReadinessProbe = Callable[[], Awaitable[tuple[list[str], dict[str, Any]]]]


def decision_json(decision: Decision) -> dict[str, Any]:
    return {
        **decided(decision),
        "headers": dict(decision.headers),
        "body": json.loads(decision.body) if decision.body else None,
    }


def explanation_json(explained: Explanation) -> dict[str, Any]:
    """A decision as `/v1/explain` shows it: where it would wait, what would change it."""
    queue = explained.queue
    return {
        **decision_json(explained.decision),
        "queue": None if queue is None else dataclasses.asdict(queue),
        "would_change": list(explained.would_change),
    }


def explain_request_from_json(payload: Any) -> RequestAttributes:
    """`{"path": ..., "method": ..., "headers": {...}, "principal": ...}` to attributes."""
    if not isinstance(payload, dict):
        raise ValueError("expected a JSON object")
    headers = payload.get("headers", {})
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ValueError("headers: expected an object of strings")
    path, method, principal = (
        payload.get("path", "/"),
        payload.get("method", "POST"),
        payload.get("principal"),
    )
    if not isinstance(path, str) or not isinstance(method, str):
        raise ValueError("path and method must be strings")
    if principal is not None and not isinstance(principal, str):
        raise ValueError("principal must be a string")
    return RequestAttributes(
        method=method,
        path=path,
        headers={k.lower(): v for k, v in headers.items()},
        principal=principal,
    )


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp answers an unknown path or method in plain text; every answer is JSON."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = exc.reason.lower().replace(" ", "_")
        return web.json_response({"error": reason, "reason": reason}, status=exc.status)


async def readiness_answer(
    service: AdmissionService, readiness: ReadinessProbe | None
) -> web.Response:
    """/readyz, by the rules of the module comment: the store is reported, not a condition."""
    report: dict[str, Any] = {"policy_version": service.policy.version}
    try:
        await service.store.ping()
        report["store"] = "ok"
    except StateUnavailable as exc:
        report["store"] = f"unavailable: {exc}"
    problems: list[str] = []
    if readiness is not None:
        problems, fronted = await readiness()
        report.update(fronted)
    if problems:
        body = {"status": "not_ready", "reason": "triton_not_ready", "not_ready": problems}
        return web.json_response({**body, **report}, status=503)
    return web.json_response({"status": "ready", **report})


def build_admin_app(
    service: AdmissionService, holder: PolicyHolder, readiness: ReadinessProbe | None = None
) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(service.metrics.registry)
        return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        return await readiness_answer(service, readiness)

    async def policy(_: web.Request) -> web.Response:
        current = service.policy
        error = holder.last_error
        return web.json_response(
            {
                "version": current.version,
                "sources": list(current.sources),
                "loaded_at": holder.last_loaded_at,
                "classes": sorted(current.classes),
                "tenants": sorted(current.tenants),
                "last_error": [str(p) for p in error.problems] if error else None,
                # Valid settings that change nothing, and classes none of a tenant's
                # limits bound, as `qos-sidecar validate` notes them (core/policy_notes.py).
                "notes": policy_notes(current),
            }
        )

    async def explain(request: web.Request) -> web.Response:
        try:
            attrs = explain_request_from_json(await request.json())
        except (ValueError, json.JSONDecodeError) as exc:
            return web.json_response({"error": "bad_request", "message": str(exc)}, status=400)
        return web.json_response(explanation_json(await service.explain(attrs)))

    async def refusals(request: web.Request) -> web.Response:
        tenant = request.query.get("tenant")
        try:
            limit = int(request.query.get("limit", str(KEPT)))
        except ValueError:
            limit = -1
        if limit < 0:
            message = "limit: expected a whole number >= 0"
            return web.json_response({"error": "bad_request", "message": message}, status=400)
        return web.json_response({"refusals": service.refusals.read(tenant, limit)})

    app = web.Application(middlewares=[json_errors])
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/policy", policy)
    app.router.add_post("/v1/explain", explain)
    app.router.add_get("/v1/refusals", refusals)
    return app
