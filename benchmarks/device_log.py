"""What the simulated device did during a QoS point: ``python -m benchmarks.qos --device-log``.

The ``llm`` model writes one line per batch it runs (``batch_log``,
examples/triton/llm/1/model.py): its start, its end (``time.monotonic()``, the clock the load
generator's ``RunResult.start_monotonic`` reads) and its rows. For each point this module
joins that log to the point's records and says where a class's latency went:

- **wait**: from the client's send to the start of the batch the request ran in: the
  sidecar's hold, Envoy, Triton's queue, and the rest of the batch running when it arrived;
- **batch**: the length of the batch it ran in (static batching: its longest row's length,
  whatever the request's own);
- **idle while waiting**: time the device ran nothing although a request answered 200 had
  been sent and had not started yet (``benchmarks.triton_stalls.find_stalls`` on their send
  times). A request held by the sidecar counts as waiting from its send, so this is an upper
  bound on Triton's own stalls; a request the sidecar refused is left out (it never reached
  Triton).

- **missed behind** (given the classes' deadlines): for each request of a class that missed
  its deadline without being refused (answered late, or its client gave up), the longest
  batch that ran while it waited and ran (from its send to its answer, or to its deadline
  when no answer came), and the class of that batch's longest request (the most output
  tokens among the batch's matched requests: answered ones, and by id also those whose
  client had given up; static batching runs a batch until its longest row is done, so that
  request set the batch's length): whose long request the miss waited through.
  ``unknown``: no request was matched to that batch.

A request is matched to the batch that logged its id (the load generator sends each request
with a KServe v2 ``id``, and the model writes its batch's ids). With a log that names no ids
(an older model), a request is matched by time instead: to the batch whose end is the latest
at or before its answer, at most ``MATCH_S`` before it (the answer's way back through Envoy to
the client), which a busy host can make longer. Only the ``llm`` model writes a batch log.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from benchmarks.loadgen import Record, RunResult
from benchmarks.triton_stalls import Batch, find_stalls

MATCH_S = 0.010  # the most an answer may reach the client after its batch's end


def by_id(batches: Iterable[Batch]) -> dict[str, Batch]:
    """Each logged request id's batch."""
    return {i: b for b in batches for i in b.ids if i != "-"}


def batch_of(batches: Sequence[Batch], ends: Sequence[float], answered_at: float) -> Batch | None:
    """The batch a request answered at ``answered_at`` ran in (``ends``: the batches' ends,
    in the same order, ascending), or None when no batch ended within ``MATCH_S`` before."""
    i = bisect.bisect_right(ends, answered_at) - 1
    if i < 0 or answered_at - ends[i] > MATCH_S:
        return None
    return batches[i]


def _pct(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def point(
    batches: Iterable[Batch],
    runs: Sequence[tuple[RunResult, Sequence[Record]]],
    deadlines: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The device's view of one point: ``runs`` are its seeds' results, each with its
    measured records (warm-up excluded); with ``deadlines`` (per class, s), also whose long
    request each class's misses waited through (``missed_behind``)."""
    ordered = sorted(batches, key=lambda b: b.end)
    ends = [b.end for b in ordered]
    named = by_id(ordered)
    waits: dict[str, list[float]] = {}
    lengths: dict[str, list[float]] = {}
    behind: dict[str, Counter[str]] = {}
    answered = matched = 0
    idle_s = window_s = longest_s = 0.0
    for result, records in runs:
        t0 = result.start_monotonic
        ok = [r for r in records if r.status == 200 and r.latency is not None]
        longest: dict[int, Record] = {}  # id of a batch -> its matched request of most tokens
        for r in ok:
            answered += 1
            assert r.latency is not None
            if named:
                batch = named.get(r.request_id)
            else:
                batch = batch_of(ordered, ends, t0 + r.sent + r.latency)
            if batch is None:
                continue
            matched += 1
            waits.setdefault(r.klass, []).append(batch.start - (t0 + r.sent))
            lengths.setdefault(r.klass, []).append(batch.end - batch.start)
            _keep_longest(longest, batch, r)
        # By id, a request whose client gave up is found in the batch it ran in all the same.
        for r in records if named else ():
            if r.status != 200 and (batch := named.get(r.request_id)) is not None:
                _keep_longest(longest, batch, r)
        if deadlines is not None:
            misses = missed_behind(ordered, ends, t0, records, deadlines, longest)
            for klass, who in misses.items():
                behind.setdefault(klass, Counter()).update(who)
        if not ok:
            continue
        first = t0 + min(r.sent for r in records)
        last = t0 + max(r.sent + (r.latency or 0.0) for r in ok)
        window_s += last - first
        inside = sorted(
            (b for b in ordered if first <= b.start and b.end <= last), key=lambda b: b.start
        )
        for stall in find_stalls(inside, [t0 + r.sent for r in ok]):
            idle_s += stall.seconds
            longest_s = max(longest_s, stall.seconds)
    return {
        "answered": answered,
        "matched": matched,
        "idle_while_waiting_share": round(idle_s / window_s, 5) if window_s > 0 else None,
        "longest_idle_while_waiting_ms": round(longest_s * 1000, 1),
        "classes": {
            k: {
                "wait_ms_p50": _pct(waits[k], 50),
                "wait_ms_p99": _pct(waits[k], 99),
                "batch_ms_p50": _pct(lengths[k], 50),
                "batch_ms_p95": _pct(lengths[k], 95),
            }
            for k in sorted(waits)
        },
        "missed_behind": {k: dict(who.most_common()) for k, who in sorted(behind.items())},
    }


def _keep_longest(longest: dict[int, Record], batch: Batch, r: Record) -> None:
    top = longest.get(id(batch))
    if top is None or r.output_tokens > top.output_tokens:
        longest[id(batch)] = r


def _missed(r: Record, deadline_s: float) -> bool:
    """Missed its deadline without being refused: answered late, or its client gave up."""
    if r.status == 200:
        return r.latency is not None and r.latency > deadline_s
    return r.status == 0


def missed_behind(
    ordered: Sequence[Batch],
    ends: Sequence[float],
    t0: float,
    records: Sequence[Record],
    deadlines: Mapping[str, float],
    longest: Mapping[int, Record],
) -> dict[str, Counter[str]]:
    """Per class, its misses by the class of the longest request of the longest batch each
    waited through (module comment); `longest`: each batch's (by `id`) request of most
    tokens among those `point` matched to it."""
    out: dict[str, Counter[str]] = {}
    for r in records:
        deadline_s = deadlines.get(r.klass)
        if deadline_s is None or not _missed(r, deadline_s):
            continue
        start = t0 + r.sent
        stop = start + (r.latency if r.status == 200 and r.latency is not None else deadline_s)
        overlapping = []  # one instance: batches in order of their ends are in order of starts
        i = bisect.bisect_right(ends, start)
        while i < len(ordered) and ordered[i].start < stop:
            overlapping.append(i)
            i += 1
        who = "no batch"
        if overlapping:
            widest = max(overlapping, key=lambda i: ordered[i].end - ordered[i].start)
            top = longest.get(id(ordered[widest]))
            who = "unknown" if top is None else top.klass
        out.setdefault(r.klass, Counter())[who] += 1
    return out


def describe(device: dict[str, Any], klass: str = "interactive") -> str:
    """The point's log-line suffix: the class's wait and batch, and the idle share."""
    c = device["classes"].get(klass)
    share = device["idle_while_waiting_share"]
    idle = "n/a" if share is None else f"{share * 100:.2f}%"
    if c is None:
        return f"device idle while waiting {idle}"
    text = (
        f"{klass} wait p50/p99 {c['wait_ms_p50']}/{c['wait_ms_p99']} ms, batch p50/p95"
        f" {c['batch_ms_p50']}/{c['batch_ms_p95']} ms; device idle while waiting {idle}"
    )
    if who := device.get("missed_behind", {}).get(klass):
        named = ", ".join(f"{k} {n}" for k, n in who.items())
        text += f"; its misses by the longest batch's longest request: {named}"
    return text
