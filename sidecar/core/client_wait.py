"""How long the client itself says it will wait for an answer, from its request's headers.

Rules:
1. Two headers say it. `grpc-timeout`, which every gRPC client with a deadline sends, in the
   gRPC wire format (1-8 digits and a unit: H, M, S, m, u or n). And the policy's
   `identity.timeout_header` (default `x-qos-timeout-ms`) in whole milliseconds (1-9 digits),
   for HTTP clients, or for a gateway in front that states the time it gives the request.
   (Not `x-envoy-expected-rq-timeout-ms`: on an ext_authz HTTP check Envoy writes its own
   check timeout there.) When both are present the shorter counts.
2. A value in neither format is ignored, and the decision's trace says so: the client is then
   held as its class says, as one that sent no header. A wrong timeout is no reason to refuse
   the request.
3. What it is for (`core.signals.hold_budget`): a hold never outlasts the client. Held
   past it, the request would be answered to no one, or let go onto the GPU for a client that
   has left. So the hold budget is also cut to the client's wait minus the time its class has
   lately spent upstream, exactly as the class's objective cuts it (core/upstream.py rule 3),
   and a request whose predicted wait does not fit is relegated or shed at once, with its
   Retry-After, while its client still listens. It only ever shortens a hold: a client cannot
   buy a longer hold than its class gives by stating a long wait.
4. The wait counts from when the sidecar sees the request; the moments the request spent in
   Envoy before are not known to it, and are small beside any hold. Before its class's time
   upstream on the model is known (fewer than a few of its requests ended there lately: batch
   under a surge), the least time any class lately spent upstream there is subtracted, since
   no request of the model is served quicker. Held to the client's whole wait, its refusal
   raced the client's timeout and mostly lost: 210 and 175 standard requests relegated into
   batch timed out in two 3x runs of the benchmark from a fresh sidecar, none with this rule.
   With nothing known of the model (a sidecar's first completions), nothing is subtracted.
"""

from __future__ import annotations

from collections.abc import Mapping

GRPC_TIMEOUT = "grpc-timeout"

# gRPC's timeout units, in seconds.
_GRPC_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def grpc_timeout_s(value: str) -> float | None:
    """A `grpc-timeout` value in seconds; None when it is not in gRPC's format."""
    digits, unit = value[:-1], value[-1:]
    scale = _GRPC_UNITS.get(unit)
    if scale is None or not 1 <= len(digits) <= 8 or not digits.isascii() or not digits.isdigit():
        return None
    return int(digits) * scale


def millis_s(value: str) -> float | None:
    """A whole number of milliseconds (1-9 digits) in seconds; None otherwise."""
    value = value.strip()
    if not 1 <= len(value) <= 9 or not value.isascii() or not value.isdigit():
        return None
    return int(value) / 1000


def client_wait_s(
    headers: Mapping[str, str], timeout_header: str, trace: list[str]
) -> float | None:
    """The shortest wait the request's headers state (rule 1), in seconds; None when they
    state none. A header that cannot be read is noted in `trace` and ignored (rule 2)."""
    waits: list[float] = []
    for name, parse in ((GRPC_TIMEOUT, grpc_timeout_s), (timeout_header, millis_s)):
        value = headers.get(name)
        if value is None:
            continue
        wait = parse(value)
        if wait is None:
            trace.append(f"{name} {value[:32]!r} is not a timeout: ignored")
        else:
            waits.append(wait)
    return min(waits) if waits else None
