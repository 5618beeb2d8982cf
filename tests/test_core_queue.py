"""The deferral queue's order: bands, tenant fairness (VTC), hybrid key. Pure."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.queue import DeferralQueue, Waiter

_ids = itertools.count(1)
BOUNDS = {"interactive": 100, "standard": 100, "batch": 100}


def w(tenant: str, klass: str = "standard", deadline: float = 10.0, work: float = 1.0) -> Waiter:
    rank = {"interactive": 1, "standard": 2, "batch": 3}[klass]
    return Waiter(next(_ids), tenant, klass, rank, deadline, work)


def drain(queue: DeferralQueue) -> list[Waiter]:
    out = []
    while (item := queue.pop()) is not None:
        out.append(item)
    return out


def test_better_band_always_first() -> None:
    q = DeferralQueue(0.0, BOUNDS)
    for waiter in [w("a", "batch", 1.0), w("a", "standard", 5.0), w("b", "interactive", 9.0)]:
        assert q.push(waiter)
    assert [x.klass for x in drain(q)] == ["interactive", "standard", "batch"]


def test_alpha_zero_is_earliest_deadline_first_and_alpha_favours_short_work() -> None:
    edf = DeferralQueue(0.0, BOUNDS)
    long_early, short_late = w("a", deadline=1.0, work=1000), w("a", deadline=2.0, work=10)
    edf.push(long_early)
    edf.push(short_late)
    assert edf.pop() == long_early
    hybrid = DeferralQueue(0.008, BOUNDS)  # QoServe's default: 8 ms per token
    hybrid.push(long_early)
    hybrid.push(short_late)
    assert hybrid.pop() == short_late  # 2.0 + 0.08 < 1.0 + 8.0


def test_noisy_tenant_cannot_starve_a_quiet_one() -> None:
    q = DeferralQueue(0.0, {"standard": 1000})
    for i in range(50):  # noisy arrived first and has earlier deadlines
        q.push(w("noisy", deadline=float(i)))
    for i in range(5):
        q.push(w("quiet", deadline=100.0 + i))
    first_ten = [x.tenant for x in drain(q)[:10]]
    assert first_ten.count("quiet") == 5  # turns alternate while both are backlogged


def test_returning_tenant_cannot_bank_credit_while_idle() -> None:
    q = DeferralQueue(0.0, {"standard": 1000})
    for _ in range(20):
        q.push(w("busy"))
    for _ in range(10):
        q.pop()  # busy's counter is now 10
    for _ in range(5):
        q.push(w("returning"))
    order = [x.tenant for x in drain(q)[:6]]
    # Lifted to busy's counter: it shares turns instead of taking the next five in a row.
    assert order.count("returning") <= 4


def test_bounds_and_removal() -> None:
    q = DeferralQueue(0.0, {"standard": 2, "batch": 0})
    a, b, c = w("a"), w("b"), w("c")
    assert q.push(a) and q.push(b)
    assert not q.push(c)  # class full
    assert not q.push(w("a", "batch"))  # bound 0: never deferred
    assert q.waiting("standard") == 2 and len(q) == 2
    assert q.remove(a.waiter_id) == a
    assert q.remove(a.waiter_id) is None
    assert a.waiter_id not in q and b.waiter_id in q
    assert q.push(c)
    assert q.ahead_of(rank=2) == 2 and q.ahead_of(rank=1) == 0
    assert {x.tenant for x in drain(q)} == {"b", "c"}
    assert len(q) == 0 and q.waiting("standard") == 0


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["push", "pop", "remove"]),
            st.sampled_from(["t1", "t2", "t3"]),
            st.sampled_from(["interactive", "standard", "batch"]),
            st.floats(0, 100),
            st.floats(0.1, 50),
        ),
        max_size=120,
    )
)
def test_pop_never_skips_a_better_band_and_counts_stay_consistent(
    ops: list[tuple[str, str, str, float, float]],
) -> None:
    q = DeferralQueue(0.01, BOUNDS)
    live: dict[int, Waiter] = {}
    for op, tenant, klass, deadline, work in ops:
        if op == "push":
            waiter = w(tenant, klass, deadline, work)
            assert q.push(waiter)
            live[waiter.waiter_id] = waiter
        elif op == "pop":
            got = q.pop()
            if got is None:
                assert not live
                continue
            assert got.rank == min(x.rank for x in live.values())
            del live[got.waiter_id]
        elif live:
            victim = next(iter(live))
            assert q.remove(victim) is not None
            del live[victim]
        assert len(q) == len(live)
        for klass_name in BOUNDS:
            assert q.waiting(klass_name) == sum(x.klass == klass_name for x in live.values())
