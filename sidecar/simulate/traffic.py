"""Recorded traffic to `Arrival`s, and what the recording says about the backend.

Formats (each error is `file:line: message`, raised as `TrafficError`):
- `records`: the QoS benchmark's `records.csv.gz` (or `.csv`). The rows of one `system` (by
  default `passthrough`: the traffic as offered, with nothing refused) and one `run` are the
  arrivals, at `scheduled_s`, with their `tenant` and asked `class`. The backend estimate
  uses every run of that system (its light runs show the service time, its heavy ones the
  drain rate).
- `access-log`: the JSON lines of the shipped Envoy file access log
  (envoy/snippets/file-access-log.yaml): `start_time` (epoch seconds), `duration_ms`,
  `status`, `path` (the model is read from it), `tenant` (the x-qos-tenant the sidecar set
  on an admitted request) or `refused_tenant` (the one on its refusal), URL-quoted, and
  `class` (the x-qos-class the client asked for).
- `azure`: the Azure LLM inference trace (`TIMESTAMP,ContextTokens,GeneratedTokens`), with
  a `--map` of tenants and classes (`TENANT[/CLASS]=WEIGHT,...`) dealt out by smooth
  weighted round robin, so the same trace and map always give the same arrivals.
Records and Azure traces carry token counts (`prompt_tokens`/`output_tokens`,
`ContextTokens`/`GeneratedTokens`), which price requests to a model that counts tokens.

The backend estimate comes from the requests the recording saw served (`Recording`): the
drain rate is completions per second while the backend was busy (the union of the served
requests' [start, end] intervals) in the run where that is highest, since a light run shows
only its offered load; the service time is the median duration of the requests that ran
alone (else the 10th percentile of all).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sidecar.core.kserve import model_of
from sidecar.errors import SidecarError
from sidecar.simulate.replay import Arrival


class TrafficError(SidecarError):
    """A recording that cannot be read; the message is `file:line: what`."""

    status = 400


@dataclass(frozen=True, slots=True)
class Recording:
    arrivals: tuple[Arrival, ...]
    # (start, end) of every request served (2xx), per timeline (a benchmark run)
    served: tuple[tuple[tuple[float, float], ...], ...]
    statuses: tuple[str, ...] = ()  # the status each arrival got, when the recording says

    def drain_per_s(self) -> float | None:
        """Completions per second while busy, in the timeline (run) where it is highest: a
        run that saturates the backend shows its capacity (a batching backend completes more
        per second the fuller its batches), a light one only the load it was offered. None:
        nothing served."""
        rates = []
        for served in self.served:
            busy_s = sum(end - start for start, end in _union(served))
            if busy_s > 0:
                rates.append(len(served) / busy_s)
        return max(rates, default=None)

    def service_s(self) -> float | None:
        """The time of a request alone: the median duration of those that overlapped no
        other, else the 10th percentile of all."""
        alone: list[float] = []
        every: list[float] = []
        for served in self.served:
            ordered = sorted(served)
            latest_end = -math.inf
            for i, (start, end) in enumerate(ordered):
                every.append(end - start)
                follows = i + 1 == len(ordered) or ordered[i + 1][0] >= end
                if latest_end <= start and follows:
                    alone.append(end - start)
                latest_end = max(latest_end, end)
        if alone:
            return sorted(alone)[len(alone) // 2]
        return sorted(every)[len(every) // 10] if every else None


def _union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _open_text(path: Path) -> io.TextIOBase:
    try:
        if path.suffix == ".gz":
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
        return open(path, encoding="utf-8", newline="")  # closed by the caller
    except OSError as exc:
        raise TrafficError(f"{path}:1: cannot read: {exc.strerror or exc}") from exc


def _number(value: str | None, where: str, name: str) -> float:
    try:
        number = float(value or "")
    except ValueError:
        raise TrafficError(f"{where}: {name}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise TrafficError(f"{where}: {name}: expected a finite number, got {value!r}")
    return number


def read_records(
    path: Path, model: str, system: str = "passthrough", run: str | None = None
) -> Recording:
    """The rows of `system` and `run` (None: the only run there, else an error)."""
    with _open_text(path) as text:
        reader = csv.DictReader(text)
        missing = {"system", "run", "tenant", "class", "scheduled_s"} - set(reader.fieldnames or ())
        if missing:
            raise TrafficError(f"{path}:1: not benchmark records: no {', '.join(sorted(missing))}")
        rows = [(n + 2, row) for n, row in enumerate(reader) if row["system"] == system]
    runs = sorted({row["run"] for _, row in rows})
    if not rows:
        raise TrafficError(f"{path}:1: no rows of system {system!r}")
    if run is None and len(runs) > 1:
        raise TrafficError(f"{path}:1: several runs of {system!r} ({', '.join(runs)}): pick one")
    run = run if run is not None else runs[0]
    arrivals: list[Arrival] = []
    statuses: list[str] = []
    served: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for line, row in rows:
        where = f"{path}:{line}"
        at_s = _number(row["scheduled_s"], where, "scheduled_s")
        if row.get("status", "").startswith("2") and row.get("latency_s"):
            sent_s = _number(row.get("sent_s") or row["scheduled_s"], where, "sent_s")
            end_s = sent_s + _number(row["latency_s"], where, "latency_s")
            served[row["run"]].append((sent_s, end_s))  # each run is its own timeline
        if row["run"] != run:
            continue
        counts = _tokens(row.get("prompt_tokens"), where), _tokens(row.get("output_tokens"), where)
        arrivals.append(Arrival(at_s, row["tenant"], row["class"] or None, model, *counts))
        statuses.append(row.get("status") or "")
    if not arrivals:
        raise TrafficError(f"{path}:1: no rows of system {system!r} in run {run!r} ({runs})")
    timelines = tuple(tuple(served[name]) for name in runs)
    return Recording(tuple(arrivals), timelines, tuple(statuses))


def _tokens(value: str | None, where: str) -> int | None:
    """A token count column: None when empty or absent."""
    if not value:
        return None
    count = _number(value, where, "tokens")
    if count < 0:
        raise TrafficError(f"{where}: tokens: must not be negative, got {value!r}")
    return int(count)


def read_access_log(path: Path, model: str | None = None) -> Recording:
    """Envoy's JSON access log, one object per line (blank lines skipped)."""
    entries: list[tuple[float, Arrival, float, str]] = []
    with _open_text(path) as text:
        for line, raw in enumerate(text, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{line}"
            try:
                entry = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise TrafficError(f"{where}: not JSON: {exc.msg}") from None
            if not isinstance(entry, dict):
                raise TrafficError(f"{where}: expected a JSON object")
            start_s = _number(_text(entry.get("start_time")), where, "start_time")
            duration_s = (
                _number(_text(entry.get("duration_ms")) or "0", where, "duration_ms") / 1000
            )
            named = _text(entry.get("tenant")) or _text(entry.get("refused_tenant"))
            tenant = urllib.parse.unquote(named)
            klass = _text(entry.get("class")) or None
            name = model or model_of(_text(entry.get("path")).split("?")[0]) or ""
            status = _text(entry.get("status"))
            entries.append((start_s, Arrival(start_s, tenant, klass, name), duration_s, status))
    if not entries:
        raise TrafficError(f"{path}:1: no access log entries")
    origin = min(start for start, *_ in entries)
    arrivals = tuple(Arrival(a.at_s - origin, a.tenant, a.klass, a.model) for _, a, _, _ in entries)
    served = tuple((s - origin, s - origin + d) for s, _, d, code in entries if code[:1] == "2")
    return Recording(arrivals, (served,), tuple(code for *_, code in entries))


def _text(value: object) -> str:
    """A log field as text: Envoy writes a missing value as null or "-"."""
    if value is None or value == "-":
        return ""
    return str(value)


def parse_map(spec: str, where: str = "--map") -> list[tuple[str, str | None, float]]:
    """`TENANT[/CLASS]=WEIGHT,...` to (tenant, class, weight) entries."""
    entries: list[tuple[str, str | None, float]] = []
    for n, item in enumerate(part.strip() for part in spec.split(",")):
        name, sep, weight = item.partition("=")
        tenant, _, klass = name.strip().partition("/")
        if not sep or not tenant:
            raise TrafficError(f"{where}: entry {n + 1} {item!r}: expected TENANT[/CLASS]=WEIGHT")
        value = _number(weight, f"{where}: entry {n + 1}", "weight")
        if value <= 0:
            raise TrafficError(f"{where}: entry {n + 1}: weight must be positive")
        entries.append((tenant, klass.strip() or None, value))
    return entries


def deal(
    count: int, mapping: Sequence[tuple[str, str | None, float]]
) -> list[tuple[str, str | None]]:
    """Smooth weighted round robin: each entry's share of `count` follows its weight, spread
    evenly, the same every time."""
    total = sum(weight for *_, weight in mapping)
    current = [0.0] * len(mapping)
    dealt: list[tuple[str, str | None]] = []
    for _ in range(count):
        for i, (_, _, weight) in enumerate(mapping):
            current[i] += weight
        best = max(range(len(mapping)), key=lambda i: current[i])
        current[best] -= total
        dealt.append((mapping[best][0], mapping[best][1]))
    return dealt


def read_azure(
    path: Path, model: str, mapping: Sequence[tuple[str, str | None, float]]
) -> Recording:
    """An Azure LLM trace: arrivals at TIMESTAMP (from the first), tenants and classes dealt
    by `mapping`. The trace says nothing about the backend (no served intervals)."""
    times: list[tuple[float, int | None, int | None]] = []
    with _open_text(path) as text:
        reader = csv.DictReader(text)
        if "TIMESTAMP" not in (reader.fieldnames or ()):
            raise TrafficError(f"{path}:1: not an Azure LLM trace: no TIMESTAMP column")
        for line, row in enumerate(reader, start=2):
            stamp = (row["TIMESTAMP"] or "").strip()
            try:
                # Seven fractional digits; datetime takes six.
                moment = datetime.fromisoformat(stamp[:26] if "." in stamp else stamp)
            except ValueError:
                raise TrafficError(f"{path}:{line}: TIMESTAMP: cannot read {stamp!r}") from None
            where = f"{path}:{line}"
            counts = (
                _tokens(row.get("ContextTokens"), where),
                _tokens(row.get("GeneratedTokens"), where),
            )
            times.append((moment.timestamp(), *counts))
    if not times:
        raise TrafficError(f"{path}:1: no requests")
    origin = min(at for at, _, _ in times)
    who = deal(len(times), mapping)
    arrivals = tuple(
        Arrival(at - origin, tenant, klass, model, prompt, output)
        for (at, prompt, output), (tenant, klass) in zip(times, who, strict=True)
    )
    return Recording(arrivals, ((),))
