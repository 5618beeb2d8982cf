"""A small policy built in code, so core tests do not depend on the YAML loader."""

from __future__ import annotations

import hashlib
from types import MappingProxyType

from sidecar.policy.model import (
    BucketPolicy,
    BucketUnit,
    ClassPolicy,
    DisallowedClassAction,
    FailMode,
    IdentityPolicy,
    IdentitySource,
    IdentitySourceKind,
    ModelPolicy,
    Policy,
    TenantMatch,
    TenantPolicy,
    UnknownTenantAction,
    UnknownTenantPolicy,
)


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


CLASSES = {
    "interactive": ClassPolicy("interactive", 1, 250, 50, 1, FailMode.OPEN, 500),
    "standard": ClassPolicy("standard", 2, 2000, 500, 2, FailMode.OPEN),
    "batch": ClassPolicy("batch", 3, 20000, 5000, 3, FailMode.CLOSED, 2000),
}


def make_policy(
    unknown: UnknownTenantPolicy | None = None,
    sources: tuple[IdentitySource, ...] | None = None,
) -> Policy:
    search = TenantPolicy(
        name="search",
        match=TenantMatch(api_key_sha256=frozenset({sha("k-search")}), principals=frozenset()),
        allowed_classes=frozenset({"interactive", "standard"}),
        default_class="standard",
        on_disallowed_class=DisallowedClassAction.DOWNGRADE,
        buckets=(
            BucketPolicy("requests", BucketUnit.REQUESTS, 10.0, 20.0),
            BucketPolicy("tokens", BucketUnit.COST, 1000.0, 4000.0),
        ),
        max_concurrency=8,
        max_concurrency_per_class=MappingProxyType({"interactive": 2}),
    )
    analytics = TenantPolicy(
        name="analytics",
        match=TenantMatch(
            api_key_sha256=frozenset({sha("k-analytics")}),
            principals=frozenset({"spiffe://test/analytics"}),
        ),
        allowed_classes=frozenset({"standard", "batch"}),
        default_class="batch",
        on_disallowed_class=DisallowedClassAction.REJECT,
        buckets=(BucketPolicy("requests", BucketUnit.REQUESTS, 5.0, 5.0),),
    )
    anon = TenantPolicy(
        name="anonymous",
        match=TenantMatch(),
        allowed_classes=frozenset({"batch"}),
        default_class="batch",
    )
    return Policy(
        version="test",
        sources=("<code>",),
        classes=MappingProxyType(CLASSES),
        tenants=MappingProxyType({"search": search, "analytics": analytics, "anonymous": anon}),
        identity=IdentityPolicy(
            sources=sources
            or (
                IdentitySource(IdentitySourceKind.API_KEY, "x-api-key"),
                IdentitySource(IdentitySourceKind.PRINCIPAL),
            )
        ),
        unknown_tenants=unknown or UnknownTenantPolicy(UnknownTenantAction.REJECT),
        models=MappingProxyType({"llm": ModelPolicy("llm", 300.0)}),
        lease_ttl_s=120.0,
    )
