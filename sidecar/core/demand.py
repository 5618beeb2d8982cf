"""The autoscaling signal: per model, the demand this replica is offered against what drains.

Rules:
1. Demand counts each request for a model once, when its fate is first known on the replica it
   arrived at: admitted at once, held (counted when the hold starts, not again when it ends,
   however it ends), or shed for load (reason `overloaded`). Refusals of the tenant's quota,
   identity, class, body or model are not demand: more Triton would not serve them.
2. Drain counts completions of admitted requests, on the replica that receives their
   access-log entry: a leased request's, or one without a lease that the sidecar granted (the
   grant headers it set upstream, which Envoy strips from clients: an admit from leased mode's
   slices, or one that failed open, both demand under rule 1). A request Envoy ended without a
   grant (a shed) is not drained. The model is the lease's, else the one the request path
   names (`kserve.model_of`).
3. Both are per-second rates, exponentially smoothed with the time constant `tau_s`: each event
   adds 1/tau_s, and the value decays by exp(-dt/tau_s) in between, so it is readable at any
   time and falls toward 0 while a model is idle. A steady rate reads as itself (in
   expectation); a step from r0 to r1 reads r1 + (r0 - r1) exp(-t/tau_s).
4. TAU_S = 15 s: long enough that Poisson noise stays small (relative deviation
   1/sqrt(2 rate tau): 6% at 10 requests/s), short enough that a step shows within one
   Prometheus scrape and HPA sync (15 s each by default): 63% of a step after one tau. Scaling
   on a faster signal would chase noise; a slower one would add tens of seconds of SLO misses.
5. Both rates are sums over replicas: in the pod topology (each sidecar fronts its own Triton)
   and the gateway topology (every replica in front of one pool) alike, sum(demand) is what the
   fleet is offered and sum(drain) what it drained, since each request arrives at one replica
   and its completion reaches one. Triton's own counters would count the pool once per replica
   in the gateway topology, so they are not used.
6. The per-replica ratio is demand / max(drain, 1/tau_s): the floor is one completion's worth,
   so a model that nothing has completed for yet reads a finite ratio, and an idle one 0.
7. Model names come from requests: at most MAX_MODELS are kept; past that, new names are counted
   under OTHER. A model whose rates both decayed below FORGET_PER_S is forgotten at a read.

Pure: the caller passes the clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sidecar.core.admission import Answer, Hold
from sidecar.core.kserve import model_of
from sidecar.core.types import LeaseRef, Reason, RequestAttributes

TAU_S = 15.0
MAX_MODELS = 256
OTHER = "__unknown__"
FORGET_PER_S = 1e-4


@dataclass(slots=True)
class SmoothedRate:
    """Events per second, exponentially smoothed (rule 3)."""

    tau_s: float
    value: float = 0.0
    at_s: float | None = None

    def at(self, now_s: float) -> float:
        """The rate at `now_s` (not before the last event)."""
        if self.at_s is None:
            return 0.0
        return self.value * math.exp(-max(0.0, now_s - self.at_s) / self.tau_s)

    def add(self, now_s: float, events: float = 1.0) -> None:
        self.value = self.at(now_s) + events / self.tau_s
        self.at_s = now_s if self.at_s is None else max(self.at_s, now_s)


@dataclass(frozen=True, slots=True)
class DemandReading:
    """One model's rates at a moment (requests per second) and their ratio (rule 6)."""

    demand_per_s: float
    drain_per_s: float
    ratio: float


@dataclass(slots=True)
class _Model:
    demand: SmoothedRate
    drain: SmoothedRate


@dataclass(slots=True)
class DemandRates:
    """Every model's demand and drain on this replica."""

    tau_s: float = TAU_S
    max_models: int = MAX_MODELS
    _models: dict[str, _Model] = field(default_factory=dict)

    def offered(self, model: str, now_s: float) -> None:
        self._of(model).demand.add(now_s)

    def drained(self, model: str, now_s: float) -> None:
        self._of(model).drain.add(now_s)

    def read(self, now_s: float) -> dict[str, DemandReading]:
        """Every kept model's reading at `now_s`; the idle ones are forgotten (rule 7)."""
        readings: dict[str, DemandReading] = {}
        for name, rates in list(self._models.items()):
            demand, drain = rates.demand.at(now_s), rates.drain.at(now_s)
            if demand < FORGET_PER_S and drain < FORGET_PER_S:
                del self._models[name]
                continue
            readings[name] = DemandReading(demand, drain, ratio_of(demand, drain, self.tau_s))
        return readings

    def _of(self, model: str) -> _Model:
        rates = self._models.get(model)
        if rates is None:
            if len(self._models) >= self.max_models and model != OTHER:
                return self._of(OTHER)
            rates = _Model(SmoothedRate(self.tau_s), SmoothedRate(self.tau_s))
            self._models[model] = rates
        return rates


def ratio_of(demand_per_s: float, drain_per_s: float, tau_s: float) -> float:
    """Demand over drain, the drain floored at one completion's worth (rule 6)."""
    return demand_per_s / max(drain_per_s, 1.0 / tau_s)


def offered_model(attrs: RequestAttributes, step: Hold | Answer) -> str | None:
    """The model a request counts demand for once its first verdict is known (rule 1): held,
    admitted or shed for load; None when it does not count (or names no model)."""
    if isinstance(step, Hold):
        return step.admission.model
    decision = step.decision
    if not decision.admitted and decision.reason is not Reason.OVERLOADED:
        return None
    return attrs.model or model_of(attrs.path)


def drained_model(lease: LeaseRef | None, path: str, *, granted: bool = False) -> str | None:
    """The model a completion drains (rule 2): one with a lease, or `granted` without one;
    None for any other, or without a model."""
    if lease is None and not granted:
        return None
    return (lease and lease.model) or model_of(path)
