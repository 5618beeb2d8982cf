"""What the sidecar knows about Triton's load, derived from its metrics endpoint.

Rules:
- A page is read line by line, as strict as the text format: label values may hold commas,
  braces, escaped quotes, backslashes and newlines. Only the lines of the wanted families are
  parsed (the rest cost a prefix test each), by `_sample`, a reader of the sample line alone:
  a well-formed line reads as `prometheus_client`'s parser reads it, any other line as that
  parser reads it or not at all (property tests on generated lines hold it to both), at about
  a sixth of that parser's cost. The scrape runs on the event loop that decides, every
  `QOS_TRITON_SCRAPE_MS`, and a Triton serving many models has a long page. A line it cannot
  read is skipped, not the page: one odd series must not blind admission to every model.
- A scrape gives, per model, the queue depth (`nv_inference_pending_request_count`, a gauge
  that moves instantly, plus the waiting requests of an in-flight batcher,
  `nv_trt_llm_request_metrics{request_type="waiting"}`, for backends whose requests leave
  Triton's queue at once) and cumulative counters. Rates come from the difference between two
  scrapes: completions per second, and the mean queue and request time of the requests that
  completed in between.
- Versions of one model are summed: admission is per model name, as clients address it.
- Failures Triton counts as REJECTED are not completions: a request rejected in the queue (its
  timeout, a full queue) did no work, and every replica's nudges are among them (rule 4 of
  `core/nudge.py`: hundreds a second would read as a drain rate Triton does not have).
- A counter that goes backwards means Triton restarted; the rates start over from that scrape.
- Rates are measured over a window of about DRAIN_WINDOW_S (`CounterWindow`: from the oldest
  kept scrape at least that old, never from before the last idle scrape), not between two
  consecutive scrapes. Triton completes
  requests a batch at a time, so one scrape interval holds none, one or two batches: the
  per-interval rate swung between zero and twice the truth, and a request that came when it
  read low was shed for a predicted wait it would not have had (the fleet benchmark's quiet
  tenants, Retry-After 1 s against a 0.7 s budget).
- An idle interval (nothing completed, nothing waiting) says nothing about how fast Triton
  drains: the last measured rate is kept, so the first burst after a quiet spell is judged
  by what Triton could do, not by "zero completions per second".
- A signal older than the configured staleness bound is STALE; a model never seen is MISSING.
  Neither is an error: the decision core treats them as defined states (issue 4 policy).
- The models Triton SERVES are the models on the metrics page of its last round, taken only
  when every endpoint answered ready and gave its page in that round, and only while that
  round is fresh. Triton exports the `nv_inference_*` series of a model as soon as it is
  loaded (zeros until the first request), and answers ready only once every model of its
  repository is loaded, so that list is exact. Anything less (an endpoint down, restarting or
  still loading, a scrape that failed, an old round) means "not known": a Triton restart must
  never turn into 404s.
"""

from __future__ import annotations

import enum
import math
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

# Metric name -> TritonCounters field.
_FIELDS = {
    "nv_inference_pending_request_count": "pending",
    "nv_inference_request_success": "success",
    "nv_inference_request_failure": "failure",
    "nv_inference_queue_duration_us": "queue_us",
    "nv_inference_request_duration_us": "request_us",
    "nv_inference_exec_count": "exec_count",
    # Compute time, for per-tenant usage (core/usage.py), not for admission.
    "nv_inference_compute_infer_duration_us": "compute_us",
}
# A backend that batches in flight (TensorRT-LLM's in-flight batcher; the simulated llm_ifb)
# takes every request off Triton's queue at once: nv_inference_pending_request_count stays 0
# and its own waiting queue is this gauge's request_type="waiting" sample, added to the depth.
_IN_FLIGHT_BATCHER = "nv_trt_llm_request_metrics"
_WANTED = (*_FIELDS, _IN_FLIGHT_BATCHER)


@dataclass(frozen=True, slots=True)
class TritonCounters:
    """One scrape of one model (all versions summed)."""

    pending: float = 0.0
    success: float = 0.0
    failure: float = 0.0
    queue_us: float = 0.0
    request_us: float = 0.0
    exec_count: float = 0.0
    compute_us: float = 0.0


DRAIN_WINDOW_S = 1.0  # rates span at least this much of the recent past (when known)


class CounterWindow:
    """One model's scrapes on one endpoint over the last DRAIN_WINDOW_S, oldest first."""

    def __init__(self, window_s: float = DRAIN_WINDOW_S) -> None:
        self.window_s = window_s
        self._kept: deque[tuple[TritonCounters, float]] = deque()

    def base(self, now: float) -> tuple[TritonCounters, float] | None:
        """The scrape to measure rates from at `now`: the newest one at least `window_s`
        old, else the oldest kept (None before any)."""
        while len(self._kept) > 1 and now - self._kept[1][1] >= self.window_s:
            self._kept.popleft()
        return self._kept[0] if self._kept else None

    def add(self, counters: TritonCounters, now: float) -> None:
        """Keep a scrape. One whose counters went backwards (a restart) starts over, and so
        does an idle one (nothing waiting, nothing completed since the last): idle time says
        nothing about the drain rate, and a window reaching back into it would read a burst
        that follows as a slow drain."""
        if self._kept:
            newest = self._kept[-1][0]
            done = counters.success + counters.failure
            before = newest.success + newest.failure
            idle = done == before and counters.pending == 0 and newest.pending == 0
            if done < before or idle:
                self._kept.clear()
        self._kept.append((counters, now))


@dataclass(frozen=True, slots=True)
class ModelLoad:
    endpoint: str
    model: str
    queue_depth: int
    completions_per_s: float  # successes and failures per second since the previous scrape
    mean_queue_ms: float  # of requests completed since the previous scrape (0 if none)
    mean_request_ms: float
    observed_at: float  # the scrape's time, in the monitor's clock (seconds)


class SignalState(enum.Enum):
    FRESH = "fresh"
    STALE = "stale"
    MISSING = "missing"


def parse_triton_metrics(text: str) -> dict[str, TritonCounters]:
    """The nv_inference_* series of a Prometheus text page, per model.

    Label values are unescaped as the format says (quoted commas, `\\"`, `\\n`). Only the
    lines of the wanted families are parsed, one at a time: the rest of the page costs a prefix
    test per line, and a malformed line skips itself rather than failing the whole scrape. A
    sample without a `model` label or with a value that is not a finite number is skipped too.
    """
    fields: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if not line.startswith(_WANTED):
            continue
        sample = _sample(line)
        if sample is None:
            continue
        name, labels, value = sample
        field = _FIELDS.get(name)
        if name == _IN_FLIGHT_BATCHER and labels.get("request_type") == "waiting":
            field = "pending"
        elif field == "failure" and labels.get("reason") == "REJECTED":
            continue
        model = labels.get("model")
        if field is None or model is None or not math.isfinite(value):
            continue
        per_model = fields.setdefault(model, {})
        per_model[field] = per_model.get(field, 0.0) + value
    return {model: TritonCounters(**values) for model, values in fields.items()}


_ESCAPED = {"\\": "\\", '"': '"', "n": "\n"}  # what follows a backslash in a label value
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


# The usual line, read by two regular expressions: labels with nothing escaped and no spaces
# in the braces. Anything else takes the character reader below, which reads these too.
_PAIR = r'[a-zA-Z0-9_]+="[^"\\]*"'
_USUAL = re.compile(
    rf"([^{{ ]+)\{{((?:{_PAIR}(?:,{_PAIR})*,?)?)\}}\s*([^\s_]+)(?:\s+([^\s_]+))?\s*"
)
_PAIRS = re.compile(r'([a-zA-Z0-9_]+)="([^"\\]*)"')


def _sample(line: str) -> tuple[str, dict[str, str], float] | None:
    """One sample line, `name{label="value",...} value [timestamp]`: its name, labels and
    value; None when it is not one (the caller skips it)."""
    usual = _USUAL.fullmatch(line)
    if usual is not None:
        name, block, value_text, stamp = usual.groups()
        pairs = _PAIRS.findall(block)
        labels = dict(pairs)
        try:
            value = float(value_text)
            if stamp is not None:
                float(stamp)
        except ValueError:
            return None
        return (name, labels, value) if len(labels) == len(pairs) else None
    brace = line.find("{")
    space = line.find(" ")
    if brace < 0 or 0 <= space < brace:  # no labels: `name value [timestamp]`
        name, labels, rest = line[: max(space, 0)], {}, line[max(space, 0) :]
    else:
        name = line[:brace]
        read = _labels(line, brace + 1)
        if read is None:
            return None
        labels, end = read
        rest = line[end:]
    parts = rest.split()
    if not name or len(parts) not in (1, 2):
        return None
    if "_" in rest:  # Python's float() reads "1_000"; the format does not
        return None
    try:
        value = float(parts[0])
        if len(parts) == 2:
            float(parts[1])  # a timestamp, read only to refuse what is not one
    except ValueError:
        return None
    return name, labels, value


def _labels(line: str, at: int) -> tuple[dict[str, str], int] | None:
    """The labels from just after `{` to the closing `}`, and the index after it."""
    labels: dict[str, str] = {}
    n = len(line)
    while True:
        while at < n and line[at] == " ":
            at += 1
        if at < n and line[at] == "}":
            return labels, at + 1
        start = at
        while at < n and line[at] in _NAME_CHARS:
            at += 1
        key = line[start:at]
        while at < n and line[at] == " ":
            at += 1
        if not key or key in labels or at >= n or line[at] != "=":
            return None
        at += 1
        while at < n and line[at] == " ":
            at += 1
        if at >= n or line[at] != '"':
            return None
        read = _quoted(line, at + 1)
        if read is None:
            return None
        labels[key], at = read
        while at < n and line[at] == " ":
            at += 1
        if at < n and line[at] == ",":
            at += 1
        elif at >= n or line[at] != "}":
            return None


def _quoted(line: str, at: int) -> tuple[str, int] | None:
    """A label value from just after its opening quote, unescaped, and the index after its
    closing quote (None: it does not close)."""
    close = line.find('"', at)
    slash = line.find("\\", at, close if close >= 0 else len(line))
    if close >= 0 and slash < 0:  # the usual case: nothing escaped
        return line[at:close], close + 1
    chars: list[str] = []
    n = len(line)
    while at < n:
        char = line[at]
        if char == '"':
            return "".join(chars), at + 1
        if char == "\\" and at + 1 < n:
            escaped = line[at + 1]
            chars.append(_ESCAPED.get(escaped, "\\" + escaped))
            at += 2
            continue
        chars.append(char)
        at += 1
    return None


def derive_load(
    endpoint: str,
    model: str,
    current: TritonCounters,
    now: float,
    previous: tuple[TritonCounters, float] | None,
    *,
    last_rate: float = 0.0,
) -> ModelLoad:
    """The load of one model from this scrape and the previous one (if any). `last_rate` is
    the completions per second measured before, kept over idle intervals."""
    completions_per_s = mean_queue_ms = mean_request_ms = 0.0
    if previous is not None:
        before, then = previous
        elapsed_s = now - then
        done = (current.success + current.failure) - (before.success + before.failure)
        restarted = done < 0 or current.queue_us < before.queue_us
        if elapsed_s > 0 and not restarted:
            completions_per_s = done / elapsed_s
            if done == 0 and current.pending == 0 and before.pending == 0:
                completions_per_s = last_rate  # idle: no news about the drain rate
            if done > 0:
                mean_queue_ms = (current.queue_us - before.queue_us) / done / 1000
                mean_request_ms = (current.request_us - before.request_us) / done / 1000
    return ModelLoad(
        endpoint=endpoint,
        model=model,
        queue_depth=max(0, int(current.pending)),
        completions_per_s=completions_per_s,
        mean_queue_ms=max(0.0, mean_queue_ms),
        mean_request_ms=max(0.0, mean_request_ms),
        observed_at=now,
    )


@dataclass(frozen=True, slots=True)
class LoadView:
    """The latest load of every model the monitor has seen, for one decision."""

    models: Mapping[str, tuple[ModelLoad, ...]]  # model -> its load on each endpoint
    ready: Mapping[str, bool]  # endpoint -> last readiness answer
    # The models on the last round's pages when every endpoint was ready and scraped in it;
    # None: not known (see the module comment).
    served: frozenset[str] | None = None
    checked_at: float | None = None  # when the last round ended (monitor clock); None: never

    def served_models(self, now: float, stale_after_s: float) -> frozenset[str] | None:
        """The models Triton serves, if known now: None when the list is missing or old."""
        if self.served is None or self.checked_at is None:
            return None
        return self.served if now - self.checked_at <= stale_after_s else None

    def not_ready(self, now: float, stale_after_s: float) -> list[str]:
        """Why Triton is not ready to take this sidecar's traffic (empty: it is): an endpoint
        never checked, not ready at the last check, or a last check that is too old."""
        if self.checked_at is None or not self.ready:
            return ["triton: not checked yet"]
        problems = [f"triton {name}: not ready" for name, ok in self.ready.items() if not ok]
        if now - self.checked_at > stale_after_s:
            problems.append(f"triton: last checked {now - self.checked_at:.1f}s ago")
        return problems

    def state_of(self, model: str, now: float, stale_after_s: float) -> SignalState:
        loads = self.models.get(model)
        if not loads:
            return SignalState.MISSING
        newest = max(load.observed_at for load in loads)
        return SignalState.FRESH if now - newest <= stale_after_s else SignalState.STALE

    def queue_depth(self, model: str) -> int:
        """Requests waiting for this model, summed over the endpoints that serve it."""
        return sum(load.queue_depth for load in self.models.get(model, ()))

    def completions_per_s(self, model: str) -> float:
        return sum(load.completions_per_s for load in self.models.get(model, ()))


EMPTY_VIEW = LoadView(models={}, ready={})
