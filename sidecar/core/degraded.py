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
- A share starts from what this replica already spent, not from a full bucket or an empty
  slot count: a store stall must not hand every tenant a fresh burst on top of what it used.
  - Buckets: while the store answers, each charge this replica makes there (and each refund)
    is made again at its share in the local store, at most down to empty (`share_of` gives
    the shares; the service records them).
  - Concurrency: the requests this replica admitted through the store and still runs,
    `running` (the tenant's) and `running_class` (the class's), take their places in the
    share.
- A concurrency limit is divided and rounded down, but stays at least 1: a replica with a
  share of less than one request still runs one at a time rather than none. With more
  replicas than the limit, the fleet may then run up to one request per replica. What this
  replica runs already is then taken off, down to 0 (nothing more until one ends).
- Everything else (tenant, class, cost, lease id, TTL, model) is the check's own.
- What the local share admitted is owed to the store (`LocalSpend`): once it answers again,
  each tenant's bucket units spent here during the outage (less what was given back) are
  charged there, in one call per tenant, so that the store's buckets, which refilled all
  along, do not hand out the outage's units a second time. A charge that fails stays owed
  for the next try.
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


def local_share(
    check: QuotaCheck, replicas: int, running: int = 0, running_class: int = 0
) -> QuotaCheck:
    """`check` with each limit divided by `replicas`, less what this replica runs already
    (see module rules)."""
    n = max(1, replicas)
    return replace(
        check,
        buckets=share_buckets(check.buckets, n),
        max_concurrency=_share(check.max_concurrency, n, running),
        max_class_concurrency=_share(check.max_class_concurrency, n, running_class),
    )


def degrade(
    admission: Admission, replicas: int, running: int = 0, running_class: int = 0
) -> Admission:
    """`admission` checked against this replica's local share, said in its trace."""
    n = max(1, replicas)
    why = (
        f"quota store unavailable; class {admission.klass.name!r} takes its local share "
        f"(1/{n} of each limit, {n} live replica{'s' if n != 1 else ''})"
    )
    if running:
        why += f", less the {running} it admitted through the store and still runs"
    check = local_share(admission.check, n, running, running_class)
    return replace(admission, check=check, trace=(*admission.trace, why))


def _share(limit: int | None, replicas: int, running: int) -> int | None:
    if limit is None or limit == 0:
        return limit
    return max(0, max(1, limit // replicas) - running)


class LocalSpend:
    """Bucket units the local share admitted, per tenant and bucket, not yet charged to the
    store (module rules). The buckets kept are the store's (not the share's): a charge there
    moves a bucket by cost / its own rate."""

    def __init__(self) -> None:
        self._owed: dict[str, dict[str, BucketCheck]] = {}

    def __bool__(self) -> bool:
        return bool(self._owed)

    def spent(self, tenant: str, buckets: Sequence[BucketCheck]) -> None:
        """`buckets` (the store's, with the cost taken) were spent locally."""
        owed = self._owed.setdefault(tenant, {})
        for bucket in buckets:
            before = owed.get(bucket.name)
            cost = bucket.cost + (before.cost if before is not None else 0.0)
            owed[bucket.name] = replace(bucket, cost=cost)

    def given_back(self, tenant: str, buckets: Sequence[BucketCheck]) -> None:
        """The costs of `buckets`, which a local admit took and gave back (never served), are
        owed no more."""
        owed = self._owed.get(tenant, {})
        for bucket in buckets:
            if (before := owed.get(bucket.name)) is not None:
                owed[bucket.name] = replace(before, cost=max(0.0, before.cost - bucket.cost))

    def take(self) -> list[tuple[str, tuple[BucketCheck, ...]]]:
        """Everything owed, per tenant, forgotten here: give back what a failed charge did
        not settle with `spent`."""
        owed, self._owed = self._owed, {}
        due = ((t, tuple(b for b in by_name.values() if b.cost > 0)) for t, by_name in owed.items())
        return [(tenant, buckets) for tenant, buckets in due if buckets]
