"""A model server in virtual time: the load signals `admission.judge` and `signals.may_go` read.

Rules:
- A request sent to the model takes at least `service_s` (its time alone on the server) and
  the server completes at most `drain_per_s` requests per second, in the order they were
  sent: the k-th request sent at `t` completes at `max(t + service_s, previous + 1/drain)`.
  So at light load a request is in flight for its service time (Little's law gives the
  in-flight count), and under overload completions come at the drain rate while the rest
  wait.
- `slots` requests run at once (the server's batch); the others are its queue: the queue
  depth Triton would report is `in_flight - slots`. Default: the concurrency at which the
  server is just saturated, `round(drain_per_s * service_s)`, at least 1.
- The signal is always FRESH and exact (the real sidecar reads Triton every scrape interval
  and adds what it let go since), and the drain rate is `drain_per_s` from the start (the
  real one measures it over about a second of completions).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from sidecar.core.load import SignalState
from sidecar.core.signals import ModelSignals


@dataclass(frozen=True, slots=True)
class ServerModel:
    """How one model's server behaves (the same for every model in a replay)."""

    drain_per_s: float
    service_s: float
    slots: int = 0  # 0: round(drain_per_s * service_s)

    @property
    def batch(self) -> int:
        if self.slots > 0:
            return self.slots
        return max(1, round(self.drain_per_s * self.service_s))


class ModelServer:
    def __init__(self, model: ServerModel) -> None:
        self.model = model
        self._done_at: deque[float] = deque()  # completion times of those in flight, in order
        self._last_done_s = -math.inf

    @property
    def in_flight(self) -> int:
        return len(self._done_at)

    def send(self, now: float) -> float:
        """A request goes to the model at `now`: when it completes."""
        gap_s = 1.0 / self.model.drain_per_s
        done_s = max(now + self.model.service_s, self._last_done_s + gap_s)
        self._last_done_s = done_s
        self._done_at.append(done_s)
        return done_s

    def complete(self) -> None:
        """The earliest request in flight completed."""
        self._done_at.popleft()

    def signals(self) -> ModelSignals:
        depth = max(0, self.in_flight - self.model.batch)
        return ModelSignals(SignalState.FRESH, depth, self.model.drain_per_s, self.in_flight)
