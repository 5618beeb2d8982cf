"""Token accounting for models with a `tokens` policy (ext_proc mode): how a request was
priced, the refusal of a body whose cost cannot be read, and the settlement of an estimate
with what the response said. The arithmetic is the core's (`core.tokens`); this counts it
and asks the service to charge or refund the difference. Each settled response also tells
how fast its model generated (`core.pace`), which the size rule reads
(`seconds_per_token`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Container, Sequence
from dataclasses import replace

from sidecar.core.decide import refuse_unreadable
from sidecar.core.kserve import Unreadable
from sidecar.core.pace import GenerationPace
from sidecar.core.tokens import TokenEstimate, UsageMeter, settlement
from sidecar.core.types import BucketCheck, Decision
from sidecar.errors import StateUnavailable
from sidecar.metrics import Metrics
from sidecar.policy.model import TokenPolicy

Charge = Callable[[str, Sequence[BucketCheck]], Awaitable[None]]


class TokenAccounting:
    def __init__(
        self, metrics: Metrics, charge: Charge, tenants: Callable[[], Container[str]]
    ) -> None:
        self.metrics = metrics
        self._charge = charge  # the store's: raises StateUnavailable
        self._tenants = tenants  # the policy's tenants, for bounded metric labels
        # Per token model (the policy's: bounded), the pace its responses showed (core/pace.py).
        self._paces: dict[str, GenerationPace] = {}

    def _observe_pace(self, model: str, generated: int, elapsed_s: float, prompt: int) -> None:
        pace = self._paces.setdefault(model, GenerationPace())
        pace.observe(generated, elapsed_s, prompt)
        fastest = pace.fastest()
        if fastest is not None:
            self.metrics.generation_pace.labels(model).set(fastest)

    def seconds_per_token(self, model: str | None, tokens: int, prompt: int) -> float | None:
        """The pace `model` has shown on responses of at least `tokens` tokens from a prompt
        of at most `prompt` (core/pace.py rule 2; None: none such settled yet)."""
        pace = self._paces.get(model) if model else None
        return None if pace is None else pace.seconds_per_token(tokens, prompt)

    async def _reconcile(self, decision: Decision, delta: float) -> bool:
        """Charge (or, negative, refund) `delta` cost units to every cost bucket `decision`
        charged: an estimate made good once the response said what the request used.
        False when the store could not be reached (the estimate then stands)."""
        by_cost = [replace(bucket, cost=delta) for bucket in decision.charged if bucket.by_cost]
        if decision.tenant is None or not by_cost or delta == 0:
            return True
        try:
            await self._charge(decision.tenant, by_cost)
        except StateUnavailable:
            self.metrics.state_errors.labels("charge").inc()
            return False
        return True

    def note_estimate(
        self, decision: Decision, estimate: TokenEstimate | None, model: str | None = None
    ) -> None:
        """Count how a request to a token model was priced: `unestimated` (no body to read;
        `cost_per_request` was charged), `charged_max` (its body could not be read and
        `tokens.unreadable` is charge_max) or, when admitted, `estimated` with its prompt and
        max tokens. Counted even when no bucket took the cost (no `cost` bucket, or the store
        failed open): the token counts are still worth having."""
        if estimate is None:
            self.metrics.token_accounting.labels("unestimated").inc()
            return
        if not estimate.readable:
            self.metrics.token_accounting.labels("charged_max").inc()
            return
        if not decision.admitted:
            return
        self.metrics.token_accounting.labels("estimated").inc()
        labels = (decision.tenant or "", decision.klass or "")
        self.metrics.tokens.labels(*labels, "prompt").inc(estimate.prompt_tokens)
        self.metrics.tokens.labels(*labels, "max").inc(estimate.max_tokens)
        if model is not None:  # a token model: one of the policy's, a bounded label
            self.metrics.usage.tokens.labels(labels[0], model, "prompt").inc(estimate.prompt_tokens)

    def refuse_unreadable(self, problem: Unreadable, api: str) -> Decision:
        """A token model's body whose cost cannot be read, under `tokens.unreadable: refuse`:
        400 or 415 (core.decide), counted as a decision and as `refused_unreadable`."""
        decision = refuse_unreadable(problem)
        self.metrics.record_decision(decision, self._tenants(), api)
        self.metrics.token_accounting.labels("refused_unreadable").inc()
        return decision

    async def settle(
        self,
        decision: Decision,
        tokens: TokenPolicy,
        estimate: TokenEstimate,
        meter: UsageMeter,
        *,
        ended: bool,
        model: str | None = None,
        elapsed_s: float | None = None,
    ) -> None:
        """Make an admit's charge good with what its response said (`core.tokens.settlement`):
        one charge or refund to the buckets it charged (`_reconcile`), or none,
        leaving the charge standing when the response never said its usage. A whole response
        `elapsed_s` after its admission is its model's pace (core/pace.py rule 1)."""
        # Every cost bucket took the same cost: the estimate, or what charge_max came to.
        # (`charged` lists every bucket the admit charged; `requests` buckets cost 1.)
        by_cost = [bucket.cost for bucket in decision.charged if bucket.by_cost]
        charged = by_cost[0] if by_cost else estimate.cost
        delta, result = settlement(tokens, estimate, charged, meter, ended=ended)
        generated = meter.generated()
        if generated is not None and not meter.rejected:
            labels = (decision.tenant or "", decision.klass or "")
            self.metrics.tokens.labels(*labels, "generated").inc(generated)
            if model is not None:
                self.metrics.usage.tokens.labels(labels[0], model, "generated").inc(generated)
            # Its prompt is the request's, so an unreadable one (charge_max) says no pace.
            if model is not None and ended and elapsed_s is not None and estimate.readable:
                self._observe_pace(model, generated, elapsed_s, estimate.prompt_tokens)
        if delta is not None and not await self._reconcile(decision, delta):
            result = "store_error"
        self.metrics.token_accounting.labels(result).inc()
