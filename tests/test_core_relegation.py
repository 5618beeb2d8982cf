"""core/relegation.py: a bucket's excess class, through the admission machine, and the store
space a relegation before quota keeps."""

from __future__ import annotations

import json
from dataclasses import replace
from types import MappingProxyType

from sidecar.core import admission
from sidecar.core.admission import Answer, QuotaFirst, TakeQuota
from sidecar.core.relegation import relegate
from sidecar.core.shadow import shadow_check, shadow_tenant
from sidecar.core.types import LimitKind, QuotaResult, Reason
from sidecar.policy.model import BucketPolicy, BucketUnit, OverloadPolicy, Policy
from tests.test_core_admission import NOW, planned, policy_with, signals

ALLOWED = QuotaResult(True, lease_id="L2", in_flight=1, class_in_flight=1)


def with_excess(policy: Policy, excess_class: str | None = "batch") -> Policy:
    """Tenant `search` with a bucket for standard alone whose excess goes as `excess_class`,
    and one for batch (which the excess is charged to)."""
    search = policy.tenants["search"]
    buckets = (
        BucketPolicy(
            "standard-rate",
            BucketUnit.REQUESTS,
            1.0,
            2.0,
            classes=frozenset({"standard"}),
            excess_class=excess_class,
        ),
        BucketPolicy("batch-rate", BucketUnit.REQUESTS, 1.0, 2.0, classes=frozenset({"batch"})),
    )
    search = replace(search, buckets=buckets)
    return replace(policy, tenants=MappingProxyType({**policy.tenants, "search": search}))


def refused_by(bucket: str) -> QuotaResult:
    return QuotaResult(False, denied_by=LimitKind.BUCKET, denied_bucket=bucket, retry_after_s=0.8)


def take(policy: Policy) -> TakeQuota:
    step = admission.judge(planned(policy), signals(0), policy)
    assert isinstance(step, TakeQuota) and step.admission.klass.name == "standard"
    assert [b.name for b in step.admission.check.buckets] == ["standard-rate"]
    return step


def test_what_the_bucket_refuses_is_judged_and_charged_again_as_its_excess_class() -> None:
    policy = with_excess(policy_with())
    moved = admission.on_quota(
        take(policy), refused_by("standard-rate"), NOW, 0.0, signals(0), policy
    )
    assert isinstance(moved, TakeQuota) and moved.release_deadline_s is None
    assert moved.admission.klass.name == "batch" and moved.admission.relegated
    # Its quota is asked for again, of the excess class's own buckets.
    assert moved.admission.check.klass == "batch"
    assert [b.name for b in moved.admission.check.buckets] == ["batch-rate"]
    assert moved.admission.check.tenant == "search"
    assert "bucket 'standard-rate' empty; its excess goes as 'batch'" in moved.admission.trace[-2]
    admitted = admission.on_quota(moved, ALLOWED, NOW, 0.0, signals(0), policy)
    assert isinstance(admitted, Answer)
    decision = admitted.decision
    assert decision.admitted and decision.reason is Reason.ADMITTED_RELEGATED
    assert decision.klass == "batch" and decision.requested_class == "standard"
    assert decision.triton_priority == policy.classes["batch"].triton_priority
    assert ("x-qos-granted-class", "batch") in decision.headers


def test_once_moved_a_refusal_is_the_answer() -> None:
    """Over the excess class's own bucket too: 429, with that bucket's Retry-After."""
    policy = with_excess(policy_with())
    moved = admission.on_quota(
        take(policy), refused_by("standard-rate"), NOW, 0.0, signals(0), policy
    )
    assert isinstance(moved, TakeQuota)
    refused = admission.on_quota(moved, refused_by("batch-rate"), NOW, 0.0, signals(0), policy)
    assert isinstance(refused, Answer) and refused.decision.status == 429
    body = json.loads(refused.decision.body)
    assert body["limit"] == "batch-rate" and body["class"] == "batch"


def test_a_bucket_without_an_excess_class_refuses_as_before() -> None:
    policy = with_excess(policy_with(), excess_class=None)
    refused = admission.on_quota(
        take(policy), refused_by("standard-rate"), NOW, 0.0, signals(0), policy
    )
    assert isinstance(refused, Answer) and refused.decision.status == 429


def test_an_excess_class_without_room_sheds_for_load() -> None:
    """Judged anew as batch: with batch's queue past its shed_above, 503 for load, and no
    quota taken for it."""
    policy = with_excess(policy_with(batch=OverloadPolicy(admit_below=1, shed_above=2)))
    answer = admission.on_quota(
        take(policy), refused_by("standard-rate"), NOW, 0.0, signals(3), policy
    )
    assert isinstance(answer, Answer) and answer.give_back is None
    assert answer.decision.status == 503 and answer.decision.reason is Reason.OVERLOADED
    assert answer.decision.klass == "batch"


def test_shed_for_load_a_bucket_with_an_excess_class_does_not_make_it_a_429() -> None:
    """QuotaFirst tells a client over its quota so; one whose bucket would move it to the excess
    class is not refused by its quota, and keeps the load's 503."""
    policy = with_excess(policy_with(OverloadPolicy(admit_below=1, shed_above=2)))
    step = admission.judge(planned(policy), signals(3), policy)
    assert isinstance(step, QuotaFirst)
    answer = admission.on_peek(step, refused_by("standard-rate"))
    assert answer.decision.status == 503 and answer.decision.reason is Reason.OVERLOADED
    plain = with_excess(policy_with(OverloadPolicy(admit_below=1, shed_above=2)), None)
    step = admission.judge(planned(plain), signals(3), plain)
    assert isinstance(step, QuotaFirst)
    assert admission.on_peek(step, refused_by("standard-rate")).decision.status == 429


def test_relegation_before_quota_keeps_the_store_space_it_was_planned_in() -> None:
    """A shadow judgement's quota is taken in the tenant's shadow space (core/shadow.py);
    relegated before quota, it must stay there and not charge the tenant's real buckets."""
    policy = policy_with(relegate=True)
    shadowed = replace(planned(policy), check=shadow_check(planned(policy).check))
    moved = relegate(shadowed, policy, "test", requota=True)
    assert moved.klass.name == "batch" and moved.check.klass == "batch"
    assert moved.check.tenant == shadow_tenant("search")
