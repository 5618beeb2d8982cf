"""The completion signal: Envoy's gRPC access-log stream (`AccessLogService`).

Envoy writes one access-log entry at the end of every request, whatever ended it: a
response, an upstream error or timeout, or a client that went away. The shipped config logs
the `x-qos-lease` request header the sidecar set on admission, so each entry that carries
one releases exactly that lease. The lease TTL is only the backstop for lost entries.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from sidecar.core.decide import HEADER_LEASE
from sidecar.service import AdmissionService


class AccessLogServicer(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    def __init__(self, service: AdmissionService) -> None:
        self._service = service

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        async for message in request_iterator:
            for entry in message.http_logs.log_entry:
                await self._service.complete(entry.request.request_headers.get(HEADER_LEASE))
        return als_pb2.StreamAccessLogsResponse()
