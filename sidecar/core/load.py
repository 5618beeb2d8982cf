"""What the sidecar knows about Triton's load, derived from its metrics endpoint.

Rules:
- A page is read with `prometheus_client`'s text parser, as strict as the format: label
  values may hold commas, escaped quotes and newlines. A line it cannot read is skipped, not
  the page: one odd series must not blind admission to every model.
- A scrape gives, per model, the queue depth (`nv_inference_pending_request_count`, a gauge
  that moves instantly, plus the waiting requests of an in-flight batcher,
  `nv_trt_llm_request_metrics{request_type="waiting"}`, for backends whose requests leave
  Triton's queue at once) and cumulative counters. Rates come from the difference between two
  scrapes: completions per second, and the mean queue and request time of the requests that
  completed in between.
- Versions of one model are summed: admission is per model name, as clients address it.
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
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

# The core stays pure: prometheus_client's text parser does no I/O.
from prometheus_client.parser import text_string_to_metric_families

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

    Samples are read by `prometheus_client`'s parser, so label values are unescaped as the
    format says (quoted commas, `\\"`, `\\n`). Only the lines of the wanted families are
    parsed, one at a time: the rest of the page costs a prefix test per line, and a malformed
    line skips itself rather than failing the whole scrape. A sample without a `model` label
    or with a value that is not a finite number is skipped too.
    """
    fields: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if not line.startswith(_WANTED):
            continue
        try:
            samples = [s for family in text_string_to_metric_families(line) for s in family.samples]
        except ValueError:  # the parser's one error for text that is not the format
            continue
        for sample in samples:
            field = _FIELDS.get(sample.name)
            if sample.name == _IN_FLIGHT_BATCHER and sample.labels.get("request_type") == "waiting":
                field = "pending"
            model = sample.labels.get("model")
            if field is None or model is None or not math.isfinite(sample.value):
                continue
            per_model = fields.setdefault(model, {})
            per_model[field] = per_model.get(field, 0.0) + sample.value
    return {model: TritonCounters(**values) for model, values in fields.items()}


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
