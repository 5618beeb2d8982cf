"""The fleet benchmark's bounds: how far a tenant's admitted requests ever ran ahead of
what its bucket allows (burst at once, then the rate), counted from its first request; and the
(weighted) max-min fair shares the fairness scenarios judge by."""

from __future__ import annotations

import pytest

from benchmarks.fleet_load import Sent, max_min_shares
from benchmarks.fleet_scenarios import most_over_bucket
from benchmarks.loadgen import Record


def sent(tenant: str, at: float, status: int = 200) -> Sent:
    record = Record(tenant, "standard", at, at, status, 0.001, 0.001, None, "", "")
    return Sent(record, 0, 100.0 + at)


def test_a_tenant_that_keeps_to_its_bucket_is_never_over_it() -> None:
    # Burst 5 at once, then one every 0.1 s at 10/s: exactly the bucket.
    run = [sent("t", 0.0) for _ in range(5)] + [sent("t", 0.1 * i) for i in range(1, 30)]
    assert most_over_bucket(run, "t", rate=10.0, burst=5) <= 1e-9


def test_one_request_past_the_bucket_shows_as_one_over() -> None:
    run = [sent("t", 0.0) for _ in range(6)] + [sent("t", 0.1 * i) for i in range(1, 30)]
    assert most_over_bucket(run, "t", rate=10.0, burst=5) == pytest.approx(1.0)


def test_refusals_and_other_tenants_do_not_count_but_a_refusal_starts_the_clock() -> None:
    # The tenant's first request (refused) starts its bucket's clock 1 s before its admits.
    run = [sent("t", 0.0, status=429)] + [sent("t", 1.0) for _ in range(15)]
    run += [sent("other", 1.0) for _ in range(50)]
    assert most_over_bucket(run, "t", rate=10.0, burst=5) == pytest.approx(0.0)
    assert most_over_bucket([*run, sent("t", 1.0)], "t", rate=10.0, burst=5) == pytest.approx(1.0)
    assert most_over_bucket(run, "nobody", rate=10.0, burst=5) == 0.0


def test_fair_shares_fill_water_by_weight_and_stop_at_each_demand() -> None:
    assert max_min_shares({"a": 100.0, "b": 100.0}, 80.0) == {"a": 40.0, "b": 40.0}
    weighted = max_min_shares({"heavy": 100.0, "light": 100.0}, 80.0, {"heavy": 3.0})
    assert weighted == {"heavy": pytest.approx(60.0), "light": pytest.approx(20.0)}
    # A tenant that asks for less than its weighted share gets its demand; the rest by weight.
    small = max_min_shares({"heavy": 10.0, "light": 100.0, "c": 100.0}, 80.0, {"heavy": 3.0})
    assert small == {"heavy": 10.0, "light": pytest.approx(35.0), "c": pytest.approx(35.0)}
