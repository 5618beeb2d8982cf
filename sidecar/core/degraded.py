"""Which limits apply while the shared quota store is unavailable (`on_state_error:
local_share`).

Rules:
- Each replica then enforces its share of every limit of the request's check, on its own, in
  memory: the limit divided by the number of live replicas `replicas` (from their heartbeats
  in the store, remembered from before the outage, or the policy's `replicas`). With the
  traffic spread over the replicas, together they admit about what the shared store would.
- A bucket's rate and burst are both divided (`share_of`). The burst stays at least the
  request's cost (and at least 1), or a request that fits the real bucket could never pass a
  small share.
- A bucket share starts from what this replica already spent, not from a full bucket: a
  store stall must not hand every tenant a fresh burst on top of what it used. While the
  store answers, each charge this replica makes there (and each refund) is made again at its
  share in the local store, at most down to empty (`share_of` gives the shares; the service
  records them).
- A concurrency limit is divided and rounded down, but stays at least 1: a replica with a
  share of less than one request still runs one at a time rather than none. With more
  replicas than the limit, the fleet may then run up to one request per replica. The share
  counts the leases taken locally only: this replica cannot tell which of those it took
  through the store still run (a completion may reach another replica or worker, and it
  learns of that at its next renewal, which the outage stops). So while they run, a tenant
  may have up to its limit plus the replicas' shares in flight; they end as their requests
  do (or with the lease TTL).
- Everything else (tenant, class, cost, lease id, TTL, model) is the check's own.
- What the local share admitted is owed to the store (`LocalSpend`): once it answers again,
  each tenant's bucket units spent here during the outage (less what was given back, and
  less what the bucket would have refilled since each was spent) are charged there, in one
  call per tenant, so that the store's buckets, which refilled all along, do not hand out
  the outage's units a second time. A charge that fails stays owed for the next try.
- `replicas` below 1 counts as 1: a count never read means this replica is alone, as far as
  it knows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from sidecar.core.decide import Admission
from sidecar.core.types import BucketCheck, QuotaCheck


def share_of(bucket: BucketCheck, replicas: int) -> tuple[float, float]:
    """This replica's share of `bucket`: its (rate, burst) over `replicas`."""
    n = max(1, replicas)
    if n == 1:
        return bucket.rate_per_s, bucket.burst
    return bucket.rate_per_s / n, max(bucket.burst / n, bucket.cost, 1.0)


def share_buckets(buckets: Sequence[BucketCheck], replicas: int) -> tuple[BucketCheck, ...]:
    """This replica's share of each bucket."""
    if max(1, replicas) == 1:
        return tuple(buckets)
    shares = ((b, share_of(b, replicas)) for b in buckets)
    return tuple(replace(b, rate_per_s=rate, burst=burst) for b, (rate, burst) in shares)


def local_share(check: QuotaCheck, replicas: int) -> QuotaCheck:
    """`check` with each limit divided by `replicas` (see module rules)."""
    n = max(1, replicas)
    if n == 1:
        return check
    return replace(
        check,
        buckets=share_buckets(check.buckets, n),
        max_concurrency=_share(check.max_concurrency, n),
        max_class_concurrency=_share(check.max_class_concurrency, n),
    )


def degrade(admission: Admission, replicas: int) -> Admission:
    """`admission` checked against this replica's local share, said in its trace."""
    n = max(1, replicas)
    why = (
        f"quota store unavailable; class {admission.klass.name!r} takes its local share "
        f"(1/{n} of each limit, {n} live replica{'s' if n != 1 else ''})"
    )
    return admission.traced(why, local_share(admission.check, n))


def _share(limit: int | None, replicas: int) -> int | None:
    if limit is None or limit == 0:
        return limit
    return max(1, limit // replicas)


class LocalSpend:
    """Bucket units the local share admitted, per tenant and bucket, not yet charged to the
    store (module rules). Kept per bucket as a GCRA TAT at the store bucket's own rate: what
    was spent no faster than the bucket refills is owed no more by the time it is settled,
    as the store would have counted it had it seen each admit when it happened; only what
    ran ahead of the refill is charged (at most a burst).

    Exact when this replica alone spent the tenant's units. When several spent at once, each
    charges only what ran ahead of the whole bucket's refill, so the store is charged at most
    what the fleet owed, never more: no tenant gets less than its policy because of it, and
    what is not charged is over-admitted as it was before settling existed."""

    def __init__(self) -> None:
        self._tats: dict[str, dict[str, tuple[BucketCheck, float]]] = {}

    def spent(self, tenant: str, buckets: Sequence[BucketCheck], now: float) -> None:
        """`buckets` (the store's, with the cost taken) were spent locally at `now`."""
        by_name = self._tats.setdefault(tenant, {})
        for bucket in buckets:
            tat = by_name.get(bucket.name, (bucket, now))[1]
            by_name[bucket.name] = (bucket, max(tat, now) + bucket.cost / bucket.rate_per_s)

    def given_back(self, tenant: str, buckets: Sequence[BucketCheck]) -> None:
        """The costs of `buckets`, which a local admit took and gave back (never served), are
        owed no more."""
        by_name = self._tats.get(tenant, {})
        for bucket in buckets:
            if (kept := by_name.get(bucket.name)) is not None:
                by_name[bucket.name] = (kept[0], kept[1] - bucket.cost / kept[0].rate_per_s)

    def take(self, now: float) -> list[tuple[str, tuple[BucketCheck, ...]]]:
        """What is owed at `now`, per tenant, as the store's buckets with that cost; forgotten
        here (what a failed charge did not settle goes back with `spent`)."""
        tats, self._tats = self._tats, {}
        owed = []
        for tenant, by_name in tats.items():
            due = tuple(
                replace(bucket, cost=min(bucket.burst, (tat - now) * bucket.rate_per_s))
                for bucket, tat in by_name.values()
                if tat > now
            )
            if due:
                owed.append((tenant, due))
        return owed
