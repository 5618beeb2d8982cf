"""The degraded mode's rule: which limits a replica enforces alone (core.degraded), as tables."""

from __future__ import annotations

from dataclasses import replace

import pytest

from sidecar.core.degraded import LocalSpend, degrade, local_share, share_buckets
from sidecar.core.types import BucketCheck, QuotaCheck
from tests.test_core_decide import attrs, plan

REQUESTS = BucketCheck("requests", rate_per_s=10.0, burst=20.0, cost=1.0)
TOKENS = BucketCheck("tokens", rate_per_s=1000.0, burst=4000.0, cost=300.0, by_cost=True)


def check(concurrency: int | None = 8, per_class: int | None = 2) -> QuotaCheck:
    return QuotaCheck(
        tenant="acme",
        klass="standard",
        buckets=(REQUESTS, TOKENS),
        max_concurrency=concurrency,
        max_class_concurrency=per_class,
        lease_ttl_s=10.0,
        model="llm",
        lease_id="r1",
    )


@pytest.mark.parametrize(
    "replicas, rates, bursts, concurrency, per_class",
    [
        (1, (10.0, 1000.0), (20.0, 4000.0), 8, 2),  # alone: the whole limit
        (0, (10.0, 1000.0), (20.0, 4000.0), 8, 2),  # never counted: alone
        (2, (5.0, 500.0), (10.0, 2000.0), 4, 1),
        (4, (2.5, 250.0), (5.0, 1000.0), 2, 1),  # 2 // 4 is 0: at least one
        (3, (10 / 3, 1000 / 3), (20 / 3, 4000 / 3), 2, 1),  # rounded down
        # Many replicas: a burst stays at least the request's cost, and at least 1.
        (40, (0.25, 25.0), (1.0, 300.0), 1, 1),
    ],
)
def test_each_limit_is_divided_by_the_live_replicas(
    replicas: int,
    rates: tuple[float, float],
    bursts: tuple[float, float],
    concurrency: int,
    per_class: int,
) -> None:
    shared = local_share(check(), replicas)
    assert tuple(b.rate_per_s for b in shared.buckets) == pytest.approx(rates)
    assert tuple(b.burst for b in shared.buckets) == pytest.approx(bursts)
    assert (shared.max_concurrency, shared.max_class_concurrency) == (concurrency, per_class)
    # Everything but the limits is the check's own.
    assert tuple(b.cost for b in shared.buckets) == (1.0, 300.0)
    assert (shared.tenant, shared.klass, shared.model, shared.lease_id) == (
        "acme",
        "standard",
        "llm",
        "r1",
    )
    assert shared.lease_ttl_s == 10.0


@pytest.mark.parametrize("limit", [None, 0])
def test_no_limit_and_a_zero_limit_stay_as_they_are(limit: int | None) -> None:
    shared = local_share(check(concurrency=limit, per_class=limit), 4)
    assert (shared.max_concurrency, shared.max_class_concurrency) == (limit, limit)


def test_degrade_says_so_in_the_trace() -> None:
    admission = plan(attrs(x_api_key="k-search"))
    degraded = degrade(admission, 3)
    assert degraded.check.max_concurrency == 8 // 3
    assert degraded.trace[-1] == (
        "quota store unavailable; class 'standard' takes its local share "
        "(1/3 of each limit, 3 live replicas)"
    )
    assert degraded.trace[:-1] == admission.trace


def test_share_buckets_is_the_local_shares_buckets() -> None:
    """The rule the service records a shared charge by is the one the local check uses."""
    for replicas in (1, 2, 3, 40):
        assert share_buckets((REQUESTS, TOKENS), replicas) == local_share(check(), replicas).buckets


def test_local_spend_owes_what_ran_ahead_of_the_refill() -> None:
    """REQUESTS refills 10 per second (burst 20), TOKENS 1,000 (burst 4,000)."""
    owed = LocalSpend()
    assert owed.take(0.0) == []
    for _ in range(5):  # 5 requests at once, and 5 x 300 tokens
        owed.spent("acme", (REQUESTS, TOKENS), 0.0)
    owed.spent("zeta", (REQUESTS,), 0.0)
    owed.given_back("acme", (replace(TOKENS, cost=500.0),))  # never served
    owed.given_back("acme", (replace(REQUESTS, name="unknown"),))  # nothing owed there
    # 0.2 s later: 2 requests and 200 tokens have refilled; zeta's 1 request is refilled too.
    due = dict(owed.take(0.2))
    assert set(due) == {"acme"}
    assert [(b.name, b.rate_per_s, b.burst) for b in due["acme"]] == [
        ("requests", 10.0, 20.0),  # the store's buckets, not a share
        ("tokens", 1000.0, 4000.0),
    ]
    assert [b.cost for b in due["acme"]] == pytest.approx([3.0, 800.0])
    assert owed.take(0.2) == []  # taken: forgotten here


def test_local_spend_spent_no_faster_than_the_refill_owes_nothing() -> None:
    owed = LocalSpend()
    for i in range(10):  # one request every 0.1 s: exactly the rate
        owed.spent("acme", (REQUESTS,), i * 0.1)
    assert owed.take(1.0) == []


def test_local_spend_owes_at_most_a_burst() -> None:
    owed = LocalSpend()
    for _ in range(50):
        owed.spent("acme", (REQUESTS,), 0.0)
    [(_, (bucket,))] = owed.take(0.0)
    assert bucket.cost == 20.0
