"""The admission service: the one place where the core, the quota store and metrics meet.

Adapters (ext_authz HTTP, ext_authz gRPC, the access-log completion stream) convert their
wire format into `RequestAttributes` or a lease token and call this; they never decide.
The store is called once per decision; its failures become `None` for the core, which
applies the class's fail-open or fail-closed rule.
"""

from __future__ import annotations

import asyncio
import logging
import time

from sidecar.admin.metrics import Metrics
from sidecar.core.decide import CompiledPolicy, compile_policy, decide, plan_request
from sidecar.core.lease import format_lease, parse_lease
from sidecar.core.types import Decision, LeaseRef, QuotaResult, RequestAttributes
from sidecar.errors import StateUnavailable
from sidecar.policy.model import Policy
from sidecar.state.base import QuotaStore

log = logging.getLogger(__name__)


class AdmissionService:
    def __init__(self, policy: Policy, store: QuotaStore, metrics: Metrics) -> None:
        self._compiled = compile_policy(policy)
        self._known_tenants = frozenset(policy.tenants)
        self.store = store
        self.metrics = metrics

    @property
    def policy(self) -> Policy:
        return self._compiled.policy

    def use_policy(self, policy: Policy) -> None:
        """Swap the policy whole; requests in flight keep the snapshot they started with."""
        compiled = compile_policy(policy)
        self._known_tenants = frozenset(policy.tenants)
        self._compiled = compiled

    async def check(self, attrs: RequestAttributes, api: str) -> Decision:
        """Decide one request, taking quota when it is admitted."""
        started = time.perf_counter()
        decision = await self._check(self._compiled, attrs)
        self.metrics.decision_seconds.labels(api).observe(time.perf_counter() - started)
        self.metrics.record_decision(decision, self._known_tenants, api)
        return decision

    async def explain(self, attrs: RequestAttributes) -> Decision:
        """The decision `attrs` would get now, without taking any quota."""
        planned = plan_request(attrs, self._compiled)
        if isinstance(planned, Decision):
            return planned
        try:
            result: QuotaResult | None = await self.store.peek(planned.check)
        except StateUnavailable:
            self.metrics.state_errors.labels("peek").inc()
            result = None
        return decide(planned, result)

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
        return released

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

    async def release_undelivered(self, decision: Decision) -> None:
        """Free the lease of an admit that never reached Envoy (the call was cancelled).

        No completion signal will carry that lease, so waiting for its TTL would hold the
        slot for minutes. Shielded so the caller's own cancellation cannot interrupt it.
        """
        if decision.lease_id is None or decision.tenant is None or decision.klass is None:
            return
        lease = LeaseRef(decision.tenant, decision.klass, decision.lease_id)
        await asyncio.shield(self.complete(format_lease(lease)))

    async def _check(self, compiled: CompiledPolicy, attrs: RequestAttributes) -> Decision:
        planned = plan_request(attrs, compiled)
        if isinstance(planned, Decision):
            return planned
        try:
            result: QuotaResult | None = await self.store.acquire(planned.check)
        except StateUnavailable as exc:
            log.warning("quota store unavailable: %s", exc)
            self.metrics.state_errors.labels("acquire").inc()
            result = None
        return decide(planned, result)
