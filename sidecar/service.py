"""The admission service: the one place where the core, the quota store, Triton's load view
and metrics meet.

Adapters (ext_authz HTTP and gRPC, ext_proc, the access-log completion stream) convert their
wire format into `RequestAttributes` or a lease token and call this; they never decide.
Load is judged first (a request shed for load takes no quota); the store is called once per
decision and its failures become `None` for the core, which applies the class's fail-open or
fail-closed rule; a deferred request is then held by the `Deferrer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace

from sidecar.core.decide import (
    Admission,
    CompiledPolicy,
    admit_after_wait,
    decide,
    malformed,
    plan_request,
    relegate,
    shed_overloaded,
)
from sidecar.core.lease import format_lease, parse_lease
from sidecar.core.load import LoadView
from sidecar.core.overload import LoadAction, LoadVerdict, judge_load, overload_retry_after_s
from sidecar.core.tokens import TokenEstimate
from sidecar.core.types import Decision, LeaseRef, QuotaResult, RequestAttributes
from sidecar.deferral import Deferrer
from sidecar.errors import StateUnavailable
from sidecar.metrics import Metrics
from sidecar.policy.model import Policy
from sidecar.policy.reload import FixedPolicy, PolicySource
from sidecar.state.base import QuotaStore

log = logging.getLogger(__name__)
# Called with the longest a request may now be held, before it is held.
OnHold = Callable[[float], Awaitable[None]]


class AdmissionService:
    def __init__(
        self,
        policy: Policy | PolicySource,
        store: QuotaStore,
        metrics: Metrics,
        *,
        load: Callable[[], LoadView] | None = None,
        stale_after_s: float = 1.0,
        queue_alpha_s_per_unit: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # The policy's one home is its source (the app's PolicyHolder, which reloads it); a plain
        # Policy is one that never changes. Nothing here keeps a copy.
        self._policy = FixedPolicy(policy) if isinstance(policy, Policy) else policy
        self.store = store
        self.metrics = metrics
        # Without a view of Triton (no endpoints configured) classes are admitted on quota
        # alone: treating "no signal" as saturated would shed everything forever.
        self._load = load
        self.stale_after_s = stale_after_s
        self.clock = clock
        self._background: set[asyncio.Future[bool]] = set()
        self.deferrer = (
            Deferrer(
                lambda: self.policy,
                load,
                stale_after_s=stale_after_s,
                alpha_s_per_unit=queue_alpha_s_per_unit,
                clock=clock,
            )
            if load is not None
            else None
        )

    @property
    def policy(self) -> Policy:
        return self._policy.snapshot().policy

    def snapshot(self) -> CompiledPolicy:
        """The current policy, for a caller that must use one snapshot across several calls
        (an ext_proc stream, from its headers to its end)."""
        return self._policy.snapshot()

    async def check(
        self,
        attrs: RequestAttributes,
        api: str,
        on_hold: OnHold | None = None,
        estimate: TokenEstimate | None = None,
        policy: CompiledPolicy | None = None,
    ) -> Decision:
        """Decide one request, taking quota when it is admitted. `on_hold(max_wait_s)` runs
        before a request is held (ext_proc uses it to extend Envoy's message timeout).
        `estimate` is the request's own cost, read from its body; without it the model's
        cost_per_request is charged. `policy` pins a snapshot (default: the current one)."""
        started = time.perf_counter()
        decision = await self._check(policy or self.snapshot(), attrs, on_hold, estimate)
        self.metrics.decision_seconds.labels(api).observe(time.perf_counter() - started)
        self.metrics.record_decision(decision, self.policy.tenants, api)
        return decision

    def refuse_malformed(self, message: str, api: str) -> Decision:
        """For adapters that cannot even build the request's attributes: 400, counted."""
        decision = malformed(message)
        self.metrics.record_decision(decision, self.policy.tenants, api)
        return decision

    async def explain(self, attrs: RequestAttributes) -> Decision:
        """The decision `attrs` would get now, without taking any quota."""
        planned = self._plan(self.snapshot(), attrs)
        if isinstance(planned, Decision):
            return planned
        admission, verdict = planned
        try:
            result: QuotaResult | None = await self.store.peek(admission.check)
        except StateUnavailable:
            self.metrics.state_errors.labels("peek").inc()
            result = None
        decision = decide(admission, result)
        if verdict.action is LoadAction.DEFER and decision.admitted:
            # Explain does not wait: say that the real request would be held first.
            hold = f"would be held up to {admission.klass.max_wait_ms} ms for Triton to have room"
            decision = replace(decision, trace=(*decision.trace, hold))
        return decision

    async def complete(self, lease_token: str | None) -> bool:
        """Release the lease named by a completion signal. True if a lease was freed."""
        if not lease_token:
            self.metrics.completions.labels("no_lease").inc()
            return False
        lease = parse_lease(lease_token)
        if lease is None:
            self.metrics.completions.labels("bad_lease").inc()
            return False
        try:
            released = await self.store.release(lease)
        except StateUnavailable:
            # The lease TTL frees the slot later; nothing else can be done now.
            self.metrics.state_errors.labels("release").inc()
            return False
        self.metrics.completions.labels("released" if released else "already_released").inc()
        if self.deferrer is not None:
            if released and lease.model is not None:
                self.deferrer.note_ended(lease.model)
            self.deferrer.pump()
        return released

    async def reconcile(self, decision: Decision, delta: float) -> bool:
        """Charge (or, negative, refund) `delta` cost units to every cost bucket `decision`
        charged: an estimate made good once the response said what the request used.
        False when the store could not be reached (the estimate then stands)."""
        if decision.tenant is None or not decision.charged or delta == 0:
            return True
        try:
            await self.store.charge(
                decision.tenant, [replace(bucket, cost=delta) for bucket in decision.charged]
            )
        except StateUnavailable:
            self.metrics.state_errors.labels("charge").inc()
            return False
        return True

    async def refresh_in_flight(self) -> None:
        """Copy the store's in-flight counts into the gauge.

        The counts live in the shared store because a lease granted by one replica may be
        released through another; every replica therefore reports the same, global number.
        """
        policy = self.policy
        for tenant in policy.tenants.values():
            for klass in sorted(tenant.allowed_classes):
                try:
                    count = await self.store.in_flight(tenant.name, klass)
                except StateUnavailable:
                    self.metrics.state_errors.labels("in_flight").inc()
                    return
                self.metrics.in_flight.labels(tenant.name, klass).set(count)

    async def refresh_model_in_flight(self, models: Iterable[str]) -> None:
        """Read every model's in-flight count from the store (global: every replica's leases)
        into the deferrer and the gauge. Store down: the last counts stay."""
        counts: dict[str, int] = {}
        for model in models:
            try:
                counts[model] = await self.store.model_in_flight(model)
            except StateUnavailable:
                self.metrics.state_errors.labels("model_in_flight").inc()
                return
            self.metrics.model_in_flight.labels(model).set(counts[model])
        if self.deferrer is not None:
            self.deferrer.set_in_flight(counts)

    async def release_undelivered(self, decision: Decision) -> None:
        """Free the lease of an admit that never reached Envoy (the call was cancelled).

        No completion signal will carry that lease, so waiting for its TTL would hold the
        slot for minutes. Shielded so the caller's own cancellation cannot interrupt it.
        """
        if decision.lease is None:
            return
        await asyncio.shield(self.complete(format_lease(decision.lease)))

    async def _check(
        self,
        compiled: CompiledPolicy,
        attrs: RequestAttributes,
        on_hold: OnHold | None,
        estimate: TokenEstimate | None,
    ) -> Decision:
        plan = self._plan(compiled, attrs, estimate)
        if isinstance(plan, Decision):
            return plan
        planned, verdict = plan
        if verdict.action is LoadAction.DEFER:
            # Not in flight while held: its model counts it once it is let go (`_counted`).
            planned = replace(planned, check=replace(planned.check, count_model_now=False))
        result = await self._acquire(planned)
        decision = decide(planned, result)
        if not decision.admitted or result is None or self.deferrer is None:
            return decision
        if verdict.action is not LoadAction.DEFER:
            self.deferrer.note_admitted(planned.model or "")
            return decision
        held = await self._hold(planned, result, decision, on_hold)
        if held.admitted:
            await self._counted(held)
        return held

    def _plan(
        self,
        compiled: CompiledPolicy,
        attrs: RequestAttributes,
        estimate: TokenEstimate | None = None,
    ) -> tuple[Admission, LoadVerdict] | Decision:
        """Identity, class and load, before any state is touched: an early decision (refused,
        or shed for load, which costs the tenant no quota) or what to take from the store."""
        cost = None if estimate is None else (estimate.cost, estimate.why)
        planned = plan_request(attrs, compiled, cost)
        if isinstance(planned, Decision):
            return planned
        verdict = self._judge(planned)
        if verdict.action is LoadAction.RELEGATE:
            planned = relegate(planned, compiled.policy, verdict.why, requota=True)
            verdict = self._judge(planned)
        planned = replace(planned, trace=(*planned.trace, verdict.why))
        if verdict.action is LoadAction.SHED:
            return shed_overloaded(
                planned, overload_retry_after_s(planned.klass, verdict), "shed for load"
            )
        return planned, verdict

    async def _acquire(self, planned: Admission) -> QuotaResult | None:
        """Take the quota. Shielded: if the caller is cancelled while Redis answers, the lease
        it took is released instead of being left to its TTL."""
        task = asyncio.ensure_future(self.store.acquire(planned.check))
        try:
            return await asyncio.shield(task)
        except StateUnavailable as exc:
            log.warning("quota store unavailable: %s", exc)
            self.metrics.state_errors.labels("acquire").inc()
            return None
        except asyncio.CancelledError:
            task.add_done_callback(lambda done: self._release_orphan(planned, done))
            raise

    def _release_orphan(self, planned: Admission, done: asyncio.Future[QuotaResult]) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        result = done.result()
        if result.allowed and result.lease_id is not None:
            lease = LeaseRef(
                planned.tenant.name, planned.check.klass, result.lease_id, planned.check.model
            )
            task = asyncio.ensure_future(self.complete(format_lease(lease)))
            self._background.add(task)  # keep a reference until it is done
            task.add_done_callback(self._background.discard)

    def _judge(self, planned: Admission) -> LoadVerdict:
        klass, model = planned.klass, planned.model
        if klass.overload is None or self._load is None or model is None or not self.deferrer:
            return LoadVerdict(LoadAction.ADMIT, 0.0, "admission by quota only")
        view = self._load()
        return judge_load(
            klass,
            view.state_of(model, self.clock(), self.stale_after_s),
            view.queue_depth(model) + self.deferrer.released_since_scrape(model),
            view.completions_per_s(model),
            self.deferrer.waiting_ahead(klass.rank),
            relegated=planned.relegated,
            in_flight=self.deferrer.in_flight(model),
        )

    async def _hold(
        self,
        planned: Admission,
        result: QuotaResult,
        decision: Decision,
        on_hold: OnHold | None,
    ) -> Decision:
        """Hold an admitted request until Triton has room, or until it can no longer wait."""
        assert self.deferrer is not None
        klass, started = planned.klass, self.clock()
        held = self.metrics.held.labels(klass.name)
        held.inc()
        outcome = "cancelled"
        try:
            if on_hold is not None:
                await on_hold(klass.max_wait_ms / 1000)
            admitted = await self.deferrer.hold(
                planned.tenant.name,
                klass.name,
                klass.rank,
                planned.model or "",
                planned.cost,
                started + klass.max_wait_ms / 1000,
            )
            outcome = "admitted" if admitted else "expired"
        except asyncio.CancelledError:
            # Client or Envoy gone while held: its slot and tokens were never used.
            await asyncio.shield(self._give_back(planned, decision))
            raise
        finally:
            held.dec()
            self.metrics.held_seconds.labels(klass.name, outcome).observe(self.clock() - started)
        waited = f"held {self.clock() - started:.3f}s"
        if admitted:
            return admit_after_wait(planned, result, f"{waited}, then Triton had room")
        overload = klass.overload
        if klass.relegate_to is not None and not planned.relegated:
            relegated = relegate(planned, self.policy, f"{waited}, no room", requota=False)
            # Relegated, it must still fit its new class's load: otherwise every request that
            # waited out its hold would pour into Triton's queue at the lower priority.
            again = self._judge(relegated)
            if again.action is LoadAction.ADMIT:
                self.deferrer.note_admitted(planned.model or "")
                return admit_after_wait(relegated, result, f"admitted as relegated: {again.why}")
            planned = replace(relegated, trace=(*relegated.trace, again.why))
            klass = planned.klass
        elif overload is not None and overload.shed_above is None:
            return admit_after_wait(planned, result, f"{waited}; not sheddable: admitted")
        await self._give_back(planned, decision)
        return shed_overloaded(
            planned, overload_retry_after_s(klass, self._judge(planned)), f"{waited}, no room"
        )

    async def _counted(self, decision: Decision) -> None:
        """A held request let go to Triton: its lease (which names its model) now counts for
        that model."""
        lease = decision.lease
        if lease is None or lease.model is None:
            return
        task = asyncio.ensure_future(self.store.count_for_model(lease, self.policy.lease_ttl_s))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # Client gone meanwhile: nobody will carry this lease, so free it (and, once it
            # is written, its model entry) now rather than at its TTL.
            await asyncio.shield(self._release_when_done(task, lease))
            raise

    async def _release_when_done(self, task: asyncio.Future[None], lease: LeaseRef) -> None:
        with contextlib.suppress(Exception):
            await task
        await self.complete(format_lease(lease))

    async def _give_back(self, planned: Admission, decision: Decision) -> None:
        """Return the lease and the bucket tokens of a request that was never served."""
        await self.release_undelivered(decision)
        refunds = [replace(bucket, cost=-bucket.cost) for bucket in planned.check.buckets]
        try:
            await self.store.charge(planned.tenant.name, refunds)
        except StateUnavailable:
            self.metrics.state_errors.labels("charge").inc()
