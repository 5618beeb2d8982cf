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
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from envoy.config.core.v3 import base_pb2

from sidecar.core.types import Decision
from sidecar.service import AdmissionService

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


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
