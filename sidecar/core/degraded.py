"""Which limits apply while the shared quota store is unavailable (`on_state_error:
local_share`).

Rules:
- Each replica then enforces its share of every limit of the request's check, on its own, in
  memory: the limit divided by the number of live replicas `replicas` (from their heartbeats
  in the store, remembered from before the outage, or the policy's `replicas`). With the
  traffic spread over the replicas, together they admit about what the shared store would.
- A bucket's rate and burst are both divided. The burst stays at least the request's cost
  (and at least 1), or a request that fits the real bucket could never pass a small share.
- A concurrency limit is divided and rounded down, but stays at least 1: a replica with a
  share of less than one request still runs one at a time rather than none. With more
  replicas than the limit, the fleet may then run up to one request per replica.
- Everything else (tenant, class, cost, lease id, TTL, model) is the check's own.
- `replicas` below 1 counts as 1: a count never read means this replica is alone, as far as
  it knows.
"""

from __future__ import annotations

from dataclasses import replace

from sidecar.core.decide import Admission
from sidecar.core.types import QuotaCheck


def local_share(check: QuotaCheck, replicas: int) -> QuotaCheck:
    """`check` with each limit divided by `replicas` (see module rules)."""
    n = max(1, replicas)
    if n == 1:
        return check
    buckets = tuple(
        replace(b, rate_per_s=b.rate_per_s / n, burst=max(b.burst / n, b.cost, 1.0))
        for b in check.buckets
    )
    return replace(
        check,
        buckets=buckets,
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
    return replace(admission, check=local_share(admission.check, n), trace=(*admission.trace, why))


def _share(limit: int | None, replicas: int) -> int | None:
    if limit is None or limit == 0:
        return limit
    return max(1, limit // replicas)
