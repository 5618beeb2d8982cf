"""One replica's count of each model's requests in flight, between two reads of the store.

The store holds the count every replica shares (`model_in_flight_many`); a replica reads it
every scrape interval. Between two reads it adds what it admitted and subtracts what it saw
end, so that requests decided one after the other see each other at once.

A read runs concurrently with admissions, so which admits a read already includes is not
known exactly. The rule errs on the side of counting one twice rather than not at all (an
uncounted admit lets the cap be overshot; a twice-counted one costs one slot until the next
read, one scrape interval later):
- an admit whose store write was confirmed before the read was sent is in the read: dropped;
- an admit still being written, or confirmed after the read was sent, is kept on top of it;
- every end seen so far is dropped at a read (it is in the read, or it will be in the next);
- an end whose release was sent before a read was applied, but confirmed after it, is not
  subtracted at all: that read may already show it (the release ran on the server first and
  its answer came back last), and subtracting it again would undercount by one until the
  next read, which let a pod run one request over its cap (the fleet benchmark's `pod`).

Before the first read that names a model, the count is this replica's own admits (the cap
applies to what it knows); with neither, it is unknown (None) and the cap is not applied.
"""

from __future__ import annotations

from collections import Counter

PENDING = -1  # the stamp of an admit whose store write is not confirmed yet


class InFlightCounts:
    def __init__(self) -> None:
        self._read: dict[str, int] = {}  # per model, at the last read
        self._epoch = 0  # how many reads were sent
        # Per model, admits not (known to be) in the last read, by the epoch their write was
        # confirmed in (PENDING: not yet).
        self._admits: dict[str, Counter[int]] = {}
        self._ended: dict[str, int] = {}
        self._reads = 0  # how many reads were applied

    def of(self, model: str) -> int | None:
        """The model's requests in flight as this replica knows them now."""
        admits = self._admits.get(model)
        local = (0 if admits is None else admits.total()) - self._ended.get(model, 0)
        known = self._read.get(model)
        if known is None and admits is None:
            return None
        return max(0, (known or 0) + local)

    def pending(self) -> dict[str, int]:
        """Per model, this replica's admits whose store write is not confirmed yet: what no
        other replica's read can show (`core.fleet`'s IN_TRANSIT). Once confirmed, a write
        is in every read sent after it; sharing it longer would count it twice there, and
        idle room for an interval per admit (half the pool's throughput when a request
        lasts about one interval, in the fleet benchmark)."""
        return {model: admits[PENDING] for model, admits in self._admits.items() if admits[PENDING]}

    def models(self) -> set[str]:
        """The models this replica counted an admit of (a read should include them)."""
        return set(self._admits)

    def admitted(self, model: str, *, written: bool) -> None:
        """One more request of `model` went to Triton; `written`: its entry is already in the
        store (the acquire wrote it), otherwise `written(model)` follows once it is."""
        stamp = self._epoch if written else PENDING
        self._admits.setdefault(model, Counter())[stamp] += 1

    def written(self, model: str) -> None:
        """The store write of one pending admit of `model` finished (or failed: it counts as
        written, so that a failed write is not kept for ever)."""
        admits = self._admits.get(model)
        if admits is None or admits[PENDING] <= 0:
            return
        admits[PENDING] -= 1
        admits[self._epoch] += 1

    def release_starts(self) -> int:
        """A release is about to be sent: its token for `ended`."""
        return self._reads

    def ended(self, model: str, sent: int | None = None) -> None:
        """A request of `model` ended and its lease was released here; `sent`: the token
        `release_starts` gave before the release was sent (None: sent just now)."""
        if sent is not None and sent != self._reads:
            return  # a read applied since may show it already: the next read will
        self._ended[model] = self._ended.get(model, 0) + 1

    def read_starts(self) -> int:
        """A read of the store is about to be sent: its token for `read`."""
        self._epoch += 1
        return self._epoch

    def read(self, counts: dict[str, int], started: int) -> None:
        """The store's counts, from the read `read_starts` returned `started` for."""
        self._read.update(counts)
        self._ended.clear()
        self._reads += 1
        for model in list(self._admits):
            admits = self._admits[model]
            kept = Counter(
                {s: n for s, n in admits.items() if n > 0 and (s == PENDING or s >= started)}
            )
            if kept:
                self._admits[model] = kept
            else:
                del self._admits[model]
