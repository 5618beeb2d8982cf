"""Moving a request to a less important class, once: relegation and a bucket's excess.

Rules:
1. Relegation (`relegate`): the request goes on as its class's `relegate_to` class, once (the
   loader checked it ranks below). Before any quota is taken (`requota`) its quota check moves
   with it, in the same store space (a shadow judgement's stays in the tenant's shadow space:
   core/shadow.py) and with the same model count; after (a hold that expired), the check, and
   so the lease, stay where they were taken. Who relegates and when: core/admission.py.
2. Excess (`excess`). A request that a bucket with an `excess_class` refused is not refused:
   it moves to that class, as rule 1 moves it before quota, and its quota is asked for again
   there, with that class's own buckets and limits; core/admission.py judges its load anew.
   So a tenant's work within the bucket keeps its class, and what it sends beyond competes as
   the excess class, behind other tenants' work in the bucket's classes: an entitlement for
   interactive work, best effort beyond it, rather than a 429 or a place ahead of others.
   Once: a request already relegated is refused by the bucket as before. The loader checked
   that the bucket lists its classes, that the excess class is not among them (it would refuse
   it again) and that it ranks below each of them.
"""

from __future__ import annotations

from dataclasses import replace

from sidecar.core.decide import Admission, quota_check
from sidecar.core.types import LimitKind, QuotaResult
from sidecar.policy.model import BucketPolicy, Policy


def excess_bucket(admission: Admission, result: QuotaResult | None) -> BucketPolicy | None:
    """The bucket that refused `admission`, where it names an `excess_class` the request may
    still move to (rule 2: once, so not one already relegated); None otherwise."""
    if result is None or result.denied_by is not LimitKind.BUCKET or admission.relegated:
        return None
    name = result.denied_bucket
    bucket = next((b for b in admission.tenant.buckets if b.name == name), None)
    return bucket if bucket is not None and bucket.excess_class is not None else None


def excess(admission: Admission, result: QuotaResult | None, policy: Policy) -> Admission | None:
    """Rule 2: the request moved to the excess class of the bucket that refused it, its quota
    check with it (nothing was taken); None where the rule does not apply."""
    bucket = excess_bucket(admission, result)
    if bucket is None:
        return None
    why = f"bucket {bucket.name!r} empty; its excess goes as {bucket.excess_class!r}"
    return relegate(admission, policy, why, requota=True, to=bucket.excess_class)


def relegate(
    admission: Admission, policy: Policy, why: str, *, requota: bool, to: str | None = None
) -> Admission:
    """Rule 1: the same request in its class's `relegate_to` class, or in `to` (rule 2's
    excess class)."""
    target = policy.classes[to or admission.klass.relegate_to or admission.klass.name]
    check = admission.check
    if requota:
        tenant, cost, counts = admission.tenant, admission.cost, check.count_model_now
        moved = quota_check(tenant, target, cost, policy, check.model, check.lease_id)
        check = replace(  # the same space and count (rule 1)
            moved, tenant=check.tenant, model_pod=check.model_pod, count_model_now=counts
        )
    return replace(
        admission,
        klass=target,
        check=check,
        relegated=True,
        trace=(
            *admission.trace,
            f"{why}; relegated from {admission.klass.name!r} to {target.name!r}",
        ),
    )
