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
