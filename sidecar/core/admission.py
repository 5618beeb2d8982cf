"""The admission state machine: every rule of one request's way from arrival to an answer.

Sans-IO, the way h11 writes its state machine: each step takes values (the plan, the load
signals, the store's answer, the clock) and returns what to do next. The service performs
that I/O and feeds the result back; nothing here waits, calls the store or reads a clock.

    plan(attrs)                -> Answer (refused: identity, class, malformed, cost)
                                | Admission
    on_size(admission, ...)    -> Admission (as planned, or relegated)
                                | Answer (refused: infeasible)
    judge(admission, signals)  -> Answer (shed for load; no quota taken)
                                | QuotaFirst (shed for load, unless over quota)
                                | TakeQuota
    on_peek(quota_first, seen) -> Answer (429 over quota, else the load's 503)
    on_quota(take, result)     -> Answer (admitted, or refused by quota / store down)
                                | Hold (admitted, but Triton has no room yet)
                                | TakeQuota (again: a release may come, or the excess
                                  class's quota; core/relegation.py rule 2)
    on_hold_end(hold, outcome) -> Answer (let go, relegated, not sheddable, or shed with
                                  everything given back)

Size rule (`on_size`, before everything else): a token model's request whose max tokens
cannot be generated within its class's objective even alone, at the model's pace lately
(core/pace.py), is refused 422 `infeasible` (with the most the class can take), relegated
once, or served as asked: the model's `tokens.infeasible`. No quota is taken for it first.

Model rule (`judge`, before the load rules): a request for a model Triton does not serve is
refused 404 `unknown_model`, with no Retry-After (a typo is not cured by waiting), and takes
no quota. Only when the sidecar KNOWS what Triton serves (`Signals.served`: a fresh, complete
list; see core/load.py); with no list, or an old one, the request goes on as before, so a
Triton restart or a failed scrape never turns into 404s.

Load rules (`judge_load`; checked before any quota is taken, so a request shed for load costs
its tenant nothing):
- A class without an `overload` policy, a request for no model, or a sidecar with no view of
  Triton: admitted on quota alone.
- The model has ROOM for one more request of a class when its queue depth is below the class's
  `admit_below` and, if the class sets `max_in_flight`, fewer of the model's requests are in
  flight than that (the sidecars' own count, shared through the store; unknown when the store
  never said, and then not applied). `core.signals.has_room` is the one place this is
  tested: for a new arrival and for the held request at the head of the queue alike. How the
  load signal is read differs between the two, by `SIGNAL_READING` below.
- A new arrival with room, and nobody for its model of the same or a better band already
  waiting: admit. (Each model has its own hold queue; another model's waiters are not ahead.)
  Unless it is at or over its class's lateness limit (core/lateness.py): a sheddable class
  is then relegated once or shed at once, Retry-After the drain time down to the limit.
- At or above `shed_above` (sheddable classes): relegate once if the class names a target,
  else shed with 503.
- Otherwise predict the wait from the observed drain rate: the requests ahead of this one (the
  queue above `admit_below`, or the in-flight count over the cap, plus the sidecar's own
  waiters for the model, of the same or a better band) divided by completions per second; and
  never less than its band's pace gives (`Signals.band_wait_s`: the rate the sidecar has been
  letting that band's waiters go, which is what better bands leave of the drain). The
  wait fits the class's hold budget: defer (hold). It does not: relegate once, else shed at
  once with Retry-After = the predicted wait; a class that is not sheddable is admitted
  instead (it waits in Triton's queue, never refused). Nothing is held just to time out.
- The hold budget (`core.signals.hold_budget`): `max_wait_ms`, cut to what leaves the
  request, within its objective and within the wait its client states (core/client_wait.py),
  the time its class lately took upstream (core/upstream.py).
  A hold ends at its budget as it stood when the hold began.
- No drain rate measured yet (a cold start): the wait cannot be predicted, so a class that may
  wait is deferred within its budget rather than shed on a guess.

Excess rule (`on_quota`; core/relegation.py rule 2): a request refused by a bucket that names an
`excess_class` is judged again as that class (the model rule, the load rules), as a new
arrival relegated at once would be, and its quota is taken there; shed for load there, it is
shed with 503. In `on_peek` (shed for load in its own class, the quota only looked at) such a
bucket does not turn the 503 into a 429: the tenant's quota is not what refuses it.

Hold rules (`on_hold_end`):
- Let go (the model had room for the head of the queue): admitted as deferred.
- Expired (or displaced from a full queue): relegated once if the class names a target and the
  request was not relegated yet; the relegated request must have room in its new class now,
  or it is shed (otherwise every request that waited out its hold would pour into Triton's
  queue at the lower priority). Not sheddable: admitted anyway. Else shed 503.
- A shed after a hold gives back the lease and every bucket charge it took.
- Cancelled (client or Envoy gone): the same give-back; the caller's cancellation goes on.
- The lease of a request that was held counts for its model only once it is let go: a held
  request is not in flight, and counting it would block the cap it waits on.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import replace

from sidecar.core import lateness
from sidecar.core.compiled import CompiledPolicy
from sidecar.core.decide import (
    Admission,
    admit_after_wait,
    decide,
    plan_request,
    refuse,
    shed_overloaded,
)
from sidecar.core.load import SignalState
from sidecar.core.pace import infeasibility
from sidecar.core.record import record
from sidecar.core.relegation import excess, excess_bucket, relegate
from sidecar.core.signals import (
    NO_CAPS,
    NO_UPSTREAM,
    QUOTA_ONLY_VERDICT,
    LoadAction,
    LoadVerdict,
    Reader,
    Signals,
    cap_of,
    depth_read,
    effective_overload,
    has_room,
    held_budget,
    hold_budget,
    over_cap,
    reserve,
)
from sidecar.core.types import (
    BucketCheck,
    Decision,
    LeaseRef,
    LimitKind,
    QuotaResult,
    Reason,
    RequestAttributes,
)
from sidecar.policy.model import ClassPolicy, Infeasible, OverloadPolicy, Policy

# -- The load verdict ---------------------------------------------------------------------------


def judge_load(
    klass: ClassPolicy,
    state: SignalState,
    queue_depth: int,
    drain_per_s: float,
    waiting_ahead: int,
    *,
    relegated: bool = False,
    in_flight: int | None = None,
    reserved: int = 0,
    caps: Mapping[str, int | None] = NO_CAPS,
    band_wait_s: float = 0.0,
    upstream_s: Mapping[str, float] = NO_UPSTREAM,
    late_from: int | None = None,
    client_wait_s: float | None = None,
) -> LoadVerdict:
    """The load rules of the module comment, for a new arrival of `klass`. `reserved`:
    waiters on other replicas that go before it, counted as already sent. `caps`: the
    adaptive caps now (`ModelSignals.caps`). `band_wait_s`: its wait at the pace its band's
    waiters are let go (`Signals.band_wait_s`), the least wait predicted. `upstream_s`: the
    classes' times upstream lately (`ModelSignals.upstream_s`) and `client_wait_s` (its
    client's, core/client_wait.py) cut the hold budget. `late_from`: its lateness limit."""
    overload = effective_overload(klass, caps)
    if overload is None:
        return LoadVerdict(LoadAction.ADMIT, 0.0, "no overload policy: quota only")
    can_relegate = klass.relegate_to is not None and not relegated
    read, seen = depth_read(overload, state, queue_depth, Reader.ARRIVAL)
    depth, in_flight = reserve(read or 0, in_flight, reserved)  # an arrival reads a number
    depth = depth or 0
    cap = cap_of(klass, caps)
    seen = _seen(seen, overload, cap, in_flight, reserved)
    if has_room(overload, depth, in_flight, cap) and waiting_ahead == 0:
        late = _sent_late(klass, depth, drain_per_s, late_from, can_relegate, seen)
        if late is not None:
            return late
        return LoadVerdict(LoadAction.ADMIT, 0.0, f"{seen} < admit_below {overload.admit_below}")

    ahead = max(0, depth - overload.admit_below + 1, over_cap(cap, in_flight))
    ahead += waiting_ahead
    wait_s = ahead / drain_per_s if drain_per_s > 0 else math.inf
    if band_wait_s > wait_s:
        wait_s = band_wait_s
        seen = f"{seen}, its band's pace"
    if overload.shed_above is not None and depth >= overload.shed_above:
        action = LoadAction.RELEGATE if can_relegate else LoadAction.SHED
        return LoadVerdict(action, wait_s, f"{seen} >= shed_above {overload.shed_above}", ahead)
    budget_s, limit = held_budget(klass, upstream_s, client_wait_s)
    predicted = f"{seen}, {waiting_ahead} waiting: predicted wait {wait_s:.3f}s"
    if drain_per_s <= 0 and budget_s > 0:
        why = f"{seen}, drain rate unknown: held within {limit}"
        return LoadVerdict(LoadAction.DEFER, wait_s, why, ahead, budget_s)
    if wait_s <= budget_s:
        return LoadVerdict(LoadAction.DEFER, wait_s, f"{predicted} <= {limit}", ahead, budget_s)
    if can_relegate:
        why = f"{predicted} > {limit}"
        return LoadVerdict(LoadAction.RELEGATE, wait_s, why, ahead, budget_s)
    if overload.shed_above is None:
        why = f"{predicted}; not sheddable: admitted"
        return LoadVerdict(LoadAction.ADMIT, wait_s, why, ahead, budget_s)
    return LoadVerdict(LoadAction.SHED, wait_s, f"{predicted} > {limit}", ahead, budget_s)


def _seen(
    seen: str, overload: OverloadPolicy, cap: int | None, in_flight: int | None, reserved: int
) -> str:
    """The verdict's trace of what an arrival saw: the depth read, in flight, held elsewhere."""
    if cap is not None and in_flight is not None:
        kind = "adaptive max" if overload.protect is not None else "max"
        seen = f"{seen}, {in_flight} in flight ({kind} {cap})"
    elif overload.protect is not None:
        seen = f"{seen}, adaptive cap off: no better class for the model now"
    if reserved:
        seen = f"{seen}, {reserved} held elsewhere go first"
    return seen


def _sent_late(
    klass: ClassPolicy, depth: int, drain: float, late_from: int | None, relegate: bool, seen: str
) -> LoadVerdict | None:
    """The lateness rule (core/lateness.py) for an arrival with room: None, sent at once."""
    if late_from is None or depth < late_from or not lateness.applies(klass):
        return None  # under the limit, or never shed by load
    ahead = depth - late_from + 1
    why = f"{seen}: most of {klass.name} sent at {late_from} or more lately ended late"
    action = LoadAction.RELEGATE if relegate else LoadAction.SHED
    return LoadVerdict(action, ahead / drain if drain > 0 else math.inf, why, ahead)


def overload_retry_after_s(klass: ClassPolicy, verdict: LoadVerdict) -> float:
    """When to come back: the predicted drain time, or the class's fallback when nothing
    drains (stale signal, stalled Triton)."""
    if math.isfinite(verdict.predicted_wait_s) and verdict.predicted_wait_s > 0:
        return verdict.predicted_wait_s
    return klass.concurrency_retry_after_ms / 1000


def verdict_for(admission: Admission, signals: Signals) -> LoadVerdict:
    """`judge_load` for a planned request, with what the sidecar sees now."""
    model = signals.model
    if admission.klass.overload is None or admission.model is None or model is None:
        return QUOTA_ONLY_VERDICT
    return judge_load(
        admission.klass,
        model.state,
        model.queue_depth,
        model.drain_per_s,
        signals.ahead_of(admission.klass.rank, admission.tenant.name),
        relegated=admission.relegated,
        in_flight=model.in_flight,
        reserved=signals.elsewhere.ahead_of(admission.klass.rank, admission.tenant.name),
        caps=model.caps,
        band_wait_s=signals.band_wait_s(admission.klass.rank, admission.tenant.name),
        upstream_s=model.upstream_s,
        late_from=model.late_from.get(admission.klass.name),
        client_wait_s=admission.client_wait_s,
    )


# -- The steps ----------------------------------------------------------------------------------


@record
class GiveBack:
    """Return what a request that was never served took: its lease and its bucket charges."""

    tenant: str
    buckets: tuple[BucketCheck, ...]  # refund each bucket's cost
    lease: LeaseRef | None


@record
class Answer:
    """The decision, and the bookkeeping the service performs with it."""

    decision: Decision
    give_back: GiveBack | None = None
    # The request goes to Triton now without the Deferrer having let it go: count it as
    # released since the last scrape and in flight for this model, until the store says.
    note_admitted: str | None = None
    # A held request that was let go: its lease now counts for its model in the store.
    count_for_model: bool = False


@record
class TakeQuota:
    """Check and take the quota of `admission.check` in one store call; first, when
    `release_deadline_s` is set (a try after a refusal for concurrency), wait for a release
    of the tenant until then."""

    admission: Admission
    verdict: LoadVerdict
    release_deadline_s: float | None = None

    @property
    def holds(self) -> bool:
        return self.verdict.action is LoadAction.DEFER


@record
class Hold:
    """Hold the admitted request until the Deferrer lets it go or `deadline_s` passes."""

    admission: Admission
    result: QuotaResult
    decision: Decision  # the admit it holds (its lease)
    started_s: float
    deadline_s: float
    # Its client's wait cut its deadline short of its class's budget: expiring, it shows
    # nothing of its band's queue (core/queue.py).
    client_cut: bool = False

    @property
    def max_wait_s(self) -> float:
        return self.deadline_s - self.started_s

    def give_back(self) -> GiveBack:
        admission = self.admission
        return GiveBack(admission.tenant.name, admission.check.buckets, self.decision.lease)


class HoldOutcome(enum.Enum):
    LET_GO = "admitted"  # values are the qos_hold_duration_seconds outcome label
    EXPIRED = "expired"
    DISPLACED = "displaced"  # an arrival at its class's full queue took its place: as EXPIRED
    CANCELLED = "cancelled"


def plan(
    attrs: RequestAttributes, compiled: CompiledPolicy, estimate: tuple[float, str] | None = None
) -> Admission | Answer:
    """Identity, class and cost (core.decide): an early answer, or what to judge."""
    planned = plan_request(attrs, compiled, estimate)
    return Answer(planned) if isinstance(planned, Decision) else planned


def on_size(
    admission: Admission, max_tokens: int, seconds_per_token: float | None, policy: Policy
) -> Admission | Answer:
    """The size rule: `max_tokens` (the body's) at the pace the model has shown on responses
    at least that long from prompts no longer (`seconds_per_token`, core/pace.py; None: none
    seen yet) against the class's objective."""
    tokens = policy.tokens_of(admission.model)
    if tokens is None or tokens.infeasible is Infeasible.ADMIT:
        return admission
    found = infeasibility(max_tokens, seconds_per_token, admission.klass.latency_objective_ms)
    if found is None:
        return admission
    if tokens.infeasible is Infeasible.REFUSE:  # with what the client may ask in this class
        extra = {"message": found.why, "most_max_tokens": found.most_tokens}
        return Answer(refuse(admission, Reason.INFEASIBLE, found.why, extra=extra))
    if admission.klass.relegate_to is None or admission.relegated:
        return admission.traced(f"{found.why}; served as asked")
    return relegate(admission, policy, found.why, requota=True)


def judge(
    admission: Admission, signals: Signals, policy: Policy
) -> TakeQuota | QuotaFirst | Answer:
    """The load verdict, before any state is touched: shed (costs the tenant nothing),
    relegate once at arrival (the quota moves to the new class), or go on to the quota.
    A model Triton is known not to serve is refused first (the model rule)."""
    if (
        admission.model is not None
        and signals.served is not None
        and admission.model not in signals.served
    ):
        why = f"model {admission.model!r} is not among the {len(signals.served)} Triton serves"
        return Answer(refuse(admission, Reason.UNKNOWN_MODEL, why))  # 404: waiting cures no typo
    verdict = verdict_for(admission, signals)
    if verdict.action is LoadAction.RELEGATE:
        admission = relegate(admission, policy, verdict.why, requota=True)
        verdict = verdict_for(admission, signals)
    # The quota call never counts the model: one store call on the decision's path (the
    # model's set is in another slot). An admit's answer asks for the count instead
    # (`Answer.count_for_model`), which the service writes after answering; a held request
    # is counted once it is let go. (`plan` builds its check so already.)
    check = admission.check
    if check.count_model_now:
        check = replace(check, count_model_now=False)
    admission = admission.traced(verdict.why, check)
    if verdict.action is LoadAction.SHED:
        retry_after_s = overload_retry_after_s(admission.klass, verdict)
        shed = Answer(shed_overloaded(admission, retry_after_s, "shed for load"))
        if check.buckets or check.max_concurrency or check.max_class_concurrency:
            return QuotaFirst(admission, shed)
        return shed
    return TakeQuota(admission, verdict)


@record
class QuotaFirst:
    """Shed for load, unless the request is over its quota: then it is told that (429 with
    the quota's Retry-After), or a client over its quota would retry at the load's pace and
    never learn that its quota is what stops it. Look at the quota without taking any."""

    admission: Admission
    shed: Answer


def on_peek(step: QuotaFirst, result: QuotaResult | None) -> Answer:
    """The quota as it stands (None: the store cannot say): the quota's refusal, else the
    load's (also where the refusing bucket would move it to its excess class)."""
    admission = step.admission
    if result is not None and not result.allowed and excess_bucket(admission, result) is None:
        return Answer(decide(admission, result))
    return step.shed


CONCURRENCY_LIMITS = (LimitKind.CONCURRENCY, LimitKind.CLASS_CONCURRENCY)


def on_excess(
    admission: Admission, result: QuotaResult | None, signals: Signals, policy: Policy
) -> TakeQuota | Answer | None:
    """The excess rule (module comment): refused by a bucket with an excess class, the request
    judged again as that class, its quota to take there, or the load's answer there; None
    where the rule does not apply."""
    moved = excess(admission, result, policy)
    if moved is None:
        return None
    rejudged = judge(moved, signals, policy)
    return rejudged.shed if isinstance(rejudged, QuotaFirst) else rejudged


def on_quota(
    take: TakeQuota,
    result: QuotaResult | None,
    now_s: float,
    release_grace_s: float = 0.0,
    signals: Signals | None = None,
    policy: Policy | None = None,
) -> TakeQuota | Hold | Answer:
    """The store's answer (None: unreachable; the class's fail mode decides). Refused for
    concurrency: for up to `release_grace_s` from the first refusal, wait for a release that
    may be on its way (a finished request's completion can reach the sidecar after its
    client's next request) and ask again; a refusal after that is the answer.

    Admitted by quota and judged to go at once: the room is judged again on `signals`, the
    load as the answer comes back. Others went meanwhile (a held request let go, arrivals
    judged at the same moment): with no room left it is held like a deferred request,
    instead of going over `max_in_flight`.

    Refused by a bucket with an excess class, given `signals` and `policy`: the excess rule
    (module comment), a new TakeQuota (or the load's answer) for that class."""
    if result is not None and result.denied_by in CONCURRENCY_LIMITS and release_grace_s > 0:
        if take.release_deadline_s is None:
            why = f"over concurrency: waits up to {release_grace_s:g}s for a release"
            admission = take.admission.traced(why)
            return replace(take, admission=admission, release_deadline_s=now_s + release_grace_s)
        if now_s < take.release_deadline_s:
            return take
    admission = take.admission
    if policy is not None and signals is not None:
        moved = on_excess(admission, result, signals, policy)
        if moved is not None:
            return moved
    decision = decide(admission, result)
    if not decision.admitted or result is None:
        return Answer(decision)
    if not take.holds:
        again = None if signals is None else verdict_for(admission, signals)
        if again is None or again.action is LoadAction.ADMIT:
            return Answer(decision, note_admitted=admission.model or "", count_for_model=True)
        admission = admission.traced(f"room gone: {again.why}")
        decision = replace(decision, trace=(*decision.trace, admission.trace[-1]))
    model = None if signals is None else signals.model
    upstream_s = NO_UPSTREAM if model is None else model.upstream_s
    budget_s, cut = hold_budget(admission.klass, upstream_s, admission.client_wait_s)
    return Hold(admission, result, decision, now_s, now_s + budget_s, cut)


def on_hold_end(
    hold: Hold, outcome: HoldOutcome, signals: Signals, policy: Policy, held_s: float
) -> Answer:
    """The hold rules of the module comment. `signals` are the load as the hold ends."""
    admission, result = hold.admission, hold.result
    waited = f"held {held_s:.3f}s"
    if outcome is HoldOutcome.LET_GO:
        decision = admit_after_wait(admission, result, f"{waited}, then Triton had room")
        return Answer(decision, count_for_model=True)
    if outcome is HoldOutcome.CANCELLED:
        return Answer(hold.decision, give_back=hold.give_back())
    klass = admission.klass
    if klass.relegate_to is not None and not admission.relegated:
        relegated = relegate(admission, policy, f"{waited}, no room", requota=False)
        again = verdict_for(relegated, signals)
        if again.action is LoadAction.ADMIT:
            decision = admit_after_wait(relegated, result, f"admitted as relegated: {again.why}")
            return Answer(decision, note_admitted=admission.model or "", count_for_model=True)
        admission = replace(relegated, trace=(*relegated.trace, again.why))
    elif klass.overload is not None and klass.overload.shed_above is None:
        decision = admit_after_wait(admission, result, f"{waited}; not sheddable: admitted")
        return Answer(decision, note_admitted=admission.model or "", count_for_model=True)
    retry_after_s = overload_retry_after_s(admission.klass, verdict_for(admission, signals))
    decision = shed_overloaded(admission, retry_after_s, f"{waited}, no room")
    return Answer(decision, give_back=hold.give_back())
