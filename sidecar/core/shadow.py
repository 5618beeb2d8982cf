"""Shadow mode: rules judged in full and recorded, but not applied.

Rules:
- `enforce: false` makes shadow rules of a bucket; of a tenant's buckets and concurrency
  limits; of a class's overload rules and every tenant's per-class concurrency for it; or, at
  the top of a file, of every class and tenant that file defines (their default).
- Every request is decided with the ENFORCED policy: the policy as written with its shadow
  rules taken out (`enforced_policy`). That decision is the one Envoy gets, and the one
  recorded with `shadow="false"`.
- A request a shadow rule could touch (its tenant has one, or its class is shadowed) is also
  judged with the policy AS WRITTEN, every rule applied: identity, class, load and quota. Its
  quota is taken in a store space of its own (`shadow_check`): the tenant's keys under
  `shadow_tenant(name)`, a name no policy tenant can have (names hold no control characters),
  and no model count. So shadow buckets and concurrency evolve as they would if they were
  enforced, and a shadow lease never counts against an enforced limit, nor loads a model.
- That outcome is recorded (`qos_decisions_total{shadow="true"}`) and sent upstream with the
  admit as `x-qos-shadow-decision: <outcome> <status> <reason>`, e.g. `shed 429 over_rate`,
  `defer 200 admitted` (it would have been held first) or `admit 200 admitted`.
- A shadow lease ends with its request: the enforced lease's token says one is held
  (`LeaseRef.shadow`) and its release frees both. A request the enforced policy refused, or
  admitted without a lease, gives its shadow lease back at once.
- The shadow judgement never holds a request, never waits for a release, and its failures
  (store down) are recorded as `shadow_unknown`, never applied.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import MappingProxyType

from sidecar.core.compiled import CompiledPolicy, compile_policy
from sidecar.core.decide import HEADER_LEASE
from sidecar.core.lease import format_lease
from sidecar.core.types import Decision, QuotaCheck
from sidecar.policy.model import ClassPolicy, Policy, TenantPolicy

HEADER_SHADOW = "x-qos-shadow-decision"
# Not a character a policy name may hold (spec.NAME), so no tenant's keys are a shadow's.
_SHADOW_MARK = "\x1fshadow"


def shadow_tenant(name: str) -> str:
    """The name a tenant's shadow state is kept under."""
    return name + _SHADOW_MARK


def _enforced_tenant(tenant: TenantPolicy, shadow_classes: frozenset[str]) -> TenantPolicy:
    if not tenant.enforce:
        return replace(
            tenant,
            buckets=(),
            max_concurrency=None,
            max_concurrency_per_class=MappingProxyType({}),
        )
    per_class = {
        k: v for k, v in tenant.max_concurrency_per_class.items() if k not in shadow_classes
    }
    return replace(
        tenant,
        buckets=tuple(bucket for bucket in tenant.buckets if bucket.enforce),
        max_concurrency_per_class=MappingProxyType(per_class),
    )


def _has_shadow_limit(tenant: TenantPolicy, shadow_classes: frozenset[str]) -> bool:
    return (
        not tenant.enforce
        or any(not bucket.enforce for bucket in tenant.buckets)
        or any(klass in shadow_classes for klass in tenant.max_concurrency_per_class)
    )


def _enforced_class(klass: ClassPolicy) -> ClassPolicy:
    return klass if klass.enforce else replace(klass, overload=None)


@dataclass(frozen=True, slots=True)
class ShadowedPolicy(CompiledPolicy):
    """The enforced policy, compiled, with the policy as written beside it."""

    written: CompiledPolicy | None = None
    tenants: frozenset[str] = frozenset()  # tenants with a shadow limit
    classes: frozenset[str] = frozenset()  # classes whose own rules are shadow rules

    def touches(self, tenant: str, klass: str) -> bool:
        """Could a shadow rule decide a request of this tenant and class differently?"""
        return tenant in self.tenants or klass in self.classes


def compile_with_shadow(policy: Policy) -> CompiledPolicy:
    """`policy` compiled; with shadow rules, its enforced version plus the written one."""
    shadow_classes = frozenset(k.name for k in policy.classes.values() if not k.enforce)
    tenants = frozenset(
        t.name for t in policy.tenants.values() if _has_shadow_limit(t, shadow_classes)
    )
    if not tenants and not shadow_classes:
        return compile_policy(policy)
    enforced = replace(
        policy,
        classes=MappingProxyType({n: _enforced_class(k) for n, k in policy.classes.items()}),
        tenants=MappingProxyType(
            {n: _enforced_tenant(t, shadow_classes) for n, t in policy.tenants.items()}
        ),
    )
    compiled = compile_policy(enforced)
    return ShadowedPolicy(
        compiled.policy,
        compiled.by_api_key,
        compiled.by_principal,
        compiled.by_header_value,
        compiled.counts_models,
        written=compile_policy(policy),
        tenants=tenants,
        classes=shadow_classes,
    )


def shadow_check(check: QuotaCheck) -> QuotaCheck:
    """The same limits, taken in the tenant's shadow space, counted for no model."""
    return replace(check, tenant=shadow_tenant(check.tenant), model=None, model_pod=None)


def header_value(seen: Decision | None, deferred: bool) -> str:
    """What the written policy decided, as `x-qos-shadow-decision` says it."""
    if seen is None:
        return "unknown 0 shadow_unknown"
    outcome = "defer" if deferred and seen.admitted else seen.outcome.value
    return f"{outcome} {seen.status} {seen.reason.value}"


def with_shadow(real: Decision, seen: Decision | None, deferred: bool) -> Decision:
    """The enforced decision, telling upstream what the written policy decided and, when a
    shadow lease rides with its own, saying so in its lease token."""
    if not real.admitted:
        return real
    headers = [(name, value) for name, value in real.headers]
    headers.append((HEADER_SHADOW, header_value(seen, deferred)))
    lease = real.lease
    if lease is not None and seen is not None and seen.lease is not None:
        lease = replace(lease, shadow=True)
        headers = [
            (name, format_lease(lease) if name == HEADER_LEASE else value)
            for name, value in headers
        ]
    return replace(real, headers=tuple(headers), lease=lease)
