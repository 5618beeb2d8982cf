"""The quota store's arithmetic at a virtual clock: what `acquire`, `peek`, `release` and a
refund do in `sidecar.state` (MemoryQuotaStore, and acquire.lua in Redis), for replay.

Rules (the same as `MemoryQuotaStore._evaluate`, in the same order):
- The tenant's per-class concurrency limit, then its concurrency limit: a limit reached
  refuses (`CLASS_CONCURRENCY`, `CONCURRENCY`) before any bucket is looked at.
- Every bucket of the check is evaluated with `core.gcra.step_buckets` at `now`; if any refuses,
  nothing is taken and the worst refusal (the longest retry) is the answer.
- Taken: every bucket's TAT moves on, and a lease (tenant, class) is held until released.
  Leases never expire here: replay always releases them (completion or give-back).
- A refund moves a bucket's TAT back by cost / rate, never before `now`.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence

from sidecar.core.gcra import step_buckets
from sidecar.core.types import BucketCheck, LimitKind, QuotaCheck, QuotaResult


class VirtualQuota:
    def __init__(self) -> None:
        self._tats: dict[tuple[str, str], float] = {}  # (tenant, bucket) -> TAT
        self._leases: dict[str, tuple[str, str]] = {}  # lease id -> (tenant, class)
        self._tenant_leases: Counter[str] = Counter()
        self._class_leases: Counter[tuple[str, str]] = Counter()
        self._ids = itertools.count(1)

    def in_flight(self, tenant: str) -> int:
        return self._tenant_leases[tenant]

    def peek(self, check: QuotaCheck, now: float) -> QuotaResult:
        return self._evaluate(check, now, take=False)

    def acquire(self, check: QuotaCheck, now: float) -> QuotaResult:
        return self._evaluate(check, now, take=True)

    def release(self, lease_id: str) -> str | None:
        """End a lease; the tenant whose it was (None: no such lease)."""
        held = self._leases.pop(lease_id, None)
        if held is None:
            return None
        self._tenant_leases[held[0]] -= 1
        self._class_leases[held] -= 1
        return held[0]

    def refund(self, tenant: str, buckets: Sequence[BucketCheck], now: float) -> None:
        for bucket in buckets:
            key = (tenant, bucket.name)
            tat = max(self._tats.get(key, now), now)
            self._tats[key] = max(tat - bucket.cost / bucket.rate_per_s, now)

    def _evaluate(self, check: QuotaCheck, now: float, *, take: bool) -> QuotaResult:
        in_flight = self._tenant_leases[check.tenant]
        class_in_flight = self._class_leases[(check.tenant, check.klass)]

        def denied(kind: LimitKind, bucket: str | None = None, retry_s: float = 0.0) -> QuotaResult:
            return QuotaResult(
                False,
                denied_by=kind,
                denied_bucket=bucket,
                retry_after_s=retry_s,
                in_flight=in_flight,
                class_in_flight=class_in_flight,
            )

        limit = check.max_class_concurrency
        if limit is not None and class_in_flight >= limit:
            return denied(LimitKind.CLASS_CONCURRENCY)
        if check.max_concurrency is not None and in_flight >= check.max_concurrency:
            return denied(LimitKind.CONCURRENCY)
        tats = {b.name: self._tats[(check.tenant, b.name)] for b in check.buckets
                if (check.tenant, b.name) in self._tats}  # fmt: skip
        step = step_buckets(check.buckets, tats, now)
        if step.denied is not None:
            return denied(LimitKind.BUCKET, step.denied[1], step.denied[0])
        if not take:
            return QuotaResult(True, in_flight=in_flight, class_in_flight=class_in_flight)
        self._tats.update(((check.tenant, name), tat) for name, tat in step.new_tats)
        lease_id = check.lease_id or f"sim-{next(self._ids)}"
        self._leases[lease_id] = (check.tenant, check.klass)
        self._tenant_leases[check.tenant] += 1
        self._class_leases[(check.tenant, check.klass)] += 1
        return QuotaResult(
            True, lease_id=lease_id, in_flight=in_flight + 1, class_in_flight=class_in_flight + 1
        )
