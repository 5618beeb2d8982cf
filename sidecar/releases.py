"""Releases sent together, so that they keep up with any rate the sidecar admits.

One release per store call made each completion wait for its own round trip (two, with the
model's set), while admissions shared the loop: at a few thousand requests per second the
releases fell behind by tens of thousands, and finished requests kept their concurrency
slots for seconds (false `over_concurrency`). Here:
- every release asked for goes into a queue; while no batch is on its way, the queue is sent
  at the end of the current event-loop tick, in one `release_many` call (one pipeline: one
  round trip, per node on a cluster);
- while a batch is on its way, new releases wait for it to return and then go together: the
  busier the sidecar, the bigger the batches, and at most one round trip of releases is in
  flight;
- each caller gets its own lease's answer (held or not), or `StateUnavailable` when that
  lease's release failed, and owes it as before (`LeaseKeeper`); a caller that is cancelled
  meanwhile does not stop its release.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from sidecar.core.types import LeaseRef
from sidecar.errors import StateUnavailable

# How many releases one call carries at most (a bound on one pipeline's size and deadline).
MAX_BATCH = 1024

ReleaseMany = Callable[[list[LeaseRef], float], Awaitable[list[bool | None]]]


class ReleaseBatcher:
    """`release_many(leases, tombstone_s)` is the store's call."""

    def __init__(self, release_many: ReleaseMany, *, max_batch: int = MAX_BATCH) -> None:
        self._release_many = release_many
        self._max_batch = max_batch
        self._queue: list[tuple[LeaseRef, float, asyncio.Future[bool]]] = []
        self._flush_scheduled = False
        self._sending = False
        self.batches = 0  # calls made (for tests and benchmarks: releases per call)
        self.sent = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def release(self, lease: LeaseRef, tombstone_s: float) -> bool:
        """Release `lease` with the next batch: True if it was held. Raises StateUnavailable."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        # Retrieved even when nobody awaits it any more (its caller was cancelled).
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._queue.append((lease, tombstone_s, future))
        if not self._flush_scheduled and not self._sending:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await asyncio.shield(future)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._sending or not self._queue:
            return
        batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
        self._sending = True
        task = asyncio.ensure_future(self._send(batch))
        task.add_done_callback(self._sent)

    def _sent(self, _: asyncio.Future[None]) -> None:
        self._sending = False
        if self._queue:  # what queued while the batch was out goes now
            self._flush()

    async def _send(self, batch: list[tuple[LeaseRef, float, asyncio.Future[bool]]]) -> None:
        # One tombstone lifetime per call: the policy's lease TTL, the same for every lease
        # but across a reload; the longest is used (a tombstone must only be long enough).
        tombstone_s = max(t for _, t, _ in batch)
        self.batches += 1
        self.sent += len(batch)
        try:
            results = await self._release_many([lease for lease, _, _ in batch], tombstone_s)
        except StateUnavailable as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except Exception as exc:  # a bug: every caller sees it, none waits for ever
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            raise
        for (lease, _, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if result is None:
                future.set_exception(StateUnavailable(f"release of {lease.lease_id} failed"))
            else:
                future.set_result(result)
