"""What `/v1/explain` and `qos-sidecar explain` say beyond the decision itself.

Rules:
- `queue`: for a request the load rules would not admit at once (held, relegated or shed for
  load), the model, how many requests go before it (Triton's queue over `admit_below`, or in
  flight over the cap, plus the sidecar's own waiters ahead of it), its place in that line,
  the predicted wait from the drain rate, and the class's budget. None otherwise.
- `would_change`: for every decision but a plain admit, the rule that decided it and what
  would turn it round, in the policy's own terms (the bucket and its numbers, the limit and
  how many are in flight, the threshold and the queue depth). One line each; the first is
  the rule that decided. Read from the same values the decision was made from: a preview,
  not a promise (others may take the room meanwhile).
- `with_trace`: with `QOS_EXPLAIN_REFUSALS`, a refusal's JSON body also carries its decision's
  trace, every step the rules took to it, in order (the same steps `/v1/explain` shows for a
  hypothetical request): who the key named, the class, the model and cost, the queue, the
  predicted wait against the budget, how long it was held. Off by default: the steps show
  the load (queue depths, in-flight counts and caps) and other classes' names to the client.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any

from sidecar.core.decide import Admission
from sidecar.core.signals import LoadAction, LoadVerdict
from sidecar.core.types import Decision, Outcome, QuotaResult, Reason


@dataclass(frozen=True, slots=True)
class QueueView:
    model: str
    ahead: int
    position: int  # 1: next to go
    predicted_wait_s: float | None  # None: nothing drains, the wait cannot be predicted
    max_wait_s: float


@dataclass(frozen=True, slots=True)
class Explanation:
    decision: Decision
    queue: QueueView | None = None
    would_change: tuple[str, ...] = ()


def explain(
    decision: Decision,
    planned: Admission | None = None,
    verdict: LoadVerdict | None = None,
    result: QuotaResult | None = None,
) -> Explanation:
    """The explanation of `decision`, made from `planned` and its load `verdict` (None: refused
    before a plan) and the quota as the store shows it (`result`, taking nothing)."""
    queue = None
    if planned is not None and verdict is not None and verdict.action is not LoadAction.ADMIT:
        wait = verdict.predicted_wait_s if math.isfinite(verdict.predicted_wait_s) else None
        budget_s = verdict.budget_s
        if budget_s is None:
            budget_s = planned.klass.max_wait_ms / 1000
        queue = QueueView(planned.model or "", verdict.ahead, verdict.ahead + 1, wait, budget_s)
    return Explanation(decision, queue, _would_change(decision, planned, verdict, result))


def _would_change(
    decision: Decision,
    planned: Admission | None,
    verdict: LoadVerdict | None,
    result: QuotaResult | None,
) -> tuple[str, ...]:
    reason = decision.reason
    if reason in _FIXED:
        return (_FIXED[reason],)
    if planned is None:
        return ()
    if verdict is not None and verdict.action is not LoadAction.ADMIT and decision.admitted:
        return _held(planned, verdict)
    if reason is Reason.OVER_RATE and result is not None:
        return _over_rate(planned, result)
    if reason is Reason.OVER_CONCURRENCY:
        limit = planned.check.max_concurrency
        seen = result.in_flight if result is not None else limit
        return (
            f"tenant {planned.tenant.name!r} max_concurrency {limit}: {seen} in flight; "
            f"admitted when one ends, or with max_concurrency above {seen}",
        )
    if reason is Reason.OVER_CLASS_CONCURRENCY:
        limit = planned.check.max_class_concurrency
        seen = result.class_in_flight if result is not None else limit
        return (
            f"tenant {planned.tenant.name!r} max_concurrency_per_class {planned.klass.name}: "
            f"{limit}, {seen} in flight; admitted when one ends, or with a limit above {seen}",
        )
    if reason is Reason.OVERLOADED and verdict is not None:
        return _overloaded(planned, verdict)
    return ()


def _held(planned: Admission, verdict: LoadVerdict) -> tuple[str, ...]:
    overload = planned.klass.overload
    at_once = f"admit_below {overload.admit_below}" if overload is not None else "room"
    return (
        f"would be held: {verdict.why}",
        f"goes at once when model {planned.model!r} has room ({at_once}); held at most "
        f"max_wait_ms {planned.klass.max_wait_ms}",
    )


def _over_rate(planned: Admission, result: QuotaResult) -> tuple[str, ...]:
    bucket = next((b for b in planned.check.buckets if b.name == result.denied_bucket), None)
    if bucket is None:
        return ("a bucket is empty",)
    return (
        f"bucket {bucket.name!r} of tenant {planned.tenant.name!r} (rate {bucket.rate_per_s:g}/s, "
        f"burst {bucket.burst:g}) lacks the {bucket.cost:g} units this request costs; it holds "
        f"them again in {result.retry_after_s:.3f}s",
        "a higher rate or burst admits it now; enforce: false on the bucket would only record "
        "the refusal (shadow mode)",
    )


def _overloaded(planned: Admission, verdict: LoadVerdict) -> tuple[str, ...]:
    klass, overload = planned.klass, planned.klass.overload
    lines = [f"shed for load: {verdict.why}"]
    if overload is not None and overload.shed_above is not None and "shed_above" in verdict.why:
        lines.append(f"admitted or held once the queue is below shed_above {overload.shed_above}")
    elif math.isfinite(verdict.predicted_wait_s):
        need_ms = math.ceil(verdict.predicted_wait_s * 1000)
        lines.append(
            f"class {klass.name!r} max_wait_ms {klass.max_wait_ms} < the predicted wait: "
            f"max_wait_ms {need_ms} would hold it instead"
        )
    if klass.relegate_to is None:
        lines.append("relegate_to a less important class would serve it there instead of a 503")
    return tuple(lines)


_FIXED = {
    Reason.UNKNOWN_TENANT: "no tenant matches this caller: add its key's sha256 (or its "
    "principal) to a tenant's match, or set unknown_tenants {action: default, tenant: ...}",
    Reason.NO_IDENTITY: "the request carries no identity any identity source reads",
    Reason.CLASS_NOT_ALLOWED: "the class asked for is not in the tenant's allowed_classes; "
    "on_disallowed_class: downgrade would serve it in the default class",
    Reason.UNKNOWN_CLASS: "the class asked for is not defined",
    Reason.STATE_UNAVAILABLE: "the quota store is unavailable and the class's on_state_error "
    "is closed; local_share or open would serve it",
    Reason.UNKNOWN_MODEL: "Triton does not serve this model (a name typo?)",
    Reason.COST_OVER_BURST: "the request costs more than a bucket's burst can ever hold: "
    "a larger burst, or a smaller max tokens in the request",
    Reason.INFEASIBLE: "its max tokens cannot be generated within the class's objective even "
    "alone: fewer max tokens, a class with a longer objective, or tokens.infeasible: relegate",
}


def with_trace(decision: Decision) -> Decision:
    """A refusal whose body is a JSON object, with its trace added as `trace` (module rules);
    anything else as it is."""
    if decision.outcome is not Outcome.SHED or not decision.trace:
        return decision
    try:
        body = json.loads(decision.body)
    except ValueError:
        return decision
    if not isinstance(body, dict):
        return decision
    body["trace"] = list(decision.trace)
    return replace(decision, body=json.dumps(body, separators=(",", ":")).encode())


def decided(decision: Decision) -> dict[str, Any]:
    """What a decision answered and why, JSON-ready: what `/v1/explain` and `/v1/refusals`
    show of every decision."""
    return {
        "outcome": decision.outcome.value,
        "status": decision.status,
        "reason": decision.reason.value,
        "tenant": decision.tenant,
        "class": decision.klass,
        "requested_class": decision.requested_class,
        "retry_after_s": decision.retry_after_s,
        "trace": list(decision.trace),
    }
