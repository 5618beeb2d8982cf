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
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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
