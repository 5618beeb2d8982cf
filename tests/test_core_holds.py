"""Each transport's longest hold cuts a class's max_wait_ms (core/holds.py). Pure."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

from sidecar.core.compiled import compile_policy
from sidecar.core.holds import HoldBounds, bounded_holds, over_bound
from sidecar.core.shadow import ShadowedPolicy, compile_with_shadow
from sidecar.policy.model import Policy
from tests.core_fixtures import make_policy


def with_waits(**waits: int) -> Policy:
    policy = make_policy()
    classes = {
        name: replace(c, max_wait_ms=waits.get(name, c.max_wait_ms))
        for name, c in policy.classes.items()
    }
    return replace(policy, classes=MappingProxyType(classes))


def test_only_classes_longer_than_the_bound_are_cut() -> None:
    policy = with_waits(standard=300, batch=9000)
    assert over_bound(policy, 5500) == ["batch"]
    bounded = bounded_holds(policy, 5500)
    assert bounded.classes["batch"].max_wait_ms == 5500
    assert bounded.classes["standard"].max_wait_ms == 300
    assert policy.classes["batch"].max_wait_ms == 9000  # the written policy is untouched
    assert bounded_holds(policy, 9000) is policy


def test_a_transport_without_a_bound_or_a_policy_within_it_sees_the_same_snapshot() -> None:
    compiled = compile_policy(with_waits(batch=4000))
    bounds = HoldBounds({"http": 5500})
    assert bounds.view(compiled, "http") is compiled
    assert bounds.view(compiled, "ext_proc") is compiled


def test_a_view_is_compiled_once_per_snapshot_and_follows_a_new_one() -> None:
    bounds = HoldBounds({"http": 5500, "ext_proc": 29500})
    first = compile_policy(with_waits(batch=9000))
    view = bounds.view(first, "http")
    assert view.policy.classes["batch"].max_wait_ms == 5500
    assert bounds.view(first, "http") is view
    assert bounds.view(first, "ext_proc") is first  # 9 s fits 29.5 s
    second = compile_policy(with_waits(batch=7000))
    assert bounds.view(second, "http").policy.classes["batch"].max_wait_ms == 5500
    assert bounds.view(second, "http") is not view


def test_a_shadowed_policy_is_cut_on_both_sides() -> None:
    policy = with_waits(batch=9000)
    policy = replace(
        policy,
        classes=MappingProxyType(
            {**policy.classes, "batch": replace(policy.classes["batch"], enforce=False)}
        ),
    )
    compiled = compile_with_shadow(policy)
    assert isinstance(compiled, ShadowedPolicy) and compiled.written is not None
    view = HoldBounds({"grpc": 1000}).view(compiled, "grpc")
    assert isinstance(view, ShadowedPolicy) and view.written is not None
    assert view.written.policy.classes["batch"].max_wait_ms == 1000
    assert view.policy.classes["batch"].max_wait_ms == 1000
    assert view.classes == compiled.classes  # still shadowed
