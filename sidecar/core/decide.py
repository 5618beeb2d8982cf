"""From a request's attributes, the policy and the quota state to a decision.

Rules, in the order they are applied:
1. Identity. The policy's identity sources are tried in order; the first that yields a value
   decides who the caller is: an API key (matched by SHA-256 digest), the mTLS principal Envoy
   verified, or a header set by a trusted hop in front. No value, or a value that matches no
   tenant, makes the caller unknown: rejected with 401, or served as the policy's default
   tenant.
2. Class. The client may ask for a class in the policy's class header; without one it gets its
   tenant's default class. A class the tenant may not use (or that does not exist) is
   downgraded to the default class or rejected with 403, as the tenant's policy says.
3. Quota. Every token bucket of the tenant, its concurrency limit and its per-class limit are
   checked and taken together by the store, atomically (see `QuotaCheck`). A denial is 429 with
   a Retry-After taken from when the bucket will hold enough tokens; concurrency denials use
   the class's `concurrency_retry_after_ms`.
   A bucket with an `excess_class` moves what it refuses there instead (core/relegation.py).
4. Store unavailable. The class's `on_state_error` decides: `open` admits without a lease
   (counted), `closed` sheds with 503.
Every shed carries `retry-after` (429 and 503) and a JSON body saying why. Every admit carries
the decision headers upstream, each one overwriting whatever the client sent.
"""

from __future__ import annotations

import functools
import json
import math
import re
import urllib.parse
from collections.abc import Mapping

from sidecar.core.client_wait import client_wait_s
from sidecar.core.compiled import CompiledPolicy, bucket_checks
from sidecar.core.kserve import Unreadable, model_of
from sidecar.core.lease import format_lease, lease_id_for
from sidecar.core.record import record
from sidecar.core.types import (
    BucketCheck,
    Decision,
    LeaseRef,
    LimitKind,
    Outcome,
    QuotaCheck,
    QuotaResult,
    Reason,
    RequestAttributes,
)
from sidecar.policy.model import (
    BucketUnit,
    ClassPolicy,
    DisallowedClassAction,
    FailMode,
    IdentitySourceKind,
    Policy,
    TenantPolicy,
    UnknownTenantAction,
)

HEADER_TENANT = "x-qos-tenant"
HEADER_CLASS = "x-qos-granted-class"
HEADER_PRIORITY = "x-qos-priority"
HEADER_LEASE = "x-qos-lease"
HEADER_ROUTE_PRIORITY = "x-qos-route-priority"
HEADER_REASON = "x-qos-reason"
# Set by the sidecar only; the shipped Envoy config strips client copies before ext_authz.
DECISION_HEADERS = (
    HEADER_TENANT,
    HEADER_CLASS,
    HEADER_PRIORITY,
    HEADER_LEASE,
    HEADER_ROUTE_PRIORITY,
    "x-qos-shadow-decision",  # core/shadow.py's HEADER_SHADOW
)

_STATUS = {
    Reason.OVER_RATE: 429,
    Reason.OVER_CONCURRENCY: 429,
    Reason.OVER_CLASS_CONCURRENCY: 429,
    Reason.UNKNOWN_TENANT: 401,
    Reason.NO_IDENTITY: 401,
    Reason.CLASS_NOT_ALLOWED: 403,
    Reason.UNKNOWN_CLASS: 403,
    Reason.STATE_UNAVAILABLE: 503,
    Reason.OVERLOADED: 503,
    Reason.MALFORMED: 400,
    Reason.COST_OVER_BURST: 400,
    Reason.UNREADABLE_BODY: 400,
    Reason.UNSUPPORTED_ENCODING: 415,
    Reason.UNKNOWN_MODEL: 404,
    Reason.INFEASIBLE: 422,
}
_ERROR = {
    401: "unauthenticated",
    403: "forbidden",
    429: "over_quota",
    503: "unavailable",
    400: "bad_request",
    415: "unsupported_media_type",
    404: "not_found",
    422: "unprocessable",
}
_LIMIT_REASON = {
    LimitKind.BUCKET: Reason.OVER_RATE,
    LimitKind.CONCURRENCY: Reason.OVER_CONCURRENCY,
    LimitKind.CLASS_CONCURRENCY: Reason.OVER_CLASS_CONCURRENCY,
    # A second request with a running (or just ended) request's id: counted as over the
    # tenant's concurrency, never admitted without a lease of its own.
    LimitKind.LEASE_ID_USED: Reason.OVER_CONCURRENCY,
}
_CLASS_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_MAX_IDENTITY_CHARS = 4096


@record
class Admission:
    """A request that needs the quota store: who, which class, and what to check."""

    tenant: TenantPolicy
    klass: ClassPolicy
    requested_class: str | None
    downgraded: bool
    model: str | None
    check: QuotaCheck
    trace: tuple[str, ...]
    relegated: bool = False
    cost: float = 1.0  # the cost units `cost` buckets are charged
    client_wait_s: float | None = None  # what the client says it waits (core/client_wait.py)

    def traced(self, why: str, check: QuotaCheck | None = None) -> Admission:
        """This admission with `why` added to its trace (and `check` for its own, if given):
        what `dataclasses.replace` would make, built directly, as it is on every decision."""
        return Admission(
            self.tenant,
            self.klass,
            self.requested_class,
            self.downgraded,
            self.model,
            self.check if check is None else check,
            (*self.trace, why),
            self.relegated,
            self.cost,
            self.client_wait_s,
        )


def plan_request(
    attrs: RequestAttributes,
    compiled: CompiledPolicy,
    estimate: tuple[float, str] | None = None,
) -> Admission | Decision:
    """Steps 1 and 2: an early decision, or what the store must check for step 3.
    `estimate` is the request's own cost and how it was found (`core.tokens`); without one
    the model's cost_per_request is charged."""
    policy = compiled.policy
    trace: list[str] = []
    requested = attrs.headers.get(policy.identity.class_header)
    if requested is not None:
        requested = requested.strip()
        if not _CLASS_NAME.match(requested):
            trace.append(f"class header {policy.identity.class_header!r} is not a class name")
            return shed(Reason.MALFORMED, None, None, None, trace)

    tenant = _identify(attrs, compiled, trace)
    if isinstance(tenant, Decision):
        return tenant

    klass, downgraded = _choose_class(tenant, requested, policy, trace)
    if isinstance(klass, Decision):
        return klass

    model = attrs.model or model_of(attrs.path)
    if estimate is None:
        cost = policy.cost_of(model)
        trace.append(f"model {model!r}, cost {cost:g}")
    else:
        cost, why = estimate
        if math.isinf(cost):  # core.tokens.CHARGE_MAX: what the tenant's buckets can hold
            cost = _most_chargeable(tenant, klass, policy.cost_of(model))
        trace.append(f"model {model!r}, {why}")
    counted = model if compiled.counts_models else None  # the model whose count it joins
    lease_id = lease_id_for(attrs.request_id)  # its quota call counts no model: see `judge`
    buckets = None if estimate is not None else compiled.policy_buckets(tenant, klass, cost)
    check = quota_check(
        tenant, klass, cost, policy, counted, lease_id, count_now=False, buckets=buckets
    )
    too_big = next((b for b in check.buckets if b.cost > b.burst), None)
    if too_big is not None:
        # No wait would ever fit it: a 429 would have the client retry forever.
        trace.append(f"cost {cost:g} is more than bucket {too_big.name!r} can ever hold")
        return shed(
            Reason.COST_OVER_BURST, tenant.name, klass.name, requested, trace, detail=too_big.name
        )
    waits = client_wait_s(attrs.headers, policy.identity.timeout_header, trace)
    return Admission(
        tenant, klass, requested, downgraded, model, check, (*trace,), False, cost, waits
    )


def quota_check(
    tenant: TenantPolicy,
    klass: ClassPolicy,
    cost: float,
    policy: Policy,
    model: str | None = None,
    lease_id: str | None = None,
    *,
    count_now: bool = True,
    buckets: tuple[BucketCheck, ...] | None = None,
) -> QuotaCheck:
    """The limits a request of `klass` must fit: its `buckets` (default: `bucket_checks`),
    and the concurrency limits."""
    return QuotaCheck(
        tenant=tenant.name,
        klass=klass.name,
        buckets=bucket_checks(tenant, klass, cost) if buckets is None else buckets,
        max_concurrency=tenant.max_concurrency,
        max_class_concurrency=tenant.max_concurrency_per_class.get(klass.name),
        lease_ttl_s=policy.lease_ttl_s,
        model=model,
        lease_id=lease_id,
        count_model_now=count_now,
    )


def decide(admission: Admission, result: QuotaResult | None) -> Decision:
    """Step 3 and 4. `result` is None when the store could not answer."""
    tenant, klass = admission.tenant, admission.klass
    trace = list(admission.trace)
    if result is None:
        if klass.on_state_error is FailMode.OPEN:
            trace.append(f"quota store unavailable; class {klass.name!r} fails open")
            return _admit(admission, Reason.ADMITTED_FAIL_OPEN, None, trace)
        trace.append(f"quota store unavailable; class {klass.name!r} fails closed")
        return shed(
            Reason.STATE_UNAVAILABLE,
            tenant.name,
            klass.name,
            admission.requested_class,
            trace,
            retry_after_s=klass.concurrency_retry_after_ms / 1000,
        )
    if result.allowed:
        trace.append(
            f"quota fits: in flight {result.in_flight} (tenant), {result.class_in_flight} (class)"
        )
        if admission.relegated:
            reason = Reason.ADMITTED_RELEGATED
        elif admission.downgraded:
            reason = Reason.ADMITTED_DOWNGRADED
        else:
            reason = Reason.ADMITTED
        return _admit(admission, reason, result, trace)
    denied_by = result.denied_by or LimitKind.BUCKET
    reason = _LIMIT_REASON[denied_by]
    if denied_by is LimitKind.BUCKET:
        retry_after_s = result.retry_after_s
        trace.append(
            f"bucket {result.denied_bucket!r} empty; enough tokens in {retry_after_s:.3f}s"
        )
    else:
        retry_after_s = klass.concurrency_retry_after_ms / 1000
        limit = (
            admission.check.max_concurrency
            if denied_by is LimitKind.CONCURRENCY
            else admission.check.max_class_concurrency
        )
        trace.append(f"{denied_by.value} limit {limit} reached")
    return shed(
        reason,
        tenant.name,
        klass.name,
        admission.requested_class,
        trace,
        retry_after_s=retry_after_s,
        detail=result.denied_bucket,
    )


def admit_after_wait(admission: Admission, result: QuotaResult, why: str) -> Decision:
    """The admit of a request that was held (deferred) until Triton had room."""
    reason = Reason.ADMITTED_RELEGATED if admission.relegated else Reason.ADMITTED_DEFERRED
    return _admit(admission, reason, result, [*admission.trace, why])


def shed_overloaded(admission: Admission, retry_after_s: float, why: str) -> Decision:
    """503 for load: Triton cannot serve this class in time; come back after the drain."""
    return refuse(admission, Reason.OVERLOADED, why, retry_after_s=retry_after_s)


def refuse(
    admission: Admission,
    reason: Reason,
    why: str,
    *,
    retry_after_s: float | None = None,
    extra: Mapping[str, object] | None = None,
) -> Decision:
    """`shed` for a planned request: its tenant and classes, its trace and `why`."""
    tenant, klass = admission.tenant.name, admission.klass.name
    trace, requested = [*admission.trace, why], admission.requested_class
    return shed(reason, tenant, klass, requested, trace, retry_after_s=retry_after_s, extra=extra)


def shed(
    reason: Reason,
    tenant: str | None,
    klass: str | None,
    requested_class: str | None,
    trace: list[str],
    *,
    retry_after_s: float | None = None,
    detail: str | None = None,
    extra: Mapping[str, object] | None = None,
) -> Decision:
    """A refusal with its status, headers (the tenant, when known: Envoy logs it), JSON body
    (with `extra`'s fields: what the client can do about it)."""
    status = _STATUS[reason]
    named = [] if tenant is None else [(HEADER_TENANT, _tenant_header(tenant))]
    headers = [("content-type", "application/json"), (HEADER_REASON, reason.value), *named]
    retry_after_ms = None if retry_after_s is None else max(1, math.ceil(retry_after_s * 1000))
    if retry_after_ms is not None:
        # Retry-After is whole seconds (RFC 9110); round up so a client that obeys it fits.
        headers.append(("retry-after", str(max(1, math.ceil(retry_after_ms / 1000)))))
    body: dict[str, object] = {
        "error": _ERROR[status],
        "reason": reason.value,
        "tenant": tenant,
        "class": klass,
        "retry_after_ms": retry_after_ms,
    }
    if detail is not None:
        body["limit"] = detail
    body.update(extra or {})
    return Decision(
        outcome=Outcome.SHED,
        status=status,
        reason=reason,
        tenant=tenant,
        klass=klass,
        requested_class=requested_class,
        headers=tuple(headers),
        body=json.dumps(body, separators=(",", ":")).encode(),
        retry_after_s=retry_after_s,
        trace=(*trace, f"shed {status} {reason.value}"),
    )


def malformed(message: str) -> Decision:
    """For adapters that cannot even build the request's attributes."""
    return shed(Reason.MALFORMED, None, None, None, [message])


def refuse_unreadable(problem: Unreadable) -> Decision:
    """A token model's body whose cost cannot be read, under `tokens.unreadable: refuse`."""
    reason = Reason.UNSUPPORTED_ENCODING if problem.unsupported_encoding else Reason.UNREADABLE_BODY
    return shed(reason, None, None, None, [problem.why], extra={"message": problem.why})


def _most_chargeable(tenant: TenantPolicy, klass: ClassPolicy, fallback: float) -> float:
    """The largest cost every cost bucket of `tenant` covering `klass` can hold (their
    smallest burst): `tokens.unreadable: charge_max`. Without such buckets cost is charged
    nowhere, and `fallback` (cost_per_request) stands."""
    bursts = [b.burst for b in tenant.buckets if b.unit is BucketUnit.COST and b.covers(klass.name)]
    return min(bursts, default=fallback)


def _admit(  # result: what the store took (None: nothing, failed open)
    admission: Admission, reason: Reason, result: QuotaResult | None, trace: list[str]
) -> Decision:
    tenant, klass = admission.tenant, admission.klass
    route = klass.route_priority.value
    headers = _granted(tenant.name, klass.name, klass.triton_priority, route)
    lease = None
    if result is not None and result.lease_id is not None:
        # The lease lives under the class its quota was taken in, which a relegation after
        # the quota was taken does not change, and counts for its model.
        lease = LeaseRef.of(admission.check, result.lease_id, model_only=result.model_only)
        headers = (*headers, (HEADER_LEASE, format_lease(lease)))
    return Decision(
        outcome=Outcome.ADMIT,
        status=200,
        reason=reason,
        tenant=tenant.name,
        klass=klass.name,
        requested_class=admission.requested_class,
        headers=headers,
        lease=lease,
        # Every admit but a fail-open one was charged (with a lease, or from a leased slice).
        charged=() if reason is Reason.ADMITTED_FAIL_OPEN else admission.check.buckets,
        triton_priority=klass.triton_priority,
        triton_timeout_ms=klass.triton_timeout_ms,
        client_wait_s=admission.client_wait_s,
        trace=(*trace, f"admit as {klass.name!r} (triton priority {klass.triton_priority})"),
    )


def _identify(
    attrs: RequestAttributes, compiled: CompiledPolicy, trace: list[str]
) -> TenantPolicy | Decision:
    policy = compiled.policy
    found: TenantPolicy | None = None
    seen_identity = False
    for source in policy.identity.sources:
        if source.kind is IdentitySourceKind.PRINCIPAL:
            value = attrs.principal or None
        else:
            value = attrs.headers.get(source.header or "") or None
        if value is None:
            continue
        if len(value) > _MAX_IDENTITY_CHARS:
            trace.append(f"{source.kind.value} value longer than {_MAX_IDENTITY_CHARS} chars")
            return shed(Reason.MALFORMED, None, None, None, trace)
        seen_identity = True
        if source.kind is IdentitySourceKind.API_KEY:
            found = compiled.tenant_of_key(value)
            label = f"api key in {source.header!r}"
        elif source.kind is IdentitySourceKind.PRINCIPAL:
            found = compiled.by_principal.get(value)
            label = f"principal {value!r}"
        else:
            found = compiled.by_header_value.get(value)
            label = f"header {source.header!r}"
        trace.append(f"{label} -> {'tenant ' + repr(found.name) if found else 'no tenant'}")
        break
    if found is not None:
        return found
    reason = Reason.UNKNOWN_TENANT if seen_identity else Reason.NO_IDENTITY
    unknown = policy.unknown_tenants
    default = policy.tenants.get(unknown.tenant or "")
    if unknown.action is UnknownTenantAction.DEFAULT and default is not None:
        trace.append(f"{reason.value}: served as default tenant {default.name!r}")
        return default
    return shed(reason, None, None, None, trace)


@functools.lru_cache(maxsize=4096)
def _tenant_header(tenant: str) -> str:
    """`x-qos-tenant`'s value: the name percent-encoded but for what a name may hold."""
    return urllib.parse.quote(tenant, safe="-_.~:@/")


@functools.lru_cache(maxsize=4096)
def _granted(tenant: str, klass: str, priority: int, route: str) -> tuple[tuple[str, str], ...]:
    """An admit's decision headers but its lease: the same for every admit of a tenant in a
    class, so built once (the arguments are all it reads, so a reload needs no clearing)."""
    return (
        (HEADER_TENANT, _tenant_header(tenant)),
        (HEADER_CLASS, klass),
        (HEADER_PRIORITY, str(priority)),
        (HEADER_ROUTE_PRIORITY, route),
    )


def _choose_class(
    tenant: TenantPolicy, requested: str | None, policy: Policy, trace: list[str]
) -> tuple[ClassPolicy, bool] | tuple[Decision, bool]:
    if requested is None:
        trace.append(f"no class asked; tenant default {tenant.default_class!r}")
        return policy.classes[tenant.default_class], False
    if requested in tenant.allowed_classes:
        trace.append(f"class {requested!r} allowed")
        return policy.classes[requested], False
    reason = Reason.UNKNOWN_CLASS if requested not in policy.classes else Reason.CLASS_NOT_ALLOWED
    if tenant.on_disallowed_class is DisallowedClassAction.DOWNGRADE:
        trace.append(f"{reason.value} {requested!r}; downgraded to {tenant.default_class!r}")
        return policy.classes[tenant.default_class], True
    trace.append(f"{reason.value} {requested!r}; tenant policy rejects")
    return shed(reason, tenant.name, None, requested, trace), False
