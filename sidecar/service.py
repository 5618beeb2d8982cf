"""The admission service: performs the I/O the core's admission machine asks for.

Adapters (ext_authz HTTP and gRPC, ext_proc, the access-log completion stream) convert their
wire format into `RequestAttributes` or a lease token and call this; they never decide. Every
rule of a decision is in `core.admission` (plan → load verdict → quota → hold → answer); this
module only runs its steps: it reads the load signals (through the `Deferrer`), calls the
store (its failures become `None` for the core, which applies the class's fail mode), holds a
deferred request in the `Deferrer`, gives back what an unserved request took, and records
metrics.

While the store is unavailable, a class whose `on_state_error` is `local_share` is checked
against this replica's share of its limits (`core.degraded`) in an in-process store, `local`.
A lease taken there is remembered by id and released, renewed and refunded there, never in
the store; when the store answers again, new admits go to it while local leases drain
locally (a release that reaches another replica finds nothing there and the local lease ends
with its TTL).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from sidecar.accounting import TokenAccounting
from sidecar.batching import Batcher
from sidecar.completions import Completions
from sidecar.core import admission, demand, slices
from sidecar.core.admission import (
    Answer,
    GiveBack,
    Hold,
    HoldOutcome,
    QuotaFirst,
    TakeQuota,
)
from sidecar.core.compiled import CompiledPolicy
from sidecar.core.decide import Admission, decide, malformed
from sidecar.core.degraded import LocalSpend, degrade
from sidecar.core.explain import Explanation, explain, with_trace
from sidecar.core.holds import HoldBounds
from sidecar.core.load import LoadView
from sidecar.core.signals import QUOTA_ONLY, Signals
from sidecar.core.tokens import TokenEstimate
from sidecar.core.types import Decision, LeaseRef, QuotaCheck, QuotaResult, RequestAttributes
from sidecar.deferral import Deferrer
from sidecar.errors import StateUnavailable
from sidecar.leased import LeasedQuota
from sidecar.leases import LeaseKeeper
from sidecar.metrics import Metrics
from sidecar.policy.model import FailMode, Policy
from sidecar.policy.reload import FixedPolicy, PolicySource
from sidecar.quota_peek import QuotaPeeks
from sidecar.recent_refusals import RecentRefusals
from sidecar.shadow_mode import ShadowJudge
from sidecar.shared_reads import SharedReads
from sidecar.state.base import QuotaStore, new_lease_id
from sidecar.state.breaker import CircuitOpen, GuardedStore
from sidecar.state.memory import MemoryQuotaStore
from sidecar.usage import UsageLedger

log = logging.getLogger(__name__)
# Acquire pipelines on their way at once: at low load each decision's acquire goes alone at
# the end of its loop tick; under load, decisions wait for one of these to return and share
# the next (sidecar/batching.py).
ACQUIRES_IN_FLIGHT = 4

# Called with the longest a request may now be held, before it is held.
OnHold = Callable[[float], Awaitable[None]]


class AdmissionService(Completions, SharedReads, LeasedQuota):
    explain_refusals = False  # refusals carry their trace (the app sets it; core/explain.py)

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
        model_pod: str | None = None,
        release_grace_s: float = 0.0,
    ) -> None:
        # The policy lives in its source (the app's reloading PolicyHolder); no copy is kept.
        self._policy = FixedPolicy(policy) if isinstance(policy, Policy) else policy
        self.store, self.metrics = store, metrics
        self.tokens = TokenAccounting(metrics, self._charge, lambda: self.policy.tenants)
        self.usage = UsageLedger(metrics, lambda: self.policy.tenants, lambda: self.policy.models)
        self.peeks = QuotaPeeks(store, clock)  # is a request shed for load over its quota?
        self.shadow = ShadowJudge(self)  # rules not enforced, judged beside: core/shadow.py
        self.hold_bounds = HoldBounds()  # each transport's longest hold (the app sets them)
        # No view of Triton (no endpoints): admitted on quota alone, never shed on no signal.
        self._load, self.stale_after_s = load, stale_after_s
        self.refusals = RecentRefusals()  # the last refusals, with their steps: /v1/refusals
        self.clock = clock
        self.model_pod = model_pod  # whose model counts: this pod's, or None: the fleet's
        self._background: set[asyncio.Future[bool]] = set()
        self._model_writes: dict[str, asyncio.Future[Any]] = {}  # lease id -> its model count
        self.release_grace_s = release_grace_s  # how long a concurrency refusal waits
        self._release_waiters: dict[str, collections.deque[asyncio.Future[None]]] = {}
        # Releases and model counts go through these: many in one store call (batching.py).
        self.releases: Batcher[tuple[LeaseRef, float], bool] = Batcher(self._release_many)
        self.model_counts: Batcher[tuple[LeaseRef, float], bool] = Batcher(self._count_many)
        # Acquires share a pipeline (each atomic); a store in this process is not batched.
        self.acquires = Batcher(self.store.acquire_many, max_in_flight=ACQUIRES_IN_FLIGHT)
        self._acquire_inline = getattr(store, "answers_inline", False) is True
        # The degraded mode's store and its leases (see the module comment); `replicas`: the
        # live count the heartbeats showed last (`heartbeat`).
        self.local = MemoryQuotaStore(clock=clock)
        self.slices, self._asking = slices.Slices(), {}  # leased mode: sidecar/leased.py
        self.local_leases, self.local_spend = {}, LocalSpend()  # see SharedReads
        self.replicas_seen = 1
        self._in_flight_read = ({}, Counter())  # see SharedReads
        # The leases this replica took (renewed while they run) and the releases it owes;
        # `app` runs its loop. Without it (tests), leases simply live their TTL.
        self.leases = LeaseKeeper(
            store, metrics, self._release, lambda: self.policy.lease_ttl_s, clock=clock
        )
        self.deferrer = (
            Deferrer(
                lambda: self.policy,
                load,
                stale_after_s=stale_after_s,
                alpha_s_per_unit=queue_alpha_s_per_unit,
                clock=clock,
                shared=model_pod is None,  # gateway: one pool, one order (core.fleet)
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
        compiled = self.hold_bounds.view(policy or self.snapshot(), api)  # core/holds.py
        decision = await self.shadow.decide(
            compiled, attrs, estimate, lambda a: self._check(compiled, a, on_hold, estimate), api
        )
        self.metrics.observe_decision_seconds(api, time.perf_counter() - started)
        self.metrics.record_decision(decision, compiled.policy.tenants, api)
        self.usage.asked(decision.tenant, attrs)
        self.refusals.note(decision, attrs)
        return with_trace(decision) if self.explain_refusals else decision

    def refuse_malformed(self, message: str, api: str) -> Decision:
        """For adapters that cannot even build the request's attributes: 400, counted."""
        decision = malformed(message)
        self.metrics.record_decision(decision, self.policy.tenants, api)
        self.refusals.note(decision)
        return decision

    async def explain(self, attrs: RequestAttributes) -> Explanation:
        """The decision `attrs` would get now, without taking any quota, holding or counting
        as an arrival; where it would wait and what would change it (core/explain.py)."""
        compiled = self.snapshot()
        planned = admission.plan(attrs, compiled)
        if isinstance(planned, Answer):
            return explain(planned.decision)
        signals = self._signals(planned.model)
        step = admission.judge(planned, signals, compiled.policy)
        chosen = planned if isinstance(step, Answer) else step.admission  # relegated: its own
        result = await self._peek(chosen.check)
        if isinstance(step, QuotaFirst):
            step = admission.on_peek(step, result)
        judged = planned
        if not isinstance(step, Answer):  # refused by a bucket with an excess class?
            moved = admission.on_excess(chosen, result, signals, compiled.policy)
            if isinstance(moved, TakeQuota):
                step = moved
                judged = chosen = moved.admission
                result = await self._peek(chosen.check)
            elif moved is not None:
                step = moved
        decision = step.decision if isinstance(step, Answer) else decide(chosen, result)
        return explain(decision, chosen, admission.verdict_for(judged, signals), result)

    async def release_undelivered(self, decision: Decision) -> None:
        """Give back the lease and the bucket charges of an admit that never reached Envoy
        (the call was cancelled, or Envoy timed it out): the request was never served.

        No completion signal will carry that lease, so waiting for its TTL would hold the
        slot meanwhile. Shielded so the caller's own cancellation cannot interrupt it.
        """
        lease, tenant = decision.lease, decision.tenant
        if tenant is None or (lease is None and not decision.charged):  # nothing was taken
            return
        await asyncio.shield(self._give_back(GiveBack(tenant, decision.charged, lease)))

    async def _check(
        self,
        compiled: CompiledPolicy,
        attrs: RequestAttributes,
        on_hold: OnHold | None,
        estimate: TokenEstimate | None,
    ) -> Decision:
        """Run the core's admission machine, performing the I/O each step asks for."""
        step: TakeQuota | QuotaFirst | Hold | Answer = self._until_quota(compiled, attrs, estimate)
        if isinstance(step, QuotaFirst):  # shed for load, unless over its quota
            step = admission.on_peek(step, await self.peeks.look(step.admission.check))
        while isinstance(step, TakeQuota):
            if step.release_deadline_s is not None:
                wait_s = step.release_deadline_s - self.clock()
                if on_hold is not None:  # ext_proc: Envoy waits too; once per phase, so
                    hold_s = step.admission.klass.max_wait_ms / 1000  # a hold after it too
                    await on_hold(wait_s + hold_s)
                    on_hold = None
                await self._a_release_of(step.admission.tenant.name, wait_s)
            if slices.applies(step.admission.check):  # leased mode: sidecar/leased.py
                result = await self.take_from_slices(step.admission.check)
            else:
                result = await self._acquire(step)
            if result is None and step.admission.klass.on_state_error is FailMode.LOCAL_SHARE:
                owed = step.admission.check.buckets  # the store's, not the share's
                step = replace(step, admission=degrade(step.admission, self.replicas()))
                result = await self._acquire_locally(step.admission.check, owed)
            signals = self._signals(step.admission.model)  # the load now, for the room
            if self.deferrer is not None:
                self.deferrer.at_room(step.admission.klass, step.admission.model, signals)
            step = admission.on_quota(
                step, result, self.clock(), self.release_grace_s, signals, compiled.policy
            )
        self.metrics.demand.offered(demand.offered_model(attrs, step))  # its first verdict: demand?
        if isinstance(step, Hold):
            step = await self._hold(step, compiled.policy, on_hold)
        return await self._perform(step, compiled.policy)

    async def _peek(self, check: QuotaCheck) -> QuotaResult | None:
        """The quota as it stands, taking nothing (None: the store cannot say)."""
        try:
            return await self.store.peek(check)
        except StateUnavailable:
            self.metrics.state_errors.labels("peek").inc()
            return None

    def _until_quota(
        self, compiled: CompiledPolicy, attrs: RequestAttributes, estimate: TokenEstimate | None
    ) -> TakeQuota | QuotaFirst | Answer:
        """Plan and load verdict: the steps before any state is touched."""
        cost = None if estimate is None else (estimate.cost, estimate.why)
        planned = admission.plan(attrs, compiled, cost)
        if isinstance(planned, Admission) and estimate is not None and estimate.readable:
            asked = (estimate.max_tokens, estimate.prompt_tokens)
            pace = self.tokens.seconds_per_token(planned.model, *asked)
            planned = admission.on_size(planned, estimate.max_tokens, pace, compiled.policy)
        if isinstance(planned, Answer):
            return planned
        if self.model_pod is not None and planned.check.model is not None:
            planned = replace(planned, check=replace(planned.check, model_pod=self.model_pod))
        signals = self._signals(planned.model)
        if self.deferrer is not None:
            self.deferrer.arrived(planned.klass, planned.model, signals)
        return admission.judge(planned, signals, compiled.policy)

    def _signals(self, model: str | None) -> Signals:
        if self.deferrer is None:
            return QUOTA_ONLY  # no view of Triton: quota only
        return self.deferrer.signals(model)

    async def _perform(self, answer: Answer, policy: Policy) -> Decision:
        """The bookkeeping an answer asks for, then its decision."""
        if answer.give_back is not None:
            await asyncio.shield(self._give_back(answer.give_back))
        lease = answer.decision.lease
        writes = answer.count_for_model and lease is not None and lease.model is not None
        if answer.note_admitted is not None and self.deferrer is not None:
            self.deferrer.note_admitted(answer.note_admitted, not writes, answer.decision)
        if answer.count_for_model:
            self._count_for_model(answer.decision, policy.lease_ttl_s)
        return answer.decision

    async def _acquire(self, take: TakeQuota) -> QuotaResult | None:
        """Take the quota. Shielded: if the caller is cancelled while Redis answers, the lease
        it took is released instead of being left to its TTL. The lease id is chosen here
        (the request's, or random) so that a failed or timed-out acquire, which the store may
        still run late, can be undone by a release of that id."""
        if isinstance(self.store, GuardedStore) and self.store.breaker.is_open:
            # Degraded: answered now, not by a batched call failing ticks later (nothing owed).
            self.metrics.state_errors.labels("acquire").inc()
            return None
        check = take.admission.check
        if check.lease_id is None:
            check = replace(check, lease_id=new_lease_id())
        lease = LeaseRef.of(check, check.lease_id or "")
        # A store in this process (`answers_inline`) is called directly: its acquire never
        # suspends, so a batch would only cost a loop turn and its futures (a third of the
        # memory store's decision, `benchmarks/request_cost.py`) and the decision a wait.
        task = None if self._acquire_inline else self.acquires.enqueue(check)
        try:
            result = await (self.store.acquire(check) if task is None else asyncio.shield(task))
        except StateUnavailable as exc:
            # Not logged per call: the store's circuit breaker logs each outage once.
            self.metrics.state_errors.labels("acquire").inc()
            if not isinstance(exc, CircuitOpen):  # an open circuit sent nothing to release
                self.leases.owe(lease)
            return None
        except asyncio.CancelledError:
            if task is not None:
                task.add_done_callback(lambda done: self._release_orphan(lease, done))
            raise
        if result.lease_id is not None:
            self.leases.taken(lease)
        if result.allowed:
            self._spent(check.tenant, check.buckets)
        return result

    def _release_orphan(self, lease: LeaseRef, done: asyncio.Future[QuotaResult]) -> None:
        if done.cancelled() or done.exception() is not None:
            # Unknown whether the store ran it (or will): owe its release.
            self.leases.owe(lease)
            return
        if done.result().lease_id is not None:
            task = asyncio.ensure_future(self.release(lease))
            self._background.add(task)  # keep a reference until it is done
            task.add_done_callback(self._background.discard)

    async def _hold(self, hold: Hold, policy: Policy, on_hold: OnHold | None) -> Answer:
        """Hold an admitted request until the Deferrer lets it go or its deadline passes;
        the core then says what becomes of it."""
        assert self.deferrer is not None  # only a sidecar with a view of Triton holds
        planned, klass = hold.admission, hold.admission.klass
        held = self.metrics.held.labels(klass.name)
        held.inc()
        outcome = HoldOutcome.CANCELLED
        try:
            if on_hold is not None:
                await on_hold(hold.max_wait_s)
            outcome = await self.deferrer.hold(
                planned.tenant.name,
                klass.name,
                klass.rank,
                planned.model or "",
                planned.cost,
                hold.deadline_s,
                counted=planned.check.model is not None,
                displace=not planned.relegated,  # relegated work never displaces the class's
                client_cut=hold.client_cut,
                weight=planned.tenant.weight,
            )
        except asyncio.CancelledError:
            # Client or Envoy gone while held: its slot and tokens were never used.
            await asyncio.shield(self._give_back(hold.give_back()))
            raise
        finally:
            held.dec()
            held_s = self.clock() - hold.started_s
            self.metrics.held_seconds.labels(klass.name, outcome.value).observe(held_s)
        signals = self._signals(planned.model)
        return admission.on_hold_end(hold, outcome, signals, policy, held_s)

    async def _count_many(self, items: list[tuple[LeaseRef, float]]) -> list[bool | None]:
        await self.store.count_for_model_many([lease for lease, _ in items], items[0][1])
        return [True] * len(items)

    def _count_for_model(self, decision: Decision, lease_ttl_s: float) -> None:
        """Count an admit's lease for its model in the store, after the answer: off the
        decision's path (one store call per decision). Until the write lands, this replica
        counts it itself (`core.in_flight`, pending) and shares it as in transit
        (`core.fleet`); a release of the lease here waits for the write first, so that the
        release cannot land before it and leave the entry to its TTL."""
        lease = decision.lease
        if lease is None or lease.model is None:
            return
        task: asyncio.Future[Any]
        if lease.lease_id in self.local_leases:
            task = asyncio.ensure_future(self.local.count_for_model(lease, lease_ttl_s))
        else:
            task = self.model_counts.enqueue((lease, lease_ttl_s))
        self._model_writes[lease.lease_id] = task

        def written(done: asyncio.Future[Any]) -> None:
            if not done.cancelled():
                if done.exception() is not None:
                    self.metrics.state_errors.labels("model_lease").inc()  # left to its TTL
                elif lease.model_only:  # the entry is its whole lease: renewed while it runs
                    self.leases.taken(lease)
            self._model_writes.pop(lease.lease_id, None)
            if self.deferrer is not None and lease.model is not None:
                self.deferrer.note_written(lease.model)

        task.add_done_callback(written)

    async def _give_back(self, give_back: GiveBack) -> None:
        """Return the lease and the bucket tokens of a request that was never served."""
        lease = give_back.lease
        local = lease is not None and lease.lease_id in self.local_leases
        if give_back.lease is not None:
            # Held, so never counted for its model: its end must not lower that count.
            await self.release(give_back.lease, counted=False)
        refunds = [replace(bucket, cost=-bucket.cost) for bucket in give_back.buckets]
        if not refunds:
            return
        if local:
            self.local_spend.given_back(give_back.tenant, give_back.buckets)
        try:
            await (self.local.charge if local else self._charge)(give_back.tenant, refunds)
        except StateUnavailable:
            self.metrics.state_errors.labels("charge").inc()
