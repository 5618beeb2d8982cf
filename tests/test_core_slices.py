"""Leased mode's slices (`core.slices`), as pure rules on a frozen clock."""

from __future__ import annotations

from dataclasses import replace

from sidecar.core.slices import Slices, applies, slice_size
from sidecar.core.types import BucketCheck, QuotaCheck

LEASED = BucketCheck("req", rate_per_s=1000.0, burst=500.0, cost=1.0, lease_s=0.1)


def check(*buckets: BucketCheck, **kwargs: object) -> QuotaCheck:
    base = QuotaCheck("acme", "standard", buckets or (LEASED,), None, None, 30.0)
    return replace(base, **kwargs)  # type: ignore[arg-type]


def test_only_requests_that_need_no_tenant_lease_go_through_slices() -> None:
    assert applies(check())
    assert not applies(check(max_concurrency=4))  # a lease per request
    assert not applies(check(max_class_concurrency=4))
    assert applies(check(model="m"))  # counted for its model: that entry is its lease
    assert not applies(check(LEASED, replace(LEASED, name="tok", lease_s=0.0)))  # one exact
    assert not applies(check(buckets=()))


def test_a_slice_is_rate_times_lease_at_most_half_the_burst_at_least_the_cost() -> None:
    assert slice_size(LEASED) == 100.0  # 1000/s x 0.1 s
    assert slice_size(replace(LEASED, burst=50.0)) == 25.0  # half the burst
    assert slice_size(replace(LEASED, burst=50.0, cost=40.0)) == 40.0  # the cost itself


def test_requests_spend_the_slice_until_it_is_used_up_or_its_time_is_up() -> None:
    slices, c = Slices(), check()
    assert not slices.spend(c, 0.0)  # nothing held: ask
    asked = slices.ask(c)
    assert asked.buckets[0].cost == 100.0
    slices.granted(asked, c, 0.0)  # the asking request's unit is spent already
    assert slices.held("acme", "req") == 99.0
    assert all(slices.spend(c, 0.05) for _ in range(99))
    assert not slices.spend(c, 0.05)  # used up
    slices.granted(asked, c, 0.06)
    assert slices.spend(c, 0.10)
    assert not slices.spend(c, 0.16)  # its time is up


def test_what_a_slice_did_not_spend_is_given_back_once() -> None:
    slices, c = Slices(), check()
    slices.granted(slices.ask(c), c, 0.0)
    for _ in range(9):
        slices.spend(c, 0.01)
    assert slices.expired(0.05) == []  # still running
    [(tenant, [refund])] = slices.expired(0.1)
    assert (tenant, refund.name, refund.cost) == ("acme", "req", -90.0)
    assert slices.expired(0.2) == []  # given back once


def test_an_expired_rest_is_given_back_when_a_new_slice_replaces_it() -> None:
    slices, c = Slices(), check()
    slices.granted(slices.ask(c), c, 0.0)
    slices.granted(slices.ask(c), c, 0.5)  # the first one's 99 units: time up, not reused
    assert slices.held("acme", "req") == 99.0
    [(_, [refund])] = slices.expired(0.55)
    assert refund.cost == -99.0


def test_asking_for_the_cost_alone_is_exact_mode() -> None:
    slices, c = Slices(), check()
    assert slices.ask(c, whole=False) == c
    slices.granted(c, c, 0.0)
    assert slices.held("acme", "req") == 0.0
