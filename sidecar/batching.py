"""Store calls sent together, so that they keep up with any rate the sidecar admits:
acquires (`acquire_many`), releases (`release_many`) and the model counts of admits
(`count_for_model_many`).

One release per store call made each completion wait for its own round trip (two, with the
model's set), while admissions shared the loop: at a few thousand requests per second the
releases fell behind by tens of thousands, and finished requests kept their concurrency
slots for seconds (false `over_concurrency`). Here, per kind of call:
- every item asked for goes into a queue; while no batch is on its way, the queue is sent at
  the end of the current event-loop tick, in one call (one pipeline: one round trip, per node
  on a cluster);
- while `max_in_flight` batches are on their way (1 for releases and counts; a few for
  acquires, whose callers wait), new items wait for one to return and then go together: the
  busier the sidecar, the bigger the batches;
- each caller gets its own item's answer, or `StateUnavailable` when that item failed (a
  release is then owed, as before: `LeaseKeeper`); a caller that is cancelled meanwhile does
  not stop its item.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from sidecar.errors import StateUnavailable

# How many items one call carries at most (a bound on one pipeline's size and deadline).
MAX_BATCH = 1024

T = TypeVar("T")
R = TypeVar("R")


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class Batcher(Generic[T, R]):
    """`send_many(items)` is the store's call: per item its answer, or None if it failed;
    it raises StateUnavailable when the whole call failed."""

    def __init__(
        self,
        send_many: Callable[[list[T]], Awaitable[list[R | None]]],
        *,
        max_batch: int = MAX_BATCH,
        max_in_flight: int = 1,
    ) -> None:
        self._send_many = send_many
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._flush_scheduled = False
        self._sending = 0  # calls on their way
        self.batches = 0  # calls made (for tests and benchmarks: items per call)
        self.sent = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def submit(self, item: T) -> R:
        """`item` with the next batch: its answer. Raises StateUnavailable."""
        return await asyncio.shield(self.enqueue(item))

    def enqueue(self, item: T) -> asyncio.Future[R]:
        """`item` with the next batch: the future of its answer (StateUnavailable as its
        exception). A caller that may be cancelled awaits it shielded: the item goes anyway.
        Cheaper than wrapping `submit` in a task where the caller needs the future itself."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        # Retrieved even when nobody awaits it any more (its caller was cancelled).
        future.add_done_callback(_retrieve)
        self._queue.append((item, future))
        if not self._flush_scheduled and self._sending < self._max_in_flight:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._queue and self._sending < self._max_in_flight:
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
            self._sending += 1
            task = asyncio.ensure_future(self._send(batch))
            task.add_done_callback(self._sent)

    def _sent(self, _: asyncio.Future[None]) -> None:
        self._sending -= 1
        if self._queue:  # what queued while the calls were out goes now
            self._flush()

    async def _send(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        self.batches += 1
        self.sent += len(batch)
        try:
            results = await self._send_many([item for item, _ in batch])
        except Exception as exc:  # StateUnavailable, or a bug: every caller sees it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, StateUnavailable):
                raise
            return
        for (item, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if result is None:
                future.set_exception(StateUnavailable(f"store call failed for {item!r}"))
            else:
                future.set_result(result)
