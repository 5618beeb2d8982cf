"""Per-tenant usage (chargeback): Triton's compute time split over the tenants that caused it,
and the arithmetic of the capacity review. Pure: every time is passed in.

Rules of the attribution (`ComputeLedger`):
- The measure is Triton's own per-model counter `nv_inference_compute_infer_duration_us`
  (all versions, every endpoint). Its increase between two scrapes of an endpoint is the
  compute time Triton spent on that model's requests meanwhile. A counter that went
  backwards restarted (Triton restarted): its increase is its new value, as Prometheus's
  `increase()` reads it. The first value seen of an endpoint's model is the baseline: what
  Triton computed before this sidecar watched is nobody's here.
- The share is each tenant's work seen in the same interval: the summed upstream time
  (Envoy: request sent to Triton until its response came back) of the tenant's requests
  to that model that ended since the last attribution. Triton gives no per-request compute
  time on its metrics page, and the upstream time is the closest per-request measure of it
  that the sidecar sees for every request, LLM or not (for an LLM it grows with the tokens
  generated). The hold in the sidecar is not in it.
- Each interval's increase goes to that interval's work, in proportion. Envoy's access log
  and Triton's counters arrive on their own clocks, so an increase seen before its requests'
  completions (or completions before their increase) waits: compute with no work is kept for
  up to `hold_s` before it is declared `UNATTRIBUTED`; work with no compute waits as long,
  then is dropped (its compute was already given to earlier work, or Triton did not count
  it: failures). Nothing else is dropped, so the attributed seconds plus `UNATTRIBUTED` add
  up to Triton's counter increase exactly, less what is still waiting (at most `hold_s`
  worth): the error of the split shows, it is not hidden.
- Error sources (docs/usage.md): a request's upstream time includes its wait in Triton's
  queue, which pulls the split towards equal shares per request under contention; requests
  batched together each carry the whole batch's compute in Triton's counter, and each their
  own upstream time; work and compute matched across interval edges (the waiting above)
  blur the split when the tenant mix changes within `hold_s`.

Rules of the capacity review (`sustained_share`): a model is in contention at a sample when
its demand rate is above its drain rate; a run of such samples counts as sustained once it
lasts longer than the threshold, and then counts whole. The share is the sustained time over
the period.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from sidecar.core.record import record

UNATTRIBUTED = "__unattributed__"
HOLD_S = 5.0  # how long compute waits for its work, and work for its compute


def counter_increase(before: float | None, after: float) -> float:
    """How much a counter grew from `before` to `after` (None: first seen, nothing)."""
    if before is None:
        return 0.0
    return after - before if after >= before else after


def split(total: float, weights: Mapping[str, float]) -> dict[str, float]:
    """`total` divided over `weights`' keys in proportion; all of it `UNATTRIBUTED` when
    the weights sum to nothing. The parts add up to `total`."""
    positive = {key: weight for key, weight in weights.items() if weight > 0}
    whole = sum(positive.values())
    if total <= 0:
        return {}
    if whole <= 0:
        return {UNATTRIBUTED: total}
    return {key: total * (weight / whole) for key, weight in positive.items()}


@record
class Attribution:
    """Compute seconds of one model given to tenants (`UNATTRIBUTED` included)."""

    model: str
    seconds: Mapping[str, float]


@dataclass(slots=True)
class _Waiting:
    amount: float
    since: float


class ComputeLedger:
    """One sidecar's attribution of each model's compute time (see the module's rules)."""

    def __init__(self, hold_s: float = HOLD_S) -> None:
        self.hold_s = hold_s
        self._last: dict[tuple[str, str], float] = {}  # (endpoint, model) -> counter, us
        self._compute: dict[str, _Waiting] = {}  # model -> seconds not yet given
        self._work: dict[str, dict[str, _Waiting]] = {}  # model -> tenant -> work seconds

    def note_work(self, model: str, tenant: str, work_s: float, now: float) -> None:
        """A request of `tenant` to `model` ended, `work_s` its upstream time."""
        if work_s <= 0:
            return
        per_tenant = self._work.setdefault(model, {})
        found = per_tenant.get(tenant)
        if found is None:
            per_tenant[tenant] = _Waiting(work_s, now)
        else:
            found.amount += work_s

    def note_counter(self, endpoint: str, model: str, compute_us: float, now: float) -> None:
        """The compute counter of `model` on `endpoint` read at a scrape."""
        key = (endpoint, model)
        grown_s = counter_increase(self._last.get(key), compute_us) / 1e6
        self._last[key] = compute_us
        if grown_s <= 0:
            return
        found = self._compute.get(model)
        if found is None:
            self._compute[model] = _Waiting(grown_s, now)
        else:
            found.amount += grown_s

    def waiting_s(self, model: str) -> float:
        """Compute seconds of `model` seen but not given yet."""
        found = self._compute.get(model)
        return found.amount if found is not None else 0.0

    def settle(self, now: float) -> list[Attribution]:
        """Give every model's waiting compute to its waiting work; compute that waited
        `hold_s` with no work goes to `UNATTRIBUTED`; work that waited as long with no
        compute is dropped."""
        given: list[Attribution] = []
        for model in list(self._compute):
            compute = self._compute[model]
            work = self._work.get(model)
            if work:
                weights = {tenant: waiting.amount for tenant, waiting in work.items()}
                given.append(Attribution(model, split(compute.amount, weights)))
                del self._compute[model], self._work[model]
            elif now - compute.since >= self.hold_s:
                given.append(Attribution(model, {UNATTRIBUTED: compute.amount}))
                del self._compute[model]
        for model, work in list(self._work.items()):
            for tenant in [t for t, waiting in work.items() if now - waiting.since >= self.hold_s]:
                del work[tenant]
            if not work:
                del self._work[model]
        return given


def sustained_share(
    samples: Sequence[tuple[float, float, float]], step_s: float, threshold_s: float
) -> float:
    """The share of the sampled period spent in sustained contention. `samples`: (time,
    demand rate, drain rate), evenly `step_s` apart, oldest first; each stands for the
    `step_s` that ends at it. A run of contended samples (demand above drain) counts once
    it spans more than `threshold_s`."""
    if not samples or step_s <= 0:
        return 0.0
    sustained = 0
    run = 0
    for _, demand, drain in samples:
        if demand > drain:
            run += 1
            continue
        sustained += run if run * step_s > threshold_s else 0
        run = 0
    sustained += run if run * step_s > threshold_s else 0
    return sustained / len(samples)


def aligned(
    demand: Iterable[tuple[float, float]], drain: Iterable[tuple[float, float]]
) -> list[tuple[float, float, float]]:
    """(time, demand, drain) at the times both series have a value, oldest first."""
    drains = dict(drain)
    return sorted((t, value, drains[t]) for t, value in demand if t in drains)
