"""A policy with what the hot path looks up in it, built once per reload (`compile_policy`).

Two kinds of tables:
1. Built at compile time from the policy: the tenant of each API key digest, mTLS principal
   and trusted header value, and whether any class reads a model's count.
2. Filled as requests come (issue 11: nothing per request that could be done once per
   policy): `tenant_of_key` and `policy_buckets` below. Each is bounded by the policy, never
   by what clients send, and goes with its policy on reload: a new compiled policy, or a
   `dataclasses.replace` of one, starts them empty.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from sidecar.core.types import BucketCheck
from sidecar.policy.model import BucketUnit, ClassPolicy, Policy, TenantPolicy


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    policy: Policy
    by_api_key: Mapping[str, TenantPolicy]
    by_principal: Mapping[str, TenantPolicy]
    by_header_value: Mapping[str, TenantPolicy]
    # Is a model's count read (a class sets `overload.max_in_flight` or `protect`)? Only then
    # are admits counted in their model's set (two store calls more, in another slot).
    counts_models: bool = True
    # Kind 2 (module comment): an API key as sent -> its tenant, and (tenant, class, cost)
    # -> the buckets a request of them checks.
    key_tenants: dict[str, TenantPolicy] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )
    kept_buckets: dict[tuple[str, str, float], tuple[BucketCheck, ...]] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    def tenant_of_key(self, key: str) -> TenantPolicy | None:
        """The tenant whose API key digest `key` has (rule 1 of `core.decide`). Kept only
        when it matches one, so at most one key per digest in the policy: any other key is
        hashed each time, and a client sending random keys cannot grow the table."""
        found = self.key_tenants.get(key)
        if found is None:
            found = self.by_api_key.get(hashlib.sha256(key.encode()).hexdigest())
            if found is not None:
                self.key_tenants[key] = found
        return found

    def policy_buckets(
        self, tenant: TenantPolicy, klass: ClassPolicy, cost: float
    ) -> tuple[BucketCheck, ...]:
        """`bucket_checks` at a cost the policy sets (a model's cost_per_request), kept per
        tenant, class and cost: a finite set, bounded by the policy. A cost read from a
        request's own body must not come here (it would grow the table per request)."""
        key = (tenant.name, klass.name, cost)
        found = self.kept_buckets.get(key)
        if found is None:
            found = self.kept_buckets[key] = bucket_checks(tenant, klass, cost)
        return found


def bucket_checks(tenant: TenantPolicy, klass: ClassPolicy, cost: float) -> tuple[BucketCheck, ...]:
    """Every bucket of the tenant that covers the class (a bucket without `classes` covers
    all), charged `cost` (1 for a `requests` bucket)."""
    return tuple(
        BucketCheck(
            name=b.name,
            rate_per_s=b.rate_per_s,
            burst=b.burst,
            cost=1.0 if b.unit is BucketUnit.REQUESTS else cost,
            by_cost=b.unit is BucketUnit.COST,
            lease_s=b.lease_ms / 1000,
        )
        for b in tenant.buckets
        if b.covers(klass.name)
    )


def compile_policy(policy: Policy) -> CompiledPolicy:
    keys: dict[str, TenantPolicy] = {}
    principals: dict[str, TenantPolicy] = {}
    values: dict[str, TenantPolicy] = {}
    for tenant in policy.tenants.values():
        keys.update(dict.fromkeys(tenant.match.api_key_sha256, tenant))
        principals.update(dict.fromkeys(tenant.match.principals, tenant))
        values.update(dict.fromkeys(tenant.match.header_values, tenant))
    tables = (MappingProxyType(keys), MappingProxyType(principals), MappingProxyType(values))
    overloads = [c.overload for c in policy.classes.values() if c.overload is not None]
    # While any class's overload reads its model's count (max_in_flight or protect), every
    # admit of every class counts in its model's set: `counts_models`.
    counted = any(o.max_in_flight is not None or o.protect is not None for o in overloads)
    return CompiledPolicy(policy, *tables, counted)
