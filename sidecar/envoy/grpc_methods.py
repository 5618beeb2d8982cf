"""The gRPC methods the sidecar serves to Envoy, as `grpc_wire.Method`s, on the servicers
grpc.aio also serves (app.py picks the server, `Settings.grpc_server`)."""

from __future__ import annotations

from typing import Any

from envoy.service.accesslog.v3 import als_pb2
from envoy.service.auth.v3 import external_auth_pb2

from sidecar.envoy.access_log import AccessLogServicer
from sidecar.envoy.authz_grpc import AuthorizationServicer
from sidecar.envoy.common import GRPC_HEALTH_METHOD, SERVING
from sidecar.envoy.ext_proc import ExternalProcessorServicer
from sidecar.envoy.ext_proc_answers import SplitBody
from sidecar.envoy.ext_proc_parse import parse_processing_request
from sidecar.envoy.grpc_wire import Method
from sidecar.service import AdmissionService


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def _serialize_parts(message: Any) -> bytes | tuple[bytes, ...]:
    """An ext_proc answer: a `SplitBody` in its parts, sent without joining them."""
    if isinstance(message, SplitBody):
        return message.wire_parts()
    return _serialize(message)


def _raw(data: bytes) -> bytes:
    return data


async def _serving(_request: bytes, _context: Any) -> bytes:
    """common.py rule 6: SERVING for any service name, the request unread."""
    return SERVING


def envoy_methods(service: AdmissionService, lease_key: bytes) -> dict[str, Method]:
    authz = AuthorizationServicer(service, lease_key=lease_key)
    processor = ExternalProcessorServicer(service, lease_key=lease_key, split_bodies=True)
    access_log = AccessLogServicer(service, lease_key=lease_key)
    return {
        "/envoy.service.auth.v3.Authorization/Check": Method(
            "grpc", False, external_auth_pb2.CheckRequest.FromString, _serialize, authz.Check
        ),
        "/envoy.service.ext_proc.v3.ExternalProcessor/Process": Method(
            "ext_proc",
            True,
            parse_processing_request,
            _serialize_parts,
            processor.Process,
        ),
        "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs": Method(
            "access_log",
            True,
            als_pb2.StreamAccessLogsMessage.FromString,
            _serialize,
            access_log.StreamAccessLogs,
        ),
        GRPC_HEALTH_METHOD: Method("health", False, _raw, _raw, _serving),
    }
