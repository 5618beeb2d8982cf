"""The completion signal: Envoy's gRPC access-log stream (`AccessLogService`).

Envoy writes one access-log entry at the end of every request, whatever ended it: a
response, an upstream error or timeout, or a client that went away. The lease the sidecar
granted rides in the entry's dynamic metadata (`common_properties.metadata`, written by the
ext_authz or ext_proc filter from the sidecar's answer; see `common.py`, rule 4), never in a
request header a client could set. Each entry that carries one releases exactly that lease,
if the deployment's key signed it; anything else is counted as `bad_lease` and released
nothing. The lease TTL is only the backstop for lost entries.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from sidecar.core.decide import HEADER_CLASS, HEADER_TENANT
from sidecar.core.demand import drained_model
from sidecar.core.experience import CompletionTimings
from sidecar.core.kserve import model_of
from sidecar.core.lease import parse_lease, verify_lease
from sidecar.core.types import LeaseRef
from sidecar.envoy.common import LEASE_KEY, LEASE_NAMESPACES
from sidecar.errors import StateUnavailable
from sidecar.service import AdmissionService

API = "access_log"  # qos_adapter_errors_total's label for an entry this adapter failed on
log = logging.getLogger(__name__)


def lease_of(entry: Any) -> str | None:
    """The (signed) lease in an HTTP access-log entry's dynamic metadata, or None."""
    filter_metadata = entry.common_properties.metadata.filter_metadata
    for namespace in LEASE_NAMESPACES:
        if namespace in filter_metadata:
            value = filter_metadata[namespace].fields.get(LEASE_KEY)
            if value is not None and value.string_value:
                return str(value.string_value)
    return None


def duration_of(entry: Any) -> float | None:
    """How long the request took, to the last byte sent back to the client. A request the
    client left before any answer took longer than it would wait: infinite, a miss for
    adaptive caps (core/protect.py). None when Envoy says nothing of either."""
    common = entry.common_properties
    if common.HasField("time_to_last_downstream_tx_byte"):
        duration = common.time_to_last_downstream_tx_byte
        return float(duration.seconds) + float(duration.nanos) / 1e9
    if common.HasField("duration"):  # the stream ended without a response: the client left
        return math.inf
    return None


def timings_of(entry: Any) -> CompletionTimings:
    """The request's timings and status as Envoy logged them (`core.experience`)."""
    common = entry.common_properties
    first_byte_s = None
    if common.HasField("time_to_first_upstream_rx_byte"):
        first = common.time_to_first_upstream_rx_byte
        first_byte_s = float(first.seconds) + float(first.nanos) / 1e9
    code = entry.response.response_code.value if entry.response.HasField("response_code") else 0
    return CompletionTimings(
        duration_of(entry), first_byte_s, int(code) or None, upstream_time_of(entry)
    )


def _seconds(duration: Any) -> float:
    return float(duration.seconds) + float(duration.nanos) / 1e9


def upstream_time_of(entry: Any) -> float | None:
    """How long the request was with Triton: from its last byte sent upstream (else its first)
    to the last byte of the response (else the end of the stream). None: it never reached
    Triton. The weight of its tenant's share of the model's compute time (core/usage.py)."""
    common = entry.common_properties
    if common.HasField("time_to_last_upstream_tx_byte"):
        sent = _seconds(common.time_to_last_upstream_tx_byte)
    elif common.HasField("time_to_first_upstream_tx_byte"):
        sent = _seconds(common.time_to_first_upstream_tx_byte)
    else:
        return None
    if common.HasField("time_to_last_upstream_rx_byte"):
        return max(0.0, _seconds(common.time_to_last_upstream_rx_byte) - sent)
    if common.HasField("duration"):
        return max(0.0, _seconds(common.duration) - sent)
    return None


def note_usage(service: AdmissionService, entry: Any, lease: LeaseRef | None) -> None:
    """Count a request that reached Triton for its tenant and model (sidecar/usage.py). The
    tenant is the `x-qos-tenant` the sidecar set (Envoy strips clients' copies), else the
    lease's; the model the lease's, else the HTTP path's (a gRPC path names none)."""
    _note_usage(service, entry, lease, upstream_time_of(entry))


def _note_usage(
    service: AdmissionService, entry: Any, lease: LeaseRef | None, upstream_s: float | None
) -> None:
    """`note_usage`, with the entry's upstream time already read (`timings_of` reads it)."""
    if upstream_s is None:
        return
    tenant = entry.request.request_headers.get(HEADER_TENANT) or (lease and lease.tenant)
    model = (lease and lease.model) or model_of(entry.request.path)
    service.usage.completed(tenant or None, model, upstream_s)


class AccessLogServicer(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    def __init__(self, service: AdmissionService, *, lease_key: bytes) -> None:
        self._service = service
        self._lease_key = lease_key

    def _complete_unleased(self, entry: Any) -> None:
        """An entry with no lease is done at once (no coroutine per entry: leased mode sends
        thousands a second, none of which frees anything). One the sidecar granted (its
        tenant and class headers, which Envoy strips from clients) is an admit all the same:
        its tenant's experience and its model's drain (core/demand.py rule 2) are recorded."""
        service = self._service
        headers = entry.request.request_headers
        tenant, klass = headers.get(HEADER_TENANT), headers.get(HEADER_CLASS)
        if not (tenant and klass):  # refused: nothing went upstream for it
            note_usage(service, entry, None)
        else:
            timings = timings_of(entry)
            _note_usage(service, entry, None, timings.upstream_s)
            service.metrics.experience.completed(tenant, klass, timings, service.policy)
            service.metrics.demand.drained(drained_model(None, entry.request.path, granted=True))
        service.completed_without_lease()

    def _complete(self, entry: Any, signed: str) -> bool | asyncio.Future[bool]:
        """The entry's lease checked and its release started (`AdmissionService.complete_queued`):
        what to await for it, or a bool where nothing is to release."""
        token = verify_lease(signed, self._lease_key)
        lease = None if token is None else parse_lease(token)
        timings = timings_of(entry)  # the upstream time once, for usage and hold budgets
        _note_usage(self._service, entry, lease, timings.upstream_s)
        if token is None:
            # Forged, unsigned or signed with another key: release nothing.
            self._service.metrics.completion("bad_lease")
            return False
        # The autoscaling signal's drain (core/demand.py rule 2), on this replica.
        model = drained_model(lease, entry.request.path)
        self._service.metrics.demand.drained(model)
        return self._service.complete_queued(token, timings, model, parsed=lease)

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        # Each entry's release is queued as it is read (their store calls share batches:
        # sidecar/batching.py), with no coroutine per entry where none is needed
        # (sidecar/completions.py rule 2), and the stream is read on meanwhile. All are done
        # before the stream is answered.
        pending: set[asyncio.Future[bool]] = set()  # each leaves it once done
        async for message in request_iterator:
            for entry in message.http_logs.log_entry:
                signed = lease_of(entry)
                if signed is None:
                    self._complete_unleased(entry)
                    continue
                try:
                    started = self._complete(entry, signed)
                except Exception:  # a bug: this entry's lease waits for its TTL, the rest go on
                    log.exception("access-log entry failed")
                    self._service.metrics.adapter_errors.labels(API).inc()
                    continue
                if not isinstance(started, bool) and not started.done():
                    pending.add(started)
                    started.add_done_callback(pending.discard)
        if pending:
            # `wait`, not `gather`: a stream cancelled meanwhile leaves its releases going.
            # A failed release is owed already (completions.py rule 3): only bugs raise.
            finished, _ = await asyncio.wait(pending)
            for future in finished:
                error = None if future.cancelled() else future.exception()
                if error is not None and not isinstance(error, StateUnavailable):
                    raise error
        return als_pb2.StreamAccessLogsResponse()
