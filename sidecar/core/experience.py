"""What a tenant's request lived through, as Envoy measured it, against its class's objective.

Rules:
- Envoy's access-log entry of an admitted request gives its timings (`CompletionTimings`):
  the time to the first byte Triton sent back (for a streaming LLM, the wait before its first
  token: queue time plus prefill), the time to the last byte sent to the client, and the
  response status. The adapter turns the protobuf into this value; nothing here reads one.
- SLO attainment is judged against the granted class's `latency_objective_ms`, on the whole
  request (what the client waited, as `core/protect.py` judges it too):
  - FAILED: the response was a server error (5xx), whatever its duration;
  - MISSED: it took longer than the objective, or the client left before any answer (it
    waited longer than it would: the duration is infinite);
  - MET: anything else that ended.
  A request Envoy says nothing of (no duration at all) is not judged.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CompletionTimings:
    """Envoy's timings of one ended request. None: Envoy did not say."""

    duration_s: float | None = None  # to the last byte sent back; inf: the client left first
    first_byte_s: float | None = None  # to the first byte received from upstream (Triton)
    status: int | None = None  # the response code sent to the client; None: no response
    upstream_s: float | None = None  # with Triton (core/upstream.py); None: never reached it


class SloResult(enum.Enum):
    MET = "met"
    MISSED = "missed"
    FAILED = "failed"


def slo_result(timings: CompletionTimings, objective_ms: float) -> SloResult | None:
    """How the request did against `objective_ms` (the rules above); None: not judged."""
    if timings.status is not None and timings.status >= 500:
        return SloResult.FAILED
    if timings.duration_s is None:
        return None
    if math.isinf(timings.duration_s) or timings.duration_s * 1000 > objective_ms:
        return SloResult.MISSED
    return SloResult.MET
