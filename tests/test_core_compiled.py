"""The compiled policy's tables filled as requests come (core/compiled.py, kind 2): what they
answer is what the policy says, and nothing a client sends can grow them."""

from __future__ import annotations

import dataclasses
import uuid

from sidecar.core.compiled import bucket_checks, compile_policy
from sidecar.core.decide import Admission, plan_request
from sidecar.core.types import RequestAttributes
from sidecar.policy.model import TenantMatch
from tests.core_fixtures import make_policy, sha


def _attrs(key: str, path: str = "/v2/models/llm/infer", **headers: str) -> RequestAttributes:
    return RequestAttributes(method="POST", path=path, headers={"x-api-key": key, **headers})


def _admission(result: object) -> Admission:
    assert isinstance(result, Admission), result
    return result


def test_random_api_keys_are_never_kept_and_a_known_one_once() -> None:
    compiled = compile_policy(make_policy())
    for _ in range(500):
        assert compiled.tenant_of_key(uuid.uuid4().hex) is None
    assert compiled.key_tenants == {}
    for _ in range(3):
        found = compiled.tenant_of_key("k-search")
        assert found is not None and found.name == "search"
    assert list(compiled.key_tenants) == ["k-search"]


def test_a_reloaded_policy_answers_a_key_by_its_own_tenants() -> None:
    """The key moves from one tenant to another: the old policy's memory does not follow."""
    old = compile_policy(make_policy())
    assert _admission(plan_request(_attrs("k-search"), old)).tenant.name == "search"
    policy = make_policy()
    tenants = dict(policy.tenants)
    tenants["search"] = dataclasses.replace(tenants["search"], match=TenantMatch())
    tenants["analytics"] = dataclasses.replace(
        tenants["analytics"], match=TenantMatch(api_key_sha256=frozenset({sha("k-search")}))
    )
    new = compile_policy(dataclasses.replace(policy, tenants=tenants))
    assert _admission(plan_request(_attrs("k-search"), new)).tenant.name == "analytics"
    # A replace (the simulator swaps the identity tables so) starts with nothing kept.
    bare = dataclasses.replace(old, by_api_key={})
    assert bare.tenant_of_key("k-search") is None


def test_buckets_are_kept_for_policy_costs_only_and_match_a_fresh_build() -> None:
    compiled = compile_policy(make_policy())
    policy = compiled.policy
    first = _admission(plan_request(_attrs("k-search"), compiled))
    again = _admission(plan_request(_attrs("k-search"), compiled))
    assert again.check.buckets is first.check.buckets
    tenant, klass = policy.tenants["search"], policy.classes["standard"]
    assert first.check.buckets == bucket_checks(tenant, klass, policy.cost_of("llm"))
    assert [b.cost for b in first.check.buckets] == [1.0, 300.0]  # requests, then cost units
    kept = dict(compiled.kept_buckets)
    # Costs read from bodies (token estimates) are as many as the requests: none is kept.
    for tokens in range(1, 200):
        estimated = plan_request(_attrs("k-search"), compiled, (float(tokens), "estimated"))
        assert [b.cost for b in _admission(estimated).check.buckets] == [1.0, float(tokens)]
    assert compiled.kept_buckets == kept
    # Another class of the same tenant is its own entry, with its own buckets.
    interactive = _admission(
        plan_request(_attrs("k-search", **{"x-qos-class": "interactive"}), compiled)
    )
    assert interactive.klass.name == "interactive"
    assert len(compiled.kept_buckets) == len(kept) + 1
