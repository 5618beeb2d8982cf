"""Shadow mode's I/O for `AdmissionService` (`service.shadow`); its rules: `core/shadow.py`.

The enforced decision and the written policy's judgement run side by side (a task beside it),
so a shadowed request waits for the slower of the two, not for both: the judgement is one
plan, one load verdict and, unless shed for load, one acquire in the tenant's shadow space
(sent in the same pipeline as the enforced acquire when both are ready in one loop tick).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Protocol

from sidecar.batching import Batcher
from sidecar.core import admission
from sidecar.core.admission import Answer, GiveBack, Hold, QuotaFirst, TakeQuota
from sidecar.core.compiled import CompiledPolicy
from sidecar.core.decide import Admission
from sidecar.core.lease import lease_id_for
from sidecar.core.shadow import ShadowedPolicy, shadow_check, shadow_tenant, with_shadow
from sidecar.core.signals import LoadAction, Signals
from sidecar.core.tokens import TokenEstimate
from sidecar.core.types import Decision, LeaseRef, QuotaCheck, QuotaResult, RequestAttributes
from sidecar.errors import StateUnavailable
from sidecar.leases import LeaseKeeper
from sidecar.metrics import Metrics
from sidecar.policy.model import Policy
from sidecar.state.base import new_lease_id

# What the written policy decided (None: the store could not say) and whether it would have
# held the request first.
Seen = tuple[Decision | None, bool]


class Service(Protocol):
    """What shadow mode uses of `AdmissionService`: its I/O steps, not its rules."""

    metrics: Metrics
    leases: LeaseKeeper
    releases: Batcher[tuple[LeaseRef, float], bool]
    clock: Callable[[], float]

    @property
    def policy(self) -> Policy: ...
    def _signals(self, model: str | None) -> Signals: ...
    async def _peek(self, check: QuotaCheck) -> QuotaResult | None: ...
    async def _acquire(self, take: TakeQuota) -> QuotaResult | None: ...
    async def _give_back(self, give_back: GiveBack) -> None: ...


class ShadowJudge:
    def __init__(self, service: Service) -> None:
        self._service = service
        self._giving_back: set[asyncio.Future[None]] = set()  # referenced until done

    async def decide(
        self,
        compiled: CompiledPolicy,
        attrs: RequestAttributes,
        estimate: TokenEstimate | None,
        enforced: Callable[[RequestAttributes], Awaitable[Decision]],
        api: str,
    ) -> Decision:
        """`enforced(attrs)`: the enforced decision; judged beside the written policy's when that
        has shadow rules."""
        if not isinstance(compiled, ShadowedPolicy):
            return await enforced(attrs)
        if lease_id_for(attrs.request_id) is None:
            # Both leases under one id, so that the enforced lease's release names the other.
            attrs = replace(attrs, request_id=new_lease_id())
        return await self._check_shadowed(compiled, attrs, estimate, enforced, api)

    async def _check_shadowed(
        self,
        shadowed: ShadowedPolicy,
        attrs: RequestAttributes,
        estimate: TokenEstimate | None,
        enforced: Callable[[RequestAttributes], Awaitable[Decision]],
        api: str,
    ) -> Decision:
        """`enforced()` decides; what the written policy would decide is judged beside it,
        recorded and sent upstream with an admit."""
        service = self._service
        cost = None if estimate is None else (estimate.cost, estimate.why)
        planned = admission.plan(attrs, shadowed.written or shadowed, cost)
        # Refused before any rule that can be shadowed (identity, class, body): the same.
        if isinstance(planned, Answer) or not shadowed.touches(
            planned.tenant.name, planned.klass.name
        ):
            return await enforced(attrs)
        judged = asyncio.ensure_future(self._judge_written(shadowed, planned))
        try:
            real = await enforced(attrs)
        except BaseException:  # cancelled (client or Envoy gone) or failed: never served
            judged.add_done_callback(self._give_back_judged)
            raise
        seen, deferred = await judged
        if seen is not None:
            service.metrics.record_decision(seen, shadowed.policy.tenants, api, shadow=True)
        else:
            service.metrics.state_errors.labels("shadow").inc()
        held_lease = seen.lease if seen is not None and seen.admitted else None
        if held_lease is not None and (not real.admitted or real.lease is None):
            # Never served, or admitted with no lease whose end would free it: give it back.
            charged = () if real.admitted else seen.charged if seen is not None else ()
            await asyncio.shield(
                service._give_back(GiveBack(held_lease.tenant, charged, held_lease))
            )
            seen = replace(seen, lease=None) if seen is not None else None
        return with_shadow(real, seen, deferred)

    def _give_back_judged(self, judged: asyncio.Future[Seen]) -> None:
        """The shadow lease of a request whose enforced decision never came, given back
        once its judgement is done (else the lease keeper would renew it for ever)."""
        if judged.cancelled() or judged.exception() is not None:
            return  # an acquire cut short owes its own release (`AdmissionService._acquire`)
        seen, _ = judged.result()
        if seen is not None and seen.admitted and seen.lease is not None:
            give_back = GiveBack(seen.lease.tenant, seen.charged, seen.lease)
            task = asyncio.ensure_future(self._service._give_back(give_back))
            self._giving_back.add(task)
            task.add_done_callback(self._giving_back.discard)

    async def _judge_written(self, shadowed: ShadowedPolicy, planned: Admission) -> Seen:
        """The written policy's decision, its quota taken in the shadow space; never held."""
        service = self._service
        written = shadowed.written or shadowed
        planned = replace(planned, check=shadow_check(planned.check))
        signals = service._signals(planned.model)
        step = admission.judge(planned, signals, written.policy)
        if isinstance(step, QuotaFirst):
            step = admission.on_peek(step, await service._peek(step.admission.check))
        if isinstance(step, Answer):
            return step.decision, False
        deferred = step.verdict.action is LoadAction.DEFER
        result = await service._acquire(step)
        if result is None:
            return None, deferred
        answer = admission.on_quota(step, result, service.clock(), 0.0, signals, written.policy)
        if isinstance(answer, TakeQuota) and answer.release_deadline_s is None:  # excess class
            deferred = answer.verdict.action is LoadAction.DEFER
            result = await service._acquire(answer)
            if result is None:
                return None, deferred
            answer = admission.on_quota(answer, result, service.clock())
        if isinstance(answer, Hold):
            return answer.decision, True
        if isinstance(answer, Answer):
            return answer.decision, deferred
        return None, deferred  # would wait for a release: not judged in shadow

    async def release(self, lease: LeaseRef) -> None:
        """Free the shadow lease that rides with `lease` (its release, not counted twice in
        the completions)."""
        service = self._service
        shadow = replace(lease, tenant=shadow_tenant(lease.tenant), model=None, model_pod=None)
        shadow = replace(shadow, shadow=False, model_only=False)  # a tenant lease, always
        service.leases.ended(shadow)
        try:
            await service.releases.submit((shadow, service.policy.lease_ttl_s))
        except StateUnavailable:
            service.metrics.state_errors.labels("release").inc()
            service.leases.owe(shadow)
