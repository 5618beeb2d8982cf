"""The fleet benchmark's bucket bound: how far a tenant's admitted requests ever ran ahead of
what its bucket allows (burst at once, then the rate), counted from its first request."""

from __future__ import annotations

import pytest

from benchmarks.fleet_load import Sent
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
