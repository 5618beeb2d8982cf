"""What a replica reads back from the shared store every interval, and shares there: the
in-flight gauges of every tenant and class, each model's in-flight count (which
`max_in_flight` caps), this replica's heartbeat (the live count degraded mode divides limits
by), and, in the gateway topology, the fleet's holds and fairness counters
(`core.fleet`); and what degraded mode starts from and owes (this replica's spend,
`core.degraded`). A mixin of `AdmissionService`, kept apart so that the decision path reads on
its own."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from sidecar.core.degraded import LocalSpend, share_of
from sidecar.core.fleet import encode_summary, with_in_transit
from sidecar.core.types import BucketCheck, LeaseRef, QuotaCheck, QuotaResult
from sidecar.deferral import Deferrer
from sidecar.errors import StateUnavailable
from sidecar.leases import LeaseKeeper
from sidecar.metrics import Metrics
from sidecar.policy.model import Policy
from sidecar.state.base import QuotaStore, new_lease_id
from sidecar.state.memory import MemoryQuotaStore


class SharedReads:
    store: QuotaStore
    metrics: Metrics
    leases: LeaseKeeper
    local_leases: dict[str, LeaseRef]
    deferrer: Deferrer | None
    model_pod: str | None
    # The last in-flight counts read from the store, and this replica's own then.
    _in_flight_read: tuple[dict[tuple[str, str | None], int], Counter[tuple[str, str]]]

    local: MemoryQuotaStore  # the degraded mode's store
    clock: Callable[[], float]
    local_spend: LocalSpend  # what it admitted, owed to the store
    replicas_seen: int

    @property
    def policy(self) -> Policy:
        raise NotImplementedError

    def replicas(self) -> int:
        """How many replicas share the limits: the policy's `replicas`, else the heartbeats'."""
        return self.policy.replicas or self.replicas_seen

    async def _acquire_locally(
        self, check: QuotaCheck, owed: tuple[BucketCheck, ...]
    ) -> QuotaResult:
        """Take `check` (already this replica's share) in the local store; if it is taken,
        the store is owed `owed` (core.degraded)."""
        if check.lease_id is None:
            check = replace(check, lease_id=new_lease_id())
        result = await self.local.acquire(check)
        if result.lease_id is not None:
            self.local_leases[result.lease_id] = LeaseRef.of(check, result.lease_id)
        if result.allowed:
            self.local_spend.spent(check.tenant, owed, self.clock())
        return result

    def _spent(self, tenant: str, buckets: Sequence[BucketCheck]) -> None:
        """A charge (or refund) the shared store took, recorded at this replica's share in the
        local store, so that degraded mode starts from it (core.degraded)."""
        n = self.replicas()
        for bucket in buckets:
            self.local.record(tenant, bucket.name, bucket.cost, *share_of(bucket, n))

    async def _charge(self, tenant: str, buckets: Sequence[BucketCheck]) -> None:
        """Charge the shared store (raises StateUnavailable), and record it locally."""
        await self.store.charge(tenant, buckets)
        self._spent(tenant, buckets)

    async def heartbeat(self, replica: str, ttl_s: float) -> bool:
        """Say this replica is alive; remember the live count. Also renews local leases (the
        store's `LeaseKeeper` never sees them). False when the store did not answer."""
        local: dict[str, list[LeaseRef]] = {}
        for lease in self.local_leases.values():
            local.setdefault(lease.tenant, []).append(lease)
        for tenant, leases in local.items():
            held = await self.local.renew(tenant, leases, self.policy.lease_ttl_s)
            for lease in leases:
                if lease.lease_id not in held:
                    self.local_leases.pop(lease.lease_id, None)
        self.metrics.local_leases.set(len(self.local_leases))
        try:
            self.replicas_seen = max(1, await self.store.heartbeat(replica, ttl_s))
        except StateUnavailable:
            self.metrics.state_errors.labels("heartbeat").inc()
            return False
        finally:
            self.metrics.replicas.set(self.replicas())
        await self.settle_local_spend()
        return True

    async def settle_local_spend(self) -> None:
        """Charge the store what the local share admitted while it was down (one call per
        tenant, `core.degraded`); what a failed call did not settle stays owed."""
        now = self.clock()
        owed = self.local_spend.take(now)
        for i, (tenant, buckets) in enumerate(owed):
            try:
                await self.store.charge(tenant, buckets)
            except StateUnavailable:
                self.metrics.state_errors.labels("charge").inc()
                for later, unsettled in owed[i:]:
                    self.local_spend.spent(later, unsettled, now)
                return

    async def refresh_in_flight(self) -> bool:
        """Copy the store's in-flight counts into the gauge; False when the store failed (the
        gauges keep older values: `admin.staleness` says how old).

        The counts live in the shared store because a lease granted by one replica may be
        released through another; every replica therefore reports the same, global number.
        Every tenant x class is read in one call (one pipelined round trip), not one each:
        hundreds of tenants on every replica, every second, would otherwise be that many
        round trips per replica per second.
        """
        pairs = [
            (tenant.name, klass)
            for tenant in self.policy.tenants.values()
            for klass in sorted(tenant.allowed_classes)
        ]
        try:
            counts = await self.store.in_flight_many(pairs)
        except StateUnavailable:
            self.metrics.state_errors.labels("in_flight").inc()
            self._estimate_in_flight(pairs)
            return False
        self._in_flight_read = (dict(counts), self._own_in_flight())
        for tenant_name, klass in pairs:
            self.metrics.in_flight.labels(tenant_name, klass).set(counts[(tenant_name, klass)])
        return True

    def _own_in_flight(self) -> Counter[tuple[str, str]]:
        """This replica's running requests with a lease, in the store or local (degraded)."""
        own = self.leases.running_by_class()
        own.update((lease.tenant, lease.klass) for lease in self.local_leases.values())
        return own

    def _estimate_in_flight(self, pairs: list[tuple[str, str]]) -> None:
        """Store down: the gauges move with what this replica sees, the last count read plus
        this replica's requests started minus those ended since (a lower bound of the truth
        when others admit meanwhile; `qos_state_stale_seconds` says how old the rest is)."""
        read, own_then = self._in_flight_read
        own_now = self._own_in_flight()
        for pair in pairs:
            estimate = read.get(pair, 0) + own_now[pair] - own_then[pair]
            self.metrics.in_flight.labels(*pair).set(max(0, estimate))

    async def refresh_model_in_flight(self, models: Iterable[str]) -> None:
        """Read every model's in-flight count from the store (this pod's, or the fleet's: see
        `model_pod`) into the deferrer and the gauge, in one call. Store down: they stay."""
        started = None if self.deferrer is None else self.deferrer.in_flight_counts.read_starts()
        models = list(models)
        if self.deferrer is not None:  # what this replica holds per model: no store read
            for model in models:
                queue = self.deferrer.queue.queue(model)
                self.metrics.model_held.labels(model).set(0 if queue is None else len(queue))
                self._publish_limits(self.deferrer, model)
        try:
            counts = await self.store.model_in_flight_many(list(models), self.model_pod)
        except StateUnavailable:
            self.metrics.state_errors.labels("model_in_flight").inc()
            return
        for model, count in counts.items():
            self.metrics.model_in_flight.labels(model).set(count)
        if self.deferrer is not None:
            self.deferrer.set_in_flight(counts, started)
            for model in counts:
                for klass, (cap, binding) in self.deferrer.adaptive_caps(model).items():
                    self.metrics.adaptive_cap.labels(model, klass).set(cap)
                    self.metrics.adaptive_cap_binding.labels(model, klass).set(binding)

    def _publish_limits(self, deferrer: Deferrer, model: str) -> None:
        """`qos_lateness_limit` of each class on `model`: set where one holds, else removed."""
        limits = deferrer.lateness.of(model, deferrer.clock())
        published = deferrer.limits_published
        for klass in published.get(model, set()) - set(limits):
            self.metrics.lateness_limit.remove(model, klass)
        for klass, depth in limits.items():
            self.metrics.lateness_limit.labels(model, klass).set(depth)
        published[model] = set(limits)

    async def exchange_fleet(self, replica: str, ttl_s: float) -> bool:
        """Gateway topology: share what this replica holds and its fairness counter changes
        with the other replicas, and take theirs (`core.fleet`). False when the store failed
        (the changes are sent with the next exchange; the last view stays)."""
        deferrer = self.deferrer
        if deferrer is None or not deferrer.shared:
            return True
        fairness = deferrer.queue.fairness
        ops = fairness.take_ops()
        summary = encode_summary(
            with_in_transit(deferrer.queue.summary(), deferrer.in_flight_counts.pending())
        )
        try:
            state = await self.store.fleet_exchange(replica, ttl_s, summary, ops)
        except StateUnavailable:
            self.metrics.state_errors.labels("fleet").inc()
            fairness.restore_ops(ops)
            # Other replicas' holds are unknown now: reserving room for holds that may be
            # long gone would idle it. Each replica orders its own until the store is back.
            deferrer.forget_fleet()
            return False
        deferrer.adopt_fleet(replica, state.others, state.counters)
        return True
