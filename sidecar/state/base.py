"""The quota store interface, and the rules every store keeps.

Rules (the contract tests in tests/test_state_contract.py run both stores through them):
- `acquire` is atomic: it drops expired leases, then checks, in this order, the tenant+class
  in-flight count against `max_class_concurrency`, the tenant's in-flight count against
  `max_concurrency`, and every GCRA bucket (see `sidecar.core.gcra`). Only if all of them allow
  does it charge every bucket and create a lease, counted for the tenant and for the tenant+class.
  Otherwise it changes nothing.
- A denial names the first failing limit in the order above. Among buckets it names the one
  with the largest `retry_after_s`, so that waiting that long satisfies every bucket (for the
  cost asked now). Concurrency denials carry `retry_after_s = 0.0`: no store can know when a
  lease will be released, so the core picks the Retry-After from policy.
- A cost of 0 always passes a bucket. A cost above a bucket's `burst` can never pass: the store
  denies it with `retry_after_s = burst / rate_per_s` (the time to refill from empty), which is
  a finite, honest upper bound rather than "never"; the core may treat such a cost as malformed.
- `peek` evaluates exactly like `acquire` and changes nothing, in no model's set either.
- Per model: a lease taken for a check with a `model` is also counted in that model's lease
  set (every tenant's leases of the model), with the same `lease_ttl_s`. The set is the
  fleet's (`model_pod` None: gateway topology) or one pod's (`model_pod`: pod topology, each
  pod counts what its own Triton runs); two pods' sets of one model are separate. `release` of
  a `LeaseRef` with a `model` removes it there too; the store finds the model set through
  `lease.model` and `lease.model_pod` alone (so from any replica), and a ref without them frees
  the tenant's lease and leaves the model's entry to its TTL. `model_in_flight(model, pod)`
  counts the unexpired leases of one set. A denied acquire, a
  peek, a check without a model and one with `count_model_now=False` touch no model's count;
  `count_for_model` counts such a lease later (releasing it before is harmless). The model
  count is a load signal (see `sidecar.deferral`); `acquire` checks no limit against it.
- A model-only lease (`LeaseRef.model_only`: leased mode's lease of a counted request, whose
  buckets were spent from a slice) is held in no tenant set, only as its model's entry, which
  `count_for_model` writes. `release` removes that entry and says whether it was held there
  (so a second release frees nothing); `renew` renews it there or says it is gone. The entry
  is all it holds, so a failure of that call is the release's (or the renewal's) failure,
  raised as StateUnavailable (a release is then owed).
- Every removal from a model's set (any lease's release) leaves a tombstone of the id there
  for `tombstone_s`, and `count_for_model` of a tombstoned id adds nothing: a request whose
  end reached another replica before its admitting replica wrote its entry is not left
  counted (and, model-only, renewed by that replica) after it is gone.
- The model count is not atomic with the tenant's lease in Redis. A model's set has its own
  hash tag (`sidecar.state.keys`), so in Redis Cluster it lives in another slot than the
  tenant's keys and no Lua script can touch both. `acquire` takes the tenant's limits and lease
  in one script and, only once that allowed, adds the model entry with a second call; `release`
  removes the tenant's lease, then the model entry (even when the first call failed: the
  request has left the model either way). Both calls share the call's one deadline. The model
  entry's expiry is counted from the second call's server time (on its own server), so it
  outlives the tenant's lease by the gap between the calls. What can go wrong, and why each
  way is the safer one:
  - The second call fails (timeout, connection, server error): the acquire still returns its
    result and the release its answer (or the first call's error); the store logs and counts
    the failure but does not raise it. The tenant's lease is already taken: raising would
    refuse (or fail open) a request that holds quota and leak its lease, whose id would never
    reach the caller, for a whole TTL. The price is a model count one too low until that
    request completes (a missed add) or one too high until the entry's TTL (a missed
    removal). A call cut short by the deadline may still have run on the server; that is the
    same as if it had answered.
  - A crash between the two calls leaves a tenant lease without its model entry, or (in
    release) a model entry without its tenant lease. Both expire with the lease TTL.
  The memory store has one clock and no second call: it changes both in one step.
- A lease counts until it is released or its `lease_ttl_s` has passed, whichever comes first.
  The TTL is the safety net for completions that never arrive (a crashed replica, a lost
  access-log entry): a leaked lease costs a slot for at most one TTL. The TTL is short and the
  replica that admitted a request `renew`s its lease while the request runs; `renew` only
  extends leases that still exist (it never brings back a released or expired one), in the
  tenant's sets and in the models' sets, and says which ones are gone.
- A lease's id is the caller's (`QuotaCheck.lease_id`: the request's id), or random when it
  gives none. `release` leaves a tombstone of the id for `tombstone_s`; an `acquire` of an id
  that is tombstoned or still held takes nothing (no lease, no bucket, no model entry) and is
  denied with `LimitKind.LEASE_ID_USED`. So a release may be sent for a request whether or not
  its acquire ran, before or after it: an acquire the caller gave up on and the server ran late
  is undone by the release the caller queues for it.
- Time is the store's own clock: the Redis server's for Redis (one clock for all replicas), an
  injected clock for memory. Callers never pass time in.
- `heartbeat` counts the live replicas that share the store (each calls it every few
  seconds), for the degraded mode's share of each limit (`sidecar.core.degraded`).
- Stores raise `StateUnavailable` when the state cannot be read or written, and `ValueError`
  for arguments no policy could produce (see `validate_check`). Being over a limit is a
  `QuotaResult`, never an exception.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sidecar.core.fleet import CounterOp
from sidecar.core.types import BucketCheck, LeaseRef, QuotaCheck, QuotaResult

# How long a released id stays refused when the caller does not say: the default lease TTL.
DEFAULT_TOMBSTONE_S = 10.0


@dataclass(frozen=True, slots=True)
class FleetState:
    """What `fleet_exchange` reads: the other live replicas' (id, summary), and every
    tenant's fairness counter per band, (rank, tenant) -> counter."""

    others: list[tuple[str, str]]
    counters: dict[tuple[int, str], float]


class QuotaStore(Protocol):
    """Where quota state lives: buckets (GCRA TATs) and concurrency leases, per tenant."""

    async def acquire(self, check: QuotaCheck) -> QuotaResult:
        """Check every limit in `check` and, only if all allow, take them and hold a lease.
        Raises StateUnavailable."""
        ...

    async def take_buckets(self, check: QuotaCheck) -> QuotaResult:
        """Check every bucket of `check` and, only if all allow, charge them: `acquire`
        without the lease (leased mode's slices, `core.slices`). The check has no
        concurrency limit and counts no model (ValueError otherwise)."""
        ...

    async def peek(self, check: QuotaCheck) -> QuotaResult:
        """What `acquire` would answer now, without changing anything (`lease_id` is None).
        Raises StateUnavailable."""
        ...

    async def release(self, lease: LeaseRef, *, tombstone_s: float = DEFAULT_TOMBSTONE_S) -> bool:
        """Free a lease, and refuse its id to `acquire` for `tombstone_s`. True if it was held
        (not yet released or expired). Idempotent. Raises StateUnavailable."""
        ...

    async def acquire_many(self, checks: Sequence[QuotaCheck]) -> list[QuotaResult | None]:
        """`acquire` of each check (each with its lease id set), sent together: one round
        trip however many (on a cluster, one per node), each check atomic on its own. Per
        check its result, or None if its call failed (owe a release of its lease id).
        Raises StateUnavailable when the whole call failed."""
        ...

    async def release_many(
        self, leases: Sequence[LeaseRef], *, tombstone_s: float = DEFAULT_TOMBSTONE_S
    ) -> list[bool | None]:
        """`release` of each lease, sent together: one round trip however many (on a
        cluster, one per node). Per lease: True if it was held, False if not, None if its
        release failed (owe it). Raises StateUnavailable when the whole call failed."""
        ...

    async def renew(self, tenant: str, leases: Sequence[LeaseRef], ttl_s: float) -> set[str]:
        """Extend each of the tenant's `leases` that still exists to expire `ttl_s` from now,
        in its model's set too; the ids of those renewed (the others are gone: released or
        expired). One call for the tenant's sets, one per model (a failed model step is
        counted, as in `acquire`). Raises StateUnavailable."""
        ...

    async def charge(self, tenant: str, buckets: Sequence[BucketCheck]) -> None:
        """Add each bucket's `cost` to it without checking it (negative: refund, but never
        past a full bucket), e.g. to reconcile a token estimate with the real count. All of
        `buckets` move in one atomic step (one script call); none is an empty step.
        Raises StateUnavailable, or ValueError (see `validate_charge`)."""
        ...

    async def count_for_model(self, lease: LeaseRef, ttl_s: float) -> None:
        """Count an already held lease for `lease.model` from now on, expiring after `ttl_s`:
        for a request acquired without a model (held before it goes to Triton) that is now
        sent. Never raises StateUnavailable (like the model step of `acquire`); ValueError for
        a lease without a model."""
        ...

    async def count_for_model_many(self, leases: Sequence[LeaseRef], ttl_s: float) -> None:
        """`count_for_model` of each lease, sent together (one round trip; on a cluster, one
        per node). Never raises StateUnavailable; ValueError for a lease without a model."""
        ...

    async def in_flight(self, tenant: str, klass: str | None) -> int:
        """Unexpired leases of the tenant, or of the tenant in one class.
        Raises StateUnavailable."""
        ...

    async def model_in_flight(self, model: str, pod: str | None = None) -> int:
        """Unexpired leases of the model, of every tenant (see the per-model rules), in `pod`'s
        count of it, or (None) in the fleet's. Raises StateUnavailable, or ValueError for an
        empty model or pod."""
        ...

    async def heartbeat(self, replica: str, ttl_s: float) -> int:
        """Say that `replica` is alive for `ttl_s` more seconds; the number of live replicas,
        this one included (a store that only this replica uses answers 1).
        Raises StateUnavailable."""
        ...

    async def fleet_exchange(
        self, replica: str, ttl_s: float, summary: str, ops: Sequence[CounterOp]
    ) -> FleetState:
        """Store what `replica` holds (`summary`, from `core.fleet.encode_summary`; it counts
        for `ttl_s`), apply its fairness counter `ops`, and read what the other live
        replicas hold and every counter, in one atomic step (one call).
        Raises StateUnavailable."""
        ...

    async def ping(self) -> None:
        """Return if the store answers; raises StateUnavailable otherwise."""
        ...

    async def close(self) -> None:
        """Release connections. The store is not used afterwards."""
        ...

    async def in_flight_many(
        self, pairs: Sequence[tuple[str, str | None]]
    ) -> dict[tuple[str, str | None], int]:
        """`in_flight` of each (tenant, class or None) pair, read together: one round trip
        for them all (on a cluster, one per node), for the periodic refresh of every
        tenant's gauges. Raises StateUnavailable (nothing is returned then), or ValueError
        for an empty tenant."""
        ...

    async def model_in_flight_many(
        self, models: Sequence[str], pod: str | None = None
    ) -> dict[str, int]:
        """`model_in_flight` of each model (in `pod`'s count), read together like
        `in_flight_many`. Raises StateUnavailable, or ValueError for an empty model or pod."""
        ...


def new_lease_id() -> str:
    """An opaque random lease id: 16 URL-safe characters (96 bits), header-safe as is.

    Made by the client, not inside Lua: Redis seeds `math.random` identically for every script
    run (scripts must be deterministic for replication), so ids made there would repeat.
    """
    return secrets.token_urlsafe(12)


def validate_tenant(tenant: str) -> None:
    """Raise ValueError for an empty tenant (it has no hash tag; see `sidecar.state.keys`)."""
    if not tenant:
        raise ValueError("tenant must not be empty")


def validate_model(model: str | None) -> None:
    """Raise ValueError for an empty model (None is fine: no model)."""
    if model is not None and not model:
        raise ValueError("model must not be empty (None for no model)")


def validate_pod(pod: str | None) -> None:
    """Raise ValueError for an empty pod (None is fine: the fleet's count)."""
    if pod is not None and not pod:
        raise ValueError("pod must not be empty (None for the fleet's count)")


def validate_lease(lease: LeaseRef) -> None:
    """Raise ValueError for a lease no store could hold: an empty tenant, model or pod, or a
    model-only lease without a model (the model's set is all it holds)."""
    validate_tenant(lease.tenant)
    validate_model(lease.model)
    validate_pod(lease.model_pod)
    if lease.model_only and lease.model is None:
        raise ValueError("a model-only lease needs a model")


def validate_bucket(bucket: BucketCheck, *, allow_negative_cost: bool = False) -> None:
    """Raise ValueError for a bucket no validated policy can produce."""
    if not (math.isfinite(bucket.rate_per_s) and bucket.rate_per_s > 0):
        raise ValueError(f"bucket {bucket.name!r}: rate_per_s must be > 0, not {bucket.rate_per_s}")
    if not (math.isfinite(bucket.burst) and bucket.burst > 0):
        raise ValueError(f"bucket {bucket.name!r}: burst must be > 0, not {bucket.burst}")
    if not math.isfinite(bucket.cost) or (bucket.cost < 0 and not allow_negative_cost):
        raise ValueError(f"bucket {bucket.name!r}: invalid cost {bucket.cost}")


def validate_charge(tenant: str, buckets: Sequence[BucketCheck]) -> None:
    """Raise ValueError for a charge no caller should make: an empty tenant, an invalid bucket
    (a negative cost is a refund and fine), or one bucket named twice (the two steps would be
    clamped one after the other, not as their sum)."""
    validate_tenant(tenant)
    for bucket in buckets:
        validate_bucket(bucket, allow_negative_cost=True)
    _validate_unique(buckets)


def _validate_unique(buckets: Sequence[BucketCheck]) -> None:
    if len(buckets) > 1 and len({b.name for b in buckets}) < len(buckets):
        # Two entries of one bucket would share a key and move it twice.
        raise ValueError("bucket names must be unique within a check or charge")


def validate_buckets_only(check: QuotaCheck) -> None:
    """`validate_check`, for `take_buckets`: a check with a concurrency limit, or naming a
    model to count, needs a lease, which `take_buckets` does not take."""
    validate_check(check)
    if check.max_concurrency is not None or check.max_class_concurrency is not None:
        raise ValueError("take_buckets takes no lease: the check must have no concurrency limit")
    if check.model is not None:
        raise ValueError("take_buckets takes no lease: the check must count no model")


def validate_check(check: QuotaCheck) -> None:
    """Raise ValueError for a check no validated policy can produce: both stores refuse the
    same inputs, rather than each doing something different with them (a zero rate divides by
    zero; a negative cost in `acquire` would be an unchecked refund; use `charge` for that)."""
    validate_tenant(check.tenant)
    validate_model(check.model)
    validate_pod(check.model_pod)
    if not (math.isfinite(check.lease_ttl_s) and check.lease_ttl_s > 0):
        raise ValueError(f"lease_ttl_s must be > 0, not {check.lease_ttl_s}")
    for limit in (check.max_concurrency, check.max_class_concurrency):
        if limit is not None and limit < 0:
            raise ValueError(f"concurrency limits must be >= 0, not {limit}")
    for bucket in check.buckets:
        validate_bucket(bucket)
    _validate_unique(check.buckets)
