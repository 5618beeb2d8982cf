"""Leased mode's I/O (`core.slices` has the rules): a request spent from a slice this replica
holds makes no store call; one ask per tenant at a time takes a new slice; expired slices give
back what they did not spend. What the store charged and refunded is recorded for degraded
mode, as in exact mode (`core.degraded`). A mixin of `AdmissionService`, kept apart so that
the decision path reads on its own."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence

from sidecar.core.slices import Slices
from sidecar.core.types import BucketCheck, QuotaCheck, QuotaResult
from sidecar.errors import StateUnavailable
from sidecar.metrics import Metrics
from sidecar.state.base import QuotaStore, new_lease_id

# A request spent from a slice held here: allowed, no lease of its own (one counted for its
# model gets one in the model's set: `take_from_slices`).
SLICE_SPENT = QuotaResult(allowed=True)


class LeasedQuota:
    store: QuotaStore
    metrics: Metrics
    slices: Slices
    _asking: dict[str, asyncio.Future[None]]
    clock: Callable[[], float]

    # Degraded mode starts from what the store charged (sidecar.shared_reads).
    def _spent(self, tenant: str, buckets: Sequence[BucketCheck]) -> None:
        raise NotImplementedError

    async def _charge(self, tenant: str, buckets: Sequence[BucketCheck]) -> None:
        raise NotImplementedError

    async def take_from_slices(self, check: QuotaCheck) -> QuotaResult | None:
        """`check` (one that `core.slices.applies` to) from a slice held here, or a new
        slice taken for it; None: the store is unreachable. A check counted for its model
        gets a lease held in the model's set alone (`LeaseRef.model_only`), written there
        after the answer as in exact mode (`_count_for_model`, which has it renewed)."""
        result = await self._from_slices(check)
        if result is None or not result.allowed or check.model is None:
            return result
        return QuotaResult(allowed=True, lease_id=check.lease_id or new_lease_id(), model_only=True)

    async def _from_slices(self, check: QuotaCheck) -> QuotaResult | None:
        if self.slices.spend(check, self.clock()):
            return SLICE_SPENT
        # One ask per tenant at a time: wait for the one on its way, then spend from what
        # it brought (several waiters may wake to a slice too small for all: they ask again,
        # one after the other).
        while (asking := self._asking.get(check.tenant)) is not None:
            await asyncio.shield(asking)
            if self.slices.spend(check, self.clock()):
                return SLICE_SPENT
        done = asyncio.get_running_loop().create_future()
        self._asking[check.tenant] = done
        try:
            return await self._ask_slice(check)
        finally:
            if self._asking.get(check.tenant) is done:
                del self._asking[check.tenant]
            done.set_result(None)

    async def _ask_slice(self, check: QuotaCheck) -> QuotaResult | None:
        """A slice of every bucket of `check`, with its cost; if the buckets cannot give it
        whole, its cost alone (exact mode). None: unreachable."""
        asked = self.slices.ask(check)  # an open circuit answers it at once (no batching)
        try:
            result = await self.store.take_buckets(asked)
            self.metrics.slice_calls.labels("slice").inc()
            if result.allowed:
                self.slices.granted(asked, check, self.clock())
            elif asked.buckets != check.buckets:
                asked = self.slices.ask(check, whole=False)
                result = await self.store.take_buckets(asked)
                self.metrics.slice_calls.labels("cost_only").inc()
            if result.allowed:  # what the store charged, recorded for degraded mode
                self._spent(check.tenant, asked.buckets)
        except StateUnavailable:
            self.metrics.state_errors.labels("take_buckets").inc()
            return None
        return result

    async def return_slices(self, *, everything: bool = False) -> None:
        """Give back what expired slices did not spend (leased mode). A refund that fails
        is lost: the tenant is under-admitted by it, never over."""
        now = math.inf if everything else self.clock()  # everything: at shutdown
        for tenant, refunds in self.slices.expired(now):
            try:
                await self._charge(tenant, refunds)
                self.metrics.slice_calls.labels("return").inc()
            except StateUnavailable:
                self.metrics.state_errors.labels("charge").inc()
