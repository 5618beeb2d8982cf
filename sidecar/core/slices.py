"""Leased mode: a replica spends slices of a tenant's buckets locally (Doorman-style), so that
most decisions make no store call at all.

Rules:
- A bucket with `lease_ms` > 0 is leased (`BucketCheck.lease_s`). A request goes through
  slices only when it needs no lease in its tenant's sets (`applies`): every bucket it draws
  on is leased and it has no concurrency limit (tenant or class). Those take a lease in the
  store, one call per request, as in exact mode.
- A request counted for its model (a policy whose classes read the model's count) still
  spends from slices: its lease is its model's entry alone (`LeaseRef.model_only`), written
  after the answer and released at its end as in exact mode, so the decision waits on no
  store call. The model's count is a load signal, not a limit, so nothing is over-admitted
  by it.
- A slice is taken from the shared bucket, with the request that asks for it, in one call
  (`store.take_buckets`, all or nothing over the request's buckets): per bucket
  S = min(rate x lease_s, burst / 2) units, and at least the request's own cost. This replica
  then spends it locally (`spend`) until it is used up or `lease_s` has passed.
- Units are taken from the bucket before they are spent, so the fleet never admits more than
  the bucket allows: over-admission 0, whatever the number of replicas.
- What a slice did not spend when its time is up is given back (`expired`: refunds, charged
  as negative cost), so a tenant's units sit unused on a replica for at most `lease_s` plus
  the sweep interval. Meanwhile another replica may refuse that tenant for want of units it
  holds: at most replicas x S units, for at most that long (under-admission, bounded).
  A replica that stops gives back everything it holds (`expired` at infinity).
- A slice the bucket cannot give whole is not the answer: the request then asks for its own
  cost alone (`ask(whole=False)`), exactly like exact mode, and a refusal carries the
  bucket's Retry-After.
- At most half the burst per slice: one replica never holds a whole burst, and the first
  request after an idle spell does not empty the bucket for the others.
- A leased bucket that no request can spend through slices is named when its policy loads
  (`leases_without_effect`): `lease_ms` is then not an error, but it changes nothing.
- Pure: the caller owns the store calls and the clock.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sidecar.core.types import BucketCheck, QuotaCheck
from sidecar.policy.model import BucketPolicy, Policy, TenantPolicy


@dataclass(slots=True)
class _Slice:
    left: float
    until: float
    bucket: BucketCheck  # its rate and burst, for the refund


def applies(check: QuotaCheck) -> bool:
    """Does `check` go through slices (module rules)?"""
    return (
        bool(check.buckets)
        and check.max_concurrency is None
        and check.max_class_concurrency is None
        and all(b.lease_s > 0 for b in check.buckets)
    )


def leases_without_effect(policy: Policy) -> list[str]:
    """Each leased bucket (`lease_ms` > 0) that no request can spend through slices, and
    why (`applies`: such requests take a lease in the store, as in exact mode). `policy` as
    enforced (`core.shadow`: shadow rules out), which is what decides."""
    notes = []
    for tenant in policy.tenants.values():
        for bucket in tenant.buckets:
            why = _why_exact(tenant, bucket) if bucket.lease_ms > 0 else None
            if why is not None:
                notes.append(
                    f"tenant {tenant.name!r}, bucket {bucket.name!r}: lease_ms"
                    f" {bucket.lease_ms} has no effect: {why}"
                )
    return notes


def _why_exact(tenant: TenantPolicy, bucket: BucketPolicy) -> str | None:
    if tenant.max_concurrency is not None:
        return "the tenant's max_concurrency gives each of its requests a lease in the store"
    for klass in bucket.classes or tenant.allowed_classes:
        exact = any(b.lease_ms <= 0 and b.covers(klass) for b in tenant.buckets)
        if not exact and klass not in tenant.max_concurrency_per_class:
            return None  # this class's requests spend slices
    return (
        "each class it covers also draws on a bucket without lease_ms or has a"
        " max_concurrency_per_class"
    )


def slice_size(bucket: BucketCheck) -> float:
    """Units one slice of `bucket` holds, this request's cost included."""
    return max(bucket.cost, min(bucket.rate_per_s * bucket.lease_s, bucket.burst / 2))


class Slices:
    """The slices this replica holds, per tenant and bucket."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, str], _Slice] = {}
        self._returns: list[tuple[str, BucketCheck]] = []  # expired rests to give back

    def spend(self, check: QuotaCheck, now: float) -> bool:
        """Take `check`'s cost from the slices held, if every bucket's has enough left and
        its time is not up; else take nothing (False: ask for new slices)."""
        slices = []
        for bucket in check.buckets:
            held = self._held.get((check.tenant, bucket.name))
            if held is None or now >= held.until or held.left < bucket.cost:
                return False
            slices.append((held, bucket.cost))
        for held, cost in slices:
            held.left -= cost
        return True

    def ask(self, check: QuotaCheck, *, whole: bool = True) -> QuotaCheck:
        """What to take from the store for `check` (its buckets alone: no lease, so no model
        to count): with `whole`, its cost and a slice of every bucket; without, its cost
        alone."""
        buckets = check.buckets
        if whole:
            buckets = tuple(replace(b, cost=slice_size(b)) for b in buckets)
        return replace(check, buckets=buckets, model=None, model_pod=None)

    def granted(self, asked: QuotaCheck, check: QuotaCheck, now: float) -> None:
        """The store gave `asked` for `check`: keep what is left beyond `check`'s cost (added
        to what is still held, all of it until `lease_s` from now)."""
        for got, wanted in zip(asked.buckets, check.buckets, strict=True):
            extra = got.cost - wanted.cost
            key = (check.tenant, wanted.name)
            held = self._held.get(key)
            left = extra
            if held is not None and now < held.until:
                left += held.left
            elif held is not None and held.left > 0:  # its time is up: given back, not reused
                self._returns.append((check.tenant, replace(held.bucket, cost=-held.left)))
            self._held[key] = _Slice(left, now + wanted.lease_s, wanted)

    def expired(self, now: float) -> list[tuple[str, list[BucketCheck]]]:
        """The slices whose time is up, forgotten; per tenant, the refunds of what they did
        not spend (one negative cost per bucket), for `store.charge`."""
        rests = list(self._returns)
        self._returns = []
        for key in [k for k, held in self._held.items() if now >= held.until]:
            held = self._held.pop(key)
            if held.left > 0:
                rests.append((key[0], replace(held.bucket, cost=-held.left)))
        merged: dict[tuple[str, str], BucketCheck] = {}
        for tenant, refund in rests:
            seen = merged.get((tenant, refund.name))
            cost = refund.cost + (seen.cost if seen is not None else 0.0)
            merged[(tenant, refund.name)] = replace(refund, cost=cost)
        refunds: dict[str, list[BucketCheck]] = {}
        for (tenant, _), refund in merged.items():
            refunds.setdefault(tenant, []).append(refund)
        return list(refunds.items())

    def held(self, tenant: str, bucket: str) -> float:
        """Units of `tenant`'s `bucket` held here now (for tests and explain)."""
        held = self._held.get((tenant, bucket))
        return 0.0 if held is None else held.left
