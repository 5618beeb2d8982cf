"""Table tests for the pure decision core: whole decisions, no event loop."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sidecar.core.compiled import compile_policy
from sidecar.core.decide import (
    Admission,
    decide,
    malformed,
    plan_request,
)
from sidecar.core.kserve import model_of
from sidecar.core.lease import parse_lease
from sidecar.core.types import (
    Decision,
    LimitKind,
    Outcome,
    QuotaResult,
    Reason,
    RequestAttributes,
)
from sidecar.policy.model import UnknownTenantAction, UnknownTenantPolicy
from tests.core_fixtures import make_policy

COMPILED = compile_policy(make_policy())
INFER = "/v2/models/simgpu/infer"


def attrs(path: str = INFER, principal: str | None = None, **headers: str) -> RequestAttributes:
    return RequestAttributes(
        method="POST",
        path=path,
        headers={k.replace("_", "-"): v for k, v in headers.items()},
        principal=principal,
    )


def plan(a: RequestAttributes, compiled=COMPILED) -> Admission:
    result = plan_request(a, compiled)
    assert isinstance(result, Admission), result
    return result


def early(a: RequestAttributes, compiled=COMPILED) -> Decision:
    result = plan_request(a, compiled)
    assert isinstance(result, Decision), result
    return result


ALLOWED = QuotaResult(allowed=True, lease_id="abc123", in_flight=1, class_in_flight=1)


@pytest.mark.parametrize(
    ("request_attrs", "tenant", "klass", "reason"),
    [
        (attrs(x_api_key="k-search"), "search", "standard", Reason.ADMITTED),
        (
            attrs(x_api_key="k-search", x_qos_class="interactive"),
            "search",
            "interactive",
            Reason.ADMITTED,
        ),
        (
            attrs(x_api_key="k-search", x_qos_class="batch"),
            "search",
            "standard",
            Reason.ADMITTED_DOWNGRADED,
        ),
        (
            attrs(x_api_key="k-search", x_qos_class="platinum"),
            "search",
            "standard",
            Reason.ADMITTED_DOWNGRADED,
        ),
        (attrs(principal="spiffe://test/analytics"), "analytics", "batch", Reason.ADMITTED),
        # The API key is tried before the principal: the first source with a value decides.
        (
            attrs(principal="spiffe://test/analytics", x_api_key="k-search"),
            "search",
            "standard",
            Reason.ADMITTED,
        ),
    ],
)
def test_admitted_requests(
    request_attrs: RequestAttributes, tenant: str, klass: str, reason: Reason
) -> None:
    admission = plan(request_attrs)
    assert (admission.tenant.name, admission.klass.name) == (tenant, klass)
    decision = decide(admission, ALLOWED)
    assert decision.outcome is Outcome.ADMIT
    assert decision.status == 200
    assert decision.reason is reason
    headers = dict(decision.headers)
    assert headers["x-qos-tenant"] == tenant
    assert headers["x-qos-granted-class"] == klass
    assert headers["x-qos-priority"] == str(COMPILED.policy.classes[klass].triton_priority)
    # The body rewrite reads the number, not the header string back.
    assert decision.triton_priority == COMPILED.policy.classes[klass].triton_priority
    lease = parse_lease(headers["x-qos-lease"])
    assert lease is not None
    assert (lease.tenant, lease.klass, lease.lease_id) == (tenant, klass, "abc123")


@pytest.mark.parametrize(("timeout_header", "wait_s"), [(None, None), ("600", 0.6), ("x", None)])
def test_an_admit_carries_what_its_client_waits(
    timeout_header: str | None, wait_s: float | None
) -> None:
    """The body rewrite turns it into Triton's queue timeout (core/priority.py rule 7)."""
    headers = {} if timeout_header is None else {"x_qos_timeout_ms": timeout_header}
    admission = plan(attrs(x_api_key="k-search", **headers))
    assert admission.client_wait_s == wait_s
    assert decide(admission, ALLOWED).client_wait_s == wait_s


@pytest.mark.parametrize(
    ("request_attrs", "status", "reason", "tenant"),
    [
        (attrs(), 401, Reason.NO_IDENTITY, None),
        (attrs(x_api_key="wrong"), 401, Reason.UNKNOWN_TENANT, None),
        (attrs(principal="spiffe://test/nobody"), 401, Reason.UNKNOWN_TENANT, None),
        (
            attrs(x_api_key="k-analytics", x_qos_class="interactive"),
            403,
            Reason.CLASS_NOT_ALLOWED,
            "analytics",
        ),
        (
            attrs(x_api_key="k-analytics", x_qos_class="gold"),
            403,
            Reason.UNKNOWN_CLASS,
            "analytics",
        ),
        (attrs(x_api_key="k-search", x_qos_class="bad class!"), 400, Reason.MALFORMED, None),
        (attrs(x_api_key="k" * 5000), 400, Reason.MALFORMED, None),
    ],
)
def test_early_refusals(
    request_attrs: RequestAttributes, status: int, reason: Reason, tenant: str | None
) -> None:
    decision = early(request_attrs)
    assert decision.outcome is Outcome.SHED
    assert (decision.status, decision.reason, decision.tenant) == (status, reason, tenant)
    body = json.loads(decision.body)
    assert body["reason"] == reason.value
    assert body["tenant"] == tenant
    assert set(body) >= {"error", "reason", "tenant", "class", "retry_after_ms"}
    assert dict(decision.headers)["content-type"] == "application/json"
    # Who was refused, when known, as the body says (Envoy's access log records it).
    assert dict(decision.headers).get("x-qos-tenant") == tenant
    # Refusals that retrying cannot fix carry no Retry-After.
    assert "retry-after" not in dict(decision.headers)


def test_unknown_tenant_served_as_default_tenant() -> None:
    policy = make_policy(unknown=UnknownTenantPolicy(UnknownTenantAction.DEFAULT, "anonymous"))
    compiled = compile_policy(policy)
    for request_attrs in (attrs(), attrs(x_api_key="stolen?")):
        admission = plan(request_attrs, compiled)
        assert admission.tenant.name == "anonymous"
        assert admission.klass.name == "batch"


@pytest.mark.parametrize(
    ("result", "status", "reason", "retry_after_header", "retry_after_ms"),
    [
        (
            QuotaResult(
                False, denied_by=LimitKind.BUCKET, denied_bucket="requests", retry_after_s=0.25
            ),
            429,
            Reason.OVER_RATE,
            "1",
            250,
        ),
        (
            QuotaResult(
                False, denied_by=LimitKind.BUCKET, denied_bucket="tokens", retry_after_s=2.2
            ),
            429,
            Reason.OVER_RATE,
            "3",
            2200,
        ),
        # Concurrency: no bucket says when a slot frees; the class's setting does.
        (
            QuotaResult(False, denied_by=LimitKind.CONCURRENCY, in_flight=8),
            429,
            Reason.OVER_CONCURRENCY,
            "1",
            1000,
        ),
        (
            QuotaResult(False, denied_by=LimitKind.CLASS_CONCURRENCY, class_in_flight=2),
            429,
            Reason.OVER_CLASS_CONCURRENCY,
            "1",
            1000,
        ),
    ],
)
def test_quota_denials(
    result: QuotaResult, status: int, reason: Reason, retry_after_header: str, retry_after_ms: int
) -> None:
    decision = decide(plan(attrs(x_api_key="k-search")), result)
    assert (decision.status, decision.reason) == (status, reason)
    headers = dict(decision.headers)
    assert headers["retry-after"] == retry_after_header
    assert headers["x-qos-tenant"] == "search"
    body = json.loads(decision.body)
    assert body == {
        "error": "over_quota",
        "reason": reason.value,
        "tenant": "search",
        "class": "standard",
        "retry_after_ms": retry_after_ms,
        **({"limit": result.denied_bucket} if result.denied_bucket else {}),
    }


def test_store_unavailable_follows_class_fail_mode() -> None:
    fail_open = decide(plan(attrs(x_api_key="k-search")), None)
    assert (fail_open.outcome, fail_open.reason) == (Outcome.ADMIT, Reason.ADMITTED_FAIL_OPEN)
    assert fail_open.lease_id is None
    assert "x-qos-lease" not in dict(fail_open.headers)

    fail_closed = decide(plan(attrs(x_api_key="k-analytics")), None)
    assert (fail_closed.status, fail_closed.reason) == (503, Reason.STATE_UNAVAILABLE)
    assert dict(fail_closed.headers)["retry-after"] == "2"


def test_quota_check_charges_cost_units_by_model() -> None:
    llm = plan(attrs("/v2/models/llm/versions/3/infer", x_api_key="k-search"))
    costs = {b.name: b.cost for b in llm.check.buckets}
    assert costs == {"requests": 1.0, "tokens": 300.0}
    other = plan(attrs(x_api_key="k-search"))
    assert {b.name: b.cost for b in other.check.buckets} == {"requests": 1.0, "tokens": 1.0}
    assert llm.check.max_concurrency == 8
    assert llm.check.max_class_concurrency is None
    interactive = plan(attrs(x_api_key="k-search", x_qos_class="interactive"))
    assert interactive.check.max_class_concurrency == 2
    assert interactive.check.lease_ttl_s == 120.0


@pytest.mark.parametrize(
    ("path", "model"),
    [
        ("/v2/models/simgpu/infer", "simgpu"),
        ("/v2/models/simgpu/versions/2/infer", "simgpu"),
        ("/v2/models/my%20model/generate_stream", "my model"),
        ("/v2/models/simgpu/infer?x=1", "simgpu"),
        ("/v2/models/simgpu/ready", None),
        ("/v2/health/ready", None),
        ("/", None),
    ],
)
def test_model_of(path: str, model: str | None) -> None:
    assert model_of(path) == model


def test_tenant_names_are_header_safe() -> None:
    decision = decide(plan(attrs(x_api_key="k-search")), ALLOWED)
    for name, value in decision.headers:
        assert value.isascii() and value.isprintable(), (name, value)


def test_malformed_for_adapters() -> None:
    decision = malformed("no http attributes in CheckRequest")
    assert (decision.status, decision.reason) == (400, Reason.MALFORMED)
    assert decision.trace[0] == "no http attributes in CheckRequest"


def test_explain_trace_says_why() -> None:
    decision = decide(
        plan(attrs(x_api_key="k-search", x_qos_class="batch")),
        QuotaResult(False, denied_by=LimitKind.BUCKET, denied_bucket="requests", retry_after_s=0.1),
    )
    text = "\n".join(decision.trace)
    assert "tenant 'search'" in text
    assert "downgraded to 'standard'" in text
    assert "bucket 'requests' empty" in text
    assert decision.trace[-1] == "shed 429 over_rate"


def test_class_scoped_buckets_only_charge_their_classes() -> None:
    from dataclasses import replace
    from types import MappingProxyType

    from sidecar.policy.model import BucketPolicy, BucketUnit

    policy = make_policy()
    search = policy.tenants["search"]
    batch_budget = BucketPolicy(
        "standard-only", BucketUnit.REQUESTS, 1.0, 1.0, frozenset({"standard"})
    )
    search = replace(search, buckets=(*search.buckets, batch_budget))
    compiled = compile_policy(
        replace(policy, tenants=MappingProxyType({**policy.tenants, "search": search}))
    )
    standard = plan(attrs(x_api_key="k-search", x_qos_class="standard"), compiled)
    interactive = plan(attrs(x_api_key="k-search", x_qos_class="interactive"), compiled)
    assert [b.name for b in standard.check.buckets] == ["requests", "tokens", "standard-only"]
    assert [b.name for b in interactive.check.buckets] == ["requests", "tokens"]


def test_traced_is_replace_with_a_longer_trace() -> None:
    """`Admission.traced` builds what `dataclasses.replace` would, field by field."""
    planned = plan(attrs(x_api_key="k-search"))
    admission = dataclasses.replace(planned, relegated=True, cost=7.0, client_wait_s=1.5)
    other = dataclasses.replace(admission.check, lease_id="other")
    longer = (*admission.trace, "why")
    assert admission.traced("why") == dataclasses.replace(admission, trace=longer)
    assert admission.traced("why", other) == dataclasses.replace(
        admission, check=other, trace=longer
    )
    # It names every field: one added to Admission must be passed on by `traced` too.
    assert [f.name for f in dataclasses.fields(Admission)] == [
        "tenant",
        "klass",
        "requested_class",
        "downgraded",
        "model",
        "check",
        "trace",
        "relegated",
        "cost",
        "client_wait_s",
    ]
