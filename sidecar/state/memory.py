"""`MemoryQuotaStore`: the quota store for a single replica without Redis.

Same rules as `sidecar.state.base`. Atomicity comes from asyncio: no method awaits anything,
so each runs to completion before another task can touch the state (not thread-safe, and not
meant to be). Time comes from the injected `clock`, so tests move time instead of sleeping.

Memory stays bounded: a bucket entry is dropped once its bucket is full again, a tenant's (or a
model's) lease table once it holds no lease. Buckets nobody touches again linger, one float
each; their number is bounded by the policy (tenants x buckets).

A lease of a model is added to the model's table in the same step as to the tenant's, with the
same expiry: unlike Redis (see `sidecar.state.base`), the two never disagree.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from sidecar.core.fleet import CounterOp
from sidecar.core.gcra import recorded_tat, step_buckets
from sidecar.core.types import BucketCheck, LeaseRef, LimitKind, QuotaCheck, QuotaResult
from sidecar.errors import StateUnavailable
from sidecar.state.base import (
    DEFAULT_TOMBSTONE_S,
    FleetState,
    new_lease_id,
    validate_buckets_only,
    validate_charge,
    validate_check,
    validate_lease,
    validate_model,
    validate_pod,
    validate_tenant,
)


@dataclass(slots=True)
class _TenantLeases:
    by_id: dict[str, tuple[str, float]] = field(default_factory=dict)  # id -> (class, expiry)
    class_counts: dict[str, int] = field(default_factory=dict)
    # No lease expires before this. Releases leave it as is (it stays a lower bound), so the
    # full scan in `prune` runs about once per lease TTL, not on every call.
    next_expiry: float = math.inf

    def prune(self, now: float) -> None:
        if now < self.next_expiry:
            return
        self.by_id = {i: (k, exp) for i, (k, exp) in self.by_id.items() if exp > now}
        self.class_counts = {}
        for klass, _ in self.by_id.values():
            self.class_counts[klass] = self.class_counts.get(klass, 0) + 1
        self.next_expiry = min((exp for _, exp in self.by_id.values()), default=math.inf)

    def add(self, lease_id: str, klass: str, expiry: float) -> None:
        self.by_id[lease_id] = (klass, expiry)
        self.class_counts[klass] = self.class_counts.get(klass, 0) + 1
        self.next_expiry = min(self.next_expiry, expiry)

    def remove(self, lease_id: str) -> tuple[str, float] | None:
        held = self.by_id.pop(lease_id, None)
        if held is not None:
            left = self.class_counts[held[0]] - 1
            if left:
                self.class_counts[held[0]] = left
            else:
                del self.class_counts[held[0]]
        return held


@dataclass(slots=True)
class _ModelLeases:
    expiry_by_id: dict[str, float] = field(default_factory=dict)
    next_expiry: float = math.inf  # a lower bound, as in `_TenantLeases`

    def prune(self, now: float) -> None:
        if now < self.next_expiry:
            return
        self.expiry_by_id = {i: exp for i, exp in self.expiry_by_id.items() if exp > now}
        self.next_expiry = min(self.expiry_by_id.values(), default=math.inf)

    def add(self, lease_id: str, expiry: float) -> None:
        self.expiry_by_id[lease_id] = expiry
        self.next_expiry = min(self.next_expiry, expiry)


def _tombstone_key(tenant: str, lease_id: str) -> str:
    """One string per (tenant, lease id), the tenant's length first so that no two pairs
    share one."""
    return f"{len(tenant)}:{tenant}{lease_id}"


def _model_tombstone_key(model_set: tuple[str, str | None], lease_id: str) -> str:
    """A removed model entry's tombstone: apart from every tenant's (`_tombstone_key` starts
    with a digit), one string per (model, pod, lease id)."""
    model, pod = model_set
    pod_part = "" if pod is None else f"{len(pod)}:{pod}"
    return f"m{len(model)}:{model}{pod_part}/{lease_id}"


class MemoryQuotaStore:
    """Quota state in this process. `clock` returns seconds; only differences matter.

    `answers_inline`: no call suspends (nothing here awaits), so the service calls `acquire`
    directly rather than batching it (`AdmissionService._acquire`). A subclass whose calls
    wait on something sets it False, and is then batched and shielded like a remote store."""

    answers_inline: ClassVar[bool] = True

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tats: dict[tuple[str, str], float] = {}  # (tenant, bucket) -> TAT
        self._leases: dict[str, _TenantLeases] = {}
        # (model, pod or None for the fleet's count) -> its leases: `keys.build_model_key`'s parts
        self._model_leases: dict[tuple[str, str | None], _ModelLeases] = {}
        # Released ids, (tenant, id) as one string -> expiry, and the ids in release order:
        # tombstones mostly share one TTL, so the oldest expire first and pruning from the
        # left keeps the table to about a TTL's worth of releases.
        # Both hold strings and floats only (`_tombstone_key`), which the garbage collector does
        # not track: a full collection walks neither, however many a lease TTL holds (with
        # tuples, at 3,000 releases a second and a 30 s TTL, each one walked 90,000 entries
        # twice: pauses of 2 to 11 ms, growing with the table).
        self._tombstones: dict[str, float] = {}
        self._tombstone_order: deque[str] = deque()
        # fleet_exchange: replica -> (expiry, summary); (rank, tenant) -> counter
        self._fleet_waiting: dict[str, tuple[float, str]] = {}
        self._fleet_counters: dict[tuple[int, str], float] = {}

    async def acquire(self, check: QuotaCheck) -> QuotaResult:
        return self._evaluate(check, take=True)

    async def peek(self, check: QuotaCheck) -> QuotaResult:
        return self._evaluate(check, take=False)

    async def release(self, lease: LeaseRef, *, tombstone_s: float = DEFAULT_TOMBSTONE_S) -> bool:
        validate_lease(lease)
        now = self._clock()
        self._prune_tombstones(now)
        model_held = self._model_removed(lease, now, tombstone_s)
        if lease.model_only:  # its model's entry is all it holds
            return model_held
        self._tombstone(_tombstone_key(lease.tenant, lease.lease_id), now + tombstone_s)
        leases = self._leases.get(lease.tenant)
        if leases is None:
            return False
        held = leases.remove(lease.lease_id)
        if not leases.by_id:
            del self._leases[lease.tenant]
        # An expired lease no longer counted, so releasing it frees nothing.
        return held is not None and held[1] > now

    def _tombstone(self, key: str, ends: float) -> None:
        self._tombstones[key] = ends
        self._tombstone_order.append(key)

    def _model_removed(self, lease: LeaseRef, now: float, tombstone_s: float) -> bool:
        """`lease`'s entry taken out of its model's set, and tombstoned there (a later add of
        it adds nothing, as model_lease.lua does): was it held (there, unexpired)?"""
        if lease.model is None:
            return False
        model_set = (lease.model, lease.model_pod)
        self._tombstone(_model_tombstone_key(model_set, lease.lease_id), now + tombstone_s)
        model_leases = self._model_leases.get(model_set)
        if model_leases is None:
            return False
        expiry = model_leases.expiry_by_id.pop(lease.lease_id, None)
        if not model_leases.expiry_by_id:
            del self._model_leases[model_set]
        return expiry is not None and expiry > now

    async def renew(self, tenant: str, leases: Sequence[LeaseRef], ttl_s: float) -> set[str]:
        validate_tenant(tenant)
        now = self._clock()
        held = self._live_leases(tenant, now)
        renewed: set[str] = set()
        for lease in leases:
            if lease.model_only:  # renewed in its model's set, or gone
                model_leases = self._live_model_leases((lease.model or "", lease.model_pod), now)
                if model_leases is not None and lease.lease_id in model_leases.expiry_by_id:
                    model_leases.expiry_by_id[lease.lease_id] = now + ttl_s
                    renewed.add(lease.lease_id)
                continue
            entry = held.by_id.get(lease.lease_id) if held is not None else None
            if held is None or entry is None:
                continue  # released or expired (pruned above): it stays gone
            held.by_id[lease.lease_id] = (entry[0], now + ttl_s)
            renewed.add(lease.lease_id)
            model_leases = self._model_leases.get((lease.model or "", lease.model_pod))
            if model_leases is not None and lease.lease_id in model_leases.expiry_by_id:
                model_leases.prune(now)
                if lease.lease_id in model_leases.expiry_by_id:
                    model_leases.expiry_by_id[lease.lease_id] = now + ttl_s
        return renewed

    def _prune_tombstones(self, now: float) -> None:
        """From the oldest release on, while expired. An id released again keeps its newest
        expiry (and a second place in the order): pruning waits for it, one TTL at most."""
        order, tombstones = self._tombstone_order, self._tombstones
        while order:
            expiry = tombstones.get(order[0])
            if expiry is not None and expiry > now:
                return
            key = order.popleft()
            if expiry is not None:
                del tombstones[key]

    def _lease_id_used(
        self, tenant: str, lease_id: str | None, leases: _TenantLeases | None
    ) -> bool:
        if lease_id is None:
            return False  # a random id is made below: new by construction
        self._prune_tombstones(self._clock())
        return _tombstone_key(tenant, lease_id) in self._tombstones or (
            leases is not None and lease_id in leases.by_id
        )

    async def charge(self, tenant: str, buckets: Sequence[BucketCheck]) -> None:
        validate_charge(tenant, buckets)
        now = self._clock()
        for bucket in buckets:
            key = (tenant, bucket.name)
            tat = max(self._tats.get(key, now), now)
            # A refund moves the TAT back, but never before now: a bucket holds at most `burst`.
            self._store_tat(key, max(tat + bucket.cost / bucket.rate_per_s, now), now)

    def record(self, tenant: str, name: str, cost: float, rate_per_s: float, burst: float) -> None:
        """Charge (or, negative, refund) bucket `name` without a check, at most down to empty:
        what was spent elsewhere (the shared store, which checked the arguments), so that a
        later check here starts from it (`core.degraded`). Never a debt: a replica that spent
        faster than its share refills from empty, as a fresh one would from full."""
        now, key = self._clock(), (tenant, name)
        tat = recorded_tat(self._tats.get(key, now), now, cost, rate_per_s, burst)
        self._store_tat(key, tat, now)

    async def in_flight(self, tenant: str, klass: str | None) -> int:
        validate_tenant(tenant)
        leases = self._live_leases(tenant, self._clock())
        if leases is None:
            return 0
        return len(leases.by_id) if klass is None else leases.class_counts.get(klass, 0)

    async def count_for_model(self, lease: LeaseRef, ttl_s: float) -> None:
        if not lease.model:
            raise ValueError("count_for_model needs a lease with a model")
        now = self._clock()
        self._count_model((lease.model, lease.model_pod), lease.lease_id, now + ttl_s, now)

    async def count_for_model_many(self, leases: Sequence[LeaseRef], ttl_s: float) -> None:
        for lease in leases:
            await self.count_for_model(lease, ttl_s)

    def _count_model(
        self, model_set: tuple[str, str | None], lease_id: str, expiry: float, now: float
    ) -> None:
        ended = self._tombstones.get(_model_tombstone_key(model_set, lease_id))
        if ended is not None and ended > now:  # removed already: its request has ended
            return
        model_leases = self._model_leases.setdefault(model_set, _ModelLeases())
        model_leases.prune(now)  # as the Redis script does: the table holds no dead leases
        model_leases.add(lease_id, expiry)

    async def model_in_flight(self, model: str, pod: str | None = None) -> int:
        validate_model(model)
        validate_pod(pod)
        leases = self._live_model_leases((model, pod), self._clock())
        return 0 if leases is None else len(leases.expiry_by_id)

    async def heartbeat(self, replica: str, ttl_s: float) -> int:
        return 1  # a memory store serves this replica alone

    async def acquire_many(self, checks: Sequence[QuotaCheck]) -> list[QuotaResult | None]:
        # Through `acquire`, so that a store built on this one answers the same either way;
        # one after the other (a task each, as `gather` makes, cost more than the acquire).
        results: list[QuotaResult | None] = []
        failed: StateUnavailable | None = None
        for check in checks:
            try:
                results.append(await self.acquire(check))
            except StateUnavailable as exc:
                results.append(None)
                failed = exc
        if failed is not None and all(result is None for result in results):
            raise failed  # the whole call failed
        return results

    async def release_many(
        self, leases: Sequence[LeaseRef], *, tombstone_s: float = DEFAULT_TOMBSTONE_S
    ) -> list[bool | None]:
        return [await self.release(lease, tombstone_s=tombstone_s) for lease in leases]

    async def fleet_exchange(
        self, replica: str, ttl_s: float, summary: str, ops: Sequence[CounterOp]
    ) -> FleetState:
        """As fleet.lua does: replicas sharing this store (in one process) see each other."""
        now = self._clock()
        if summary:
            self._fleet_waiting[replica] = (now + ttl_s, summary)
        else:
            self._fleet_waiting.pop(replica, None)
        for kind, rank, tenant, value in ops:
            current = self._fleet_counters.get((rank, tenant), 0.0)
            self._fleet_counters[(rank, tenant)] = (
                current + value if kind == "+" else max(current, value)
            )
        for name, (expiry, _) in list(self._fleet_waiting.items()):
            if expiry < now:
                del self._fleet_waiting[name]
        others = [(n, text) for n, (_, text) in self._fleet_waiting.items() if n != replica]
        return FleetState(others, dict(self._fleet_counters))

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def take_buckets(self, check: QuotaCheck) -> QuotaResult:
        validate_buckets_only(check)
        return self._evaluate(check, take=True, lease=False)

    def _evaluate(self, check: QuotaCheck, *, take: bool, lease: bool = True) -> QuotaResult:
        validate_check(check)
        now = self._clock()
        leases = self._live_leases(check.tenant, now)
        in_flight = len(leases.by_id) if leases is not None else 0
        class_in_flight = leases.class_counts.get(check.klass, 0) if leases is not None else 0

        def denied(kind: LimitKind, bucket: str | None = None, retry: float = 0.0) -> QuotaResult:
            return QuotaResult(
                allowed=False,
                denied_by=kind,
                denied_bucket=bucket,
                retry_after_s=retry,
                in_flight=in_flight,
                class_in_flight=class_in_flight,
            )

        if take and lease and self._lease_id_used(check.tenant, check.lease_id, leases):
            return denied(LimitKind.LEASE_ID_USED)
        if (
            check.max_class_concurrency is not None
            and class_in_flight >= check.max_class_concurrency
        ):
            return denied(LimitKind.CLASS_CONCURRENCY)
        if check.max_concurrency is not None and in_flight >= check.max_concurrency:
            return denied(LimitKind.CONCURRENCY)

        tats = {b.name: self._tats[(check.tenant, b.name)] for b in check.buckets
                if (check.tenant, b.name) in self._tats}  # fmt: skip
        step = step_buckets(check.buckets, tats, now)
        if step.denied is not None:
            return denied(LimitKind.BUCKET, step.denied[1], step.denied[0])
        if not take:
            return QuotaResult(allowed=True, in_flight=in_flight, class_in_flight=class_in_flight)

        for name, tat in step.new_tats:
            self._store_tat((check.tenant, name), tat, now)
        if not lease:
            return QuotaResult(allowed=True, in_flight=in_flight, class_in_flight=class_in_flight)
        lease_id = check.lease_id or new_lease_id()
        expiry = now + check.lease_ttl_s
        if leases is None:  # built only when the tenant holds none (setdefault built one a call)
            leases = self._leases[check.tenant] = _TenantLeases()
        leases.add(lease_id, check.klass, expiry)
        if check.model is not None and check.count_model_now:
            self._count_model((check.model, check.model_pod), lease_id, expiry, now)
        return QuotaResult(
            allowed=True,
            lease_id=lease_id,
            in_flight=in_flight + 1,
            class_in_flight=class_in_flight + 1,
        )

    def _live_leases(self, tenant: str, now: float) -> _TenantLeases | None:
        leases = self._leases.get(tenant)
        if leases is not None:
            leases.prune(now)
            if not leases.by_id:
                del self._leases[tenant]
                return None
        return leases

    def _live_model_leases(
        self, model_set: tuple[str, str | None], now: float
    ) -> _ModelLeases | None:
        leases = self._model_leases.get(model_set)
        if leases is not None:
            leases.prune(now)
            if not leases.expiry_by_id:
                del self._model_leases[model_set]
                return None
        return leases

    def _store_tat(self, key: tuple[str, str], tat: float, now: float) -> None:
        if tat > now:
            self._tats[key] = tat
        else:
            # Full again: forget it, as the Redis key expires (a missing TAT reads as `now`).
            self._tats.pop(key, None)

    async def in_flight_many(
        self, pairs: Sequence[tuple[str, str | None]]
    ) -> dict[tuple[str, str | None], int]:
        # The single reads never yield (see the module comment), so these are one step here;
        # Redis reads them in one pipeline, each count on its own.
        return {(tenant, klass): await self.in_flight(tenant, klass) for tenant, klass in pairs}

    async def model_in_flight_many(
        self, models: Sequence[str], pod: str | None = None
    ) -> dict[str, int]:
        return {model: await self.model_in_flight(model, pod) for model in models}
