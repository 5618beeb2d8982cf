"""How old the shared-state gauges are.

The in-flight gauges are read from the quota store, the one place every replica's leases are
counted. While the store is down they cannot be read; they then move with what this replica
sees (the last count read, plus its own requests started minus those ended since, local
leases included: `SharedReads._estimate_in_flight`). That misses what other replicas do
meanwhile and fail-open admits (they take no lease), so `qos_state_stale_seconds` says how
old the shared part is: 0 while reads succeed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sidecar.service import AdmissionService


class InFlightRefresher:
    """One read of the store's in-flight counts per `once()`, and its age in the metrics."""

    def __init__(
        self, service: AdmissionService, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.service = service
        self.clock = clock
        self.last_read_s = clock()  # counted from start: a store down from the start ages too

    async def once(self) -> bool:
        ok = await self.service.refresh_in_flight()
        now = self.clock()
        if ok:
            self.last_read_s = now
        self.service.metrics.state_stale.set(0.0 if ok else now - self.last_read_s)
        return ok
