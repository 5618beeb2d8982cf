"""How a request's end frees what it took: its lease released in the store (with its
tombstone), the bookkeeping that follows (waiters for a slot, the completion metrics, the
model's in-flight count), and a release owed when the store fails. A mixin of
`AdmissionService`, kept apart so that the decision path reads on its own.

Rules:
1. A release goes to the store in the next batch (`sidecar.batching`: many in one call). Its
   bookkeeping runs when the store answers, as a callback of the item's future, so it is done
   however the caller fares (a cancelled caller used to skip it).
2. `release_queued` is `release` without a coroutine where nothing else must be released:
   no shadow lease, not a degraded-mode lease. The access log completes thousands of
   requests a second, and a coroutine, a task and a shield per entry cost more than the
   release's own share of the store call (issue 11). A lease whose model count is still on
   its way is queued once that write is done (a callback, not a task: a request shorter
   than the write's round trip is common at such rates). Else it is `release`, in a task.
3. A failed release (StateUnavailable) is owed: `LeaseKeeper` retries it until the store
   takes it. `_release`, which the keeper's retries use, owes nothing itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from functools import partial
from typing import Any

from sidecar.batching import Batcher
from sidecar.core.experience import CompletionTimings
from sidecar.core.lease import parse_lease
from sidecar.core.types import LeaseRef
from sidecar.deferral import Deferrer
from sidecar.errors import StateUnavailable
from sidecar.leases import LeaseKeeper
from sidecar.metrics import Metrics
from sidecar.policy.model import Policy
from sidecar.shadow_mode import ShadowJudge
from sidecar.state.base import QuotaStore
from sidecar.state.memory import MemoryQuotaStore


def _retrieved(future: asyncio.Future[bool]) -> None:
    if not future.cancelled():
        future.exception()


def _chain(source: asyncio.Future[bool], target: asyncio.Future[bool]) -> None:
    """`target` gets `source`'s outcome once it has one (unless `target` was cancelled)."""

    def copy(done: asyncio.Future[bool]) -> None:
        if target.done():
            return
        if done.cancelled():
            target.cancel()
        elif (error := done.exception()) is not None:
            target.set_exception(error)
        else:
            target.set_result(done.result())

    source.add_done_callback(copy)


class Completions:
    store: QuotaStore
    metrics: Metrics
    leases: LeaseKeeper
    local_leases: dict[str, LeaseRef]
    local: MemoryQuotaStore  # the degraded mode's store
    deferrer: Deferrer | None
    model_pod: str | None
    shadow: ShadowJudge
    releases: Batcher[tuple[LeaseRef, float], bool]
    _model_writes: dict[str, asyncio.Future[Any]]  # lease id -> its model count
    _release_waiters: dict[str, collections.deque[asyncio.Future[None]]]

    @property
    def policy(self) -> Policy:
        raise NotImplementedError

    async def complete(
        self,
        token: str | None,
        timings: CompletionTimings | None = None,
        model: str | None = None,
        *,
        parsed: LeaseRef | None = None,
    ) -> bool:
        """Release the lease `token` names (True if freed); `timings`: Envoy's; `model`: the
        request's, as the access log names it (a lease names one only where models are
        counted), for its class's time upstream. `parsed`: `token` read already."""
        done = self.complete_queued(token, timings, model, parsed=parsed)
        if isinstance(done, bool):
            return done
        try:
            return await asyncio.shield(done)  # a cancelled caller leaves the release going
        except StateUnavailable:  # owed already (rule 3)
            return False

    def complete_queued(
        self,
        token: str | None,
        timings: CompletionTimings | None,
        model: str | None,
        *,
        parsed: LeaseRef | None = None,
    ) -> bool | asyncio.Future[bool]:
        """`complete`, its release started now (rule 2): False when nothing is to release,
        else what to await for the release (StateUnavailable when it is owed)."""
        if not token:
            return self.completed_without_lease()
        lease = parsed or parse_lease(token)
        if lease is None:
            self.metrics.completion("bad_lease")
            return False
        if timings is not None:  # the tenant's experience, and the adaptive caps' latency
            self.metrics.experience.completed(lease.tenant, lease.klass, timings, self.policy)
            named = lease.model or model
            if named and self.deferrer is not None:
                self.deferrer.completed(named, lease.klass, timings, lease.lease_id)
        return self.release_queued(lease)

    def completed_without_lease(self) -> bool:
        """A completion that names no lease (an admit that took none): counted, nothing freed."""
        self.metrics.completion("no_lease")
        return False

    def release_queued(self, lease: LeaseRef) -> asyncio.Future[bool]:
        """Rule 2: the future of `lease`'s release, queued now; or `release` in a task where
        something must come first. A failure is owed (rule 3) and raised to the
        awaiting caller as StateUnavailable."""
        lease_id = lease.lease_id
        if lease.shadow or lease_id in self.local_leases:
            return asyncio.ensure_future(self.release(lease))  # under way now, like the rest
        writing = self._model_writes.get(lease_id)
        if writing is None:
            self.leases.ended(lease)
            return self._queue_release(lease, counted=True, owe=True)
        released: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        released.add_done_callback(_retrieved)  # an owed release fails it: nobody need look

        def written(_: asyncio.Future[Any]) -> None:
            # After the write's own callback, which may have it renewed: ended after that.
            self.leases.ended(lease)
            _chain(self._queue_release(lease, counted=True, owe=True), released)

        writing.add_done_callback(written)
        return released

    async def release(self, lease: LeaseRef, *, counted: bool = True) -> bool:
        """Release `lease` now; if the store fails, owe it (retried until it is taken). True if
        a lease was freed now. `counted`: this replica counted it in its model's in flight (a
        held request that never went to Triton was not)."""
        writing = self._model_writes.get(lease.lease_id)
        if writing is not None:  # its model entry is on its way: release it after that
            with contextlib.suppress(Exception):
                await asyncio.shield(writing)
        if lease.shadow:  # a shadow lease rides with it (core/shadow.py)
            await self.shadow.release(lease)
        if self.local_leases.pop(lease.lease_id, None) is not None:
            released = await self.local.release(lease, tombstone_s=self.policy.lease_ttl_s)
            self._released(lease.tenant)
            self.metrics.completed(released)
            if self.deferrer is not None:
                self.deferrer.pump()
            return released
        self.leases.ended(lease)
        try:
            return await asyncio.shield(self._queue_release(lease, counted=counted, owe=True))
        except StateUnavailable:
            return False

    async def _release(self, lease: LeaseRef, counted: bool = True) -> bool:
        """One release in the store, with its tombstone (see `sidecar.state.base`). Raises
        StateUnavailable (rule 3: owes nothing)."""
        return await asyncio.shield(self._queue_release(lease, counted=counted, owe=False))

    def _queue_release(self, lease: LeaseRef, *, counted: bool, owe: bool) -> asyncio.Future[bool]:
        """Rule 1: `lease` in the next release batch; its bookkeeping when the store answers."""
        sent = None if self.deferrer is None else self.deferrer.in_flight_counts.release_starts()
        future = self.releases.enqueue((lease, self.policy.lease_ttl_s))
        future.add_done_callback(partial(self._store_answered, lease, counted, owe, sent))
        return future

    def _store_answered(
        self,
        lease: LeaseRef,
        counted: bool,
        owe: bool,
        sent: int | None,
        future: asyncio.Future[bool],
    ) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            if owe and isinstance(error, StateUnavailable):  # rule 3
                self.metrics.state_errors.labels("release").inc()
                self.leases.owe(lease)
            return
        released = future.result()
        self._released(lease.tenant)
        self.metrics.completed(released)
        if self.deferrer is not None:
            mine = lease.model is not None and lease.model_pod == self.model_pod
            if released and counted and mine:
                self.deferrer.note_ended(lease.model or "", sent)  # of the count this one reads
            self.deferrer.pump()

    async def _release_many(self, items: list[tuple[LeaseRef, float]]) -> list[bool | None]:
        # One tombstone lifetime per call: the policy's lease TTL, the same for every lease
        # but across a reload; the longest is used (a tombstone must only be long enough).
        tombstone_s = max(ttl_s for _, ttl_s in items)
        return await self.store.release_many([lease for lease, _ in items], tombstone_s=tombstone_s)

    async def _a_release_of(self, tenant: str, timeout_s: float) -> None:
        """Until one of `tenant`'s leases is released here for this waiter (one release wakes
        one waiter, in arrival order: it frees one slot), or `timeout_s` (a release through
        another replica is not seen here: the next try then comes at the timeout)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._release_waiters.setdefault(tenant, collections.deque())
        queue.append(waiter)
        try:
            await asyncio.wait_for(waiter, max(0.0, timeout_s))
        except TimeoutError:
            pass
        finally:
            if waiter in queue:
                queue.remove(waiter)
            if not queue:
                self._release_waiters.pop(tenant, None)

    def _released(self, tenant: str) -> None:
        queue = self._release_waiters.get(tenant)
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
