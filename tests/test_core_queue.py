"""The deferral queues' order: per model; bands, tenant fairness (VTC), hybrid key. Pure."""

from __future__ import annotations

import itertools
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.queue import DeferralQueue, HoldQueues, Waiter

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


# -- one queue per model, fairness shared across them -----------------------------------------


def mw(tenant: str, model: str, klass: str = "standard", deadline: float = 10.0) -> Waiter:
    return replace(w(tenant, klass, deadline), model=model)


def drain_model(queues: HoldQueues, model: str) -> list[Waiter]:
    out = []
    while (item := queues.pop(model)) is not None:
        out.append(item)
    return out


def test_a_tenants_counter_is_one_number_across_models() -> None:
    q = HoldQueues(0.0, {"standard": 1000})
    for _ in range(10):
        q.push(mw("noisy", "a"))  # noisy alone on model a
    for i in range(5):  # both on model b, arriving while noisy's counter is still 0
        q.push(mw("noisy", "b", deadline=float(i)))
        q.push(mw("quiet", "b", deadline=100.0 + i))
    for _ in range(5):
        assert q.pop("a") is not None  # noisy was given 5 units of work on model a
    # On b, noisy has already had its turns: quiet's five go first, despite later deadlines.
    # (Counters kept per model would alternate the two.)
    assert [x.tenant for x in drain_model(q, "b")] == ["quiet"] * 5 + ["noisy"] * 5
    assert q.fairness.counter(2, "noisy") == 10 and q.fairness.counter(2, "quiet") == 5


def test_a_tenant_waiting_on_one_model_is_not_lifted_when_it_queues_for_another() -> None:
    q = HoldQueues(0.0, {"standard": 1000})
    q.push(mw("x", "a"))
    q.push(mw("y", "a"))
    assert q.pop("a") is not None and q.pop("a") is not None  # both counters at 1
    q.push(mw("x", "a"))  # x backlogged (counter 1)
    for _ in range(3):
        q.push(mw("y", "b"))
        q.pop("b")  # y alone on b: its counter climbs to 4
    q.push(mw("x", "b"))  # x already backlogged: keeps 1, is not lifted to y's 4
    assert q.fairness.counter(2, "x") == 1


def test_a_blocked_model_does_not_block_another_and_is_not_ahead_of_it() -> None:
    q = HoldQueues(0.0, BOUNDS)
    blocked = [mw("a", "saturated", "interactive", deadline=1.0) for _ in range(3)]
    for waiter in blocked:
        assert q.push(waiter).queued
    other = mw("b", "idle", "batch", deadline=50.0)
    assert q.push(other).queued
    # A new arrival for `idle` queues behind `idle`'s waiters only, whatever its band.
    assert q.ahead_of("idle", rank=1) == 0 and q.ahead_of("idle", rank=3) == 1
    assert q.ahead_of("saturated", rank=3) == 3 and q.waiting_by_rank("idle") == {3: 1}
    assert q.pop("idle") == other  # served although better bands wait on the other model
    assert q.models() == ["saturated"]  # an empty model queue is dropped
    assert len(q) == 3 and other.waiter_id not in q and blocked[0].waiter_id in q


def test_a_class_bound_counts_its_waiters_over_every_model() -> None:
    q = HoldQueues(0.0, {"standard": 2})
    first, second = mw("a", "m1", deadline=1.0), mw("a", "m2", deadline=2.0)
    for waiter in (first, second):
        pushed = q.push(waiter)
        assert pushed.queued and pushed.displaced is None
    third = mw("a", "m3", deadline=3.0)
    pushed = q.push(third)  # the class holds 2, wherever they wait: one of them makes room
    assert pushed.queued and pushed.displaced is not None
    assert q.waiting("standard") == 2 and pushed.displaced.waiter_id not in q
    assert q.remove(pushed.displaced.waiter_id) is None  # already out


def test_a_full_class_displaces_the_oldest_of_the_tenant_holding_most() -> None:
    q = HoldQueues(0.0, {"batch": 4, "standard": 10})
    noisy = [mw("noisy", "m", "batch", deadline=float(d)) for d in (5, 1, 3)]
    quiet = mw("quiet", "m", "batch", deadline=0.5)  # older than any of noisy's
    for waiter in [*noisy, quiet]:
        assert q.push(waiter).queued
    other_class = mw("noisy", "m", "standard", deadline=0.1)
    assert q.push(other_class).displaced is None  # its own class is not full
    pushed = q.push(mw("quiet", "m", "batch", deadline=9.0))
    # The flooding tenant loses its own earliest deadline, never the quiet tenant's waiter,
    # nor a waiter of another class.
    assert pushed.queued and pushed.displaced == noisy[1]
    assert quiet.waiter_id in q and other_class.waiter_id in q
    # A full queue bounds memory; it does not turn the band newest-first as an expiry does.
    assert q.queue("m").newest_first() == frozenset()
    assert q.waiting("batch") == 4


def test_a_full_class_displaces_on_the_model_holding_most_when_none_waits_here() -> None:
    q = HoldQueues(0.0, {"batch": 3})
    m1 = mw("a", "m1", "batch", deadline=1.0)
    m2 = [mw("b", "m2", "batch", deadline=float(d)) for d in (4, 2)]
    for waiter in [m1, *m2]:
        assert q.push(waiter).queued
    pushed = q.push(mw("c", "m3", "batch"))
    assert pushed.queued and pushed.displaced == m2[1]  # m2 holds the most of the class
    assert q.models() == ["m1", "m2", "m3"]


def test_a_request_relegated_into_a_full_class_displaces_nobody() -> None:
    q = HoldQueues(0.0, {"batch": 1})
    own = mw("a", "m", "batch", deadline=1.0)
    assert q.push(own).queued
    pushed = q.push(mw("b", "m", "batch", deadline=9.0), displace=False)
    assert not pushed.queued and pushed.displaced is None and own.waiter_id in q


def test_a_class_bound_of_zero_holds_nothing() -> None:
    q = HoldQueues(0.0, {"batch": 0})
    pushed = q.push(mw("a", "m", "batch"))
    assert not pushed.queued and pushed.displaced is None and len(q) == 0


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["push", "pop", "remove"]),
            st.sampled_from(["t1", "t2"]),
            st.sampled_from(["interactive", "standard", "batch"]),
            st.sampled_from(["m1", "m2", "m3"]),
        ),
        max_size=120,
    )
)
def test_model_queues_serve_each_model_by_band_and_count_consistently(
    ops: list[tuple[str, str, str, str]],
) -> None:
    q = HoldQueues(0.01, BOUNDS)
    live: dict[int, Waiter] = {}
    for op, tenant, klass, model in ops:
        if op == "push":
            waiter = mw(tenant, model, klass)
            pushed = q.push(waiter)
            assert pushed.queued
            if pushed.displaced is not None:  # its class was full: it made room
                assert pushed.displaced.klass == klass
                del live[pushed.displaced.waiter_id]
            live[waiter.waiter_id] = waiter
        elif op == "pop":
            got = q.pop(model)
            mine = [x for x in live.values() if x.model == model]
            if got is None:
                assert not mine
                continue
            assert got.model == model and got.rank == min(x.rank for x in mine)
            del live[got.waiter_id]
        elif live:
            victim = next(iter(live))
            assert q.remove(victim) is not None
            del live[victim]
        assert len(q) == len(live)
        assert q.models() == sorted({x.model for x in live.values()})
        for rank in (1, 2, 3):
            expected = sum(x.model == model and x.rank <= rank for x in live.values())
            assert q.ahead_of(model, rank) == expected


# -- adaptive LIFO: an expiry turns the band newest-first until it is empty -----------------


def test_an_expiry_turns_its_band_newest_first_until_the_band_is_empty() -> None:
    q = HoldQueues(0.0, BOUNDS)
    old = [replace(w("a", "batch", deadline=float(i)), model="m") for i in range(4)]
    for waiter in old:
        assert q.push(waiter).queued
    assert q.queue("m").peek() == old[0]  # oldest (earliest deadline) first
    assert q.remove(old[0].waiter_id, expired=True) == old[0]
    assert q.queue("m").newest_first() == frozenset({3})
    new = replace(w("a", "batch", deadline=9.0), model="m")
    q.push(new)
    assert [q.pop("m") for _ in range(2)] == [new, old[3]]  # newest first now
    assert q.pop("m") == old[2] and q.pop("m") == old[1]
    assert q.queue("m") is None  # empty: nothing is standing any more
    again = [replace(w("a", "batch", deadline=float(i)), model="m") for i in (5, 6)]
    for waiter in again:
        q.push(waiter)
    assert q.queue("m").newest_first() == frozenset()
    assert q.pop("m") == again[0]  # oldest first again


def test_an_expiry_its_clients_wait_set_leaves_the_band_as_it_was() -> None:
    """A waiter whose deadline was its client's wait, before its class's budget, shows only
    that its client waits less: its expiry is read as a cancellation."""
    q = HoldQueues(0.0, BOUNDS)
    cut = replace(w("a", "batch", deadline=1.0), model="m", client_cut=True)
    own = [replace(w("a", "batch", deadline=float(i)), model="m") for i in (2, 3)]
    for waiter in (cut, *own):
        assert q.push(waiter).queued
    assert q.remove(cut.waiter_id, expired=True) == cut
    assert q.queue("m").newest_first() == frozenset()
    assert q.queue("m").peek() == own[0]  # still oldest first
    assert q.remove(own[0].waiter_id, expired=True) == own[0]
    assert q.queue("m").newest_first() == frozenset({3})  # its class's budget: standing


def test_a_cancelled_waiter_is_no_expiry_and_other_bands_keep_their_order() -> None:
    q = DeferralQueue(0.0, BOUNDS)
    std = [w("a", "standard", deadline=float(i)) for i in range(3)]
    bat = [w("a", "batch", deadline=float(i)) for i in range(3)]
    for waiter in std + bat:
        q.push(waiter)
    q.remove(std[0].waiter_id)  # the client left: says nothing about the queue standing
    assert q.newest_first() == frozenset()
    q.remove(bat[0].waiter_id, expired=True)
    assert q.newest_first() == frozenset({3})
    assert [x.waiter_id for x in drain(q)] == [
        std[1].waiter_id,
        std[2].waiter_id,
        bat[2].waiter_id,
        bat[1].waiter_id,
    ]


def test_newest_first_changes_the_order_within_a_tenant_not_the_tenants_turns() -> None:
    q = DeferralQueue(0.0, {"standard": 1000})
    noisy = [w("noisy", deadline=float(i)) for i in range(20)]
    quiet = [w("quiet", deadline=100.0 + i) for i in range(3)]
    for waiter in noisy + quiet:
        q.push(waiter)
    q.remove(noisy[0].waiter_id, expired=True)
    first = drain(q)[:6]
    assert [x.tenant for x in first].count("quiet") == 3  # turns alternate as before
    assert [x for x in first if x.tenant == "noisy"] == noisy[:-4:-1]  # its newest first
    assert [x for x in first if x.tenant == "quiet"] == quiet[::-1]


def test_a_new_arrival_in_a_newest_first_band_is_not_behind_its_own_tenants_waiters() -> None:
    q = DeferralQueue(0.0, BOUNDS)
    mine = [w("a", "batch", deadline=float(i)) for i in range(5)]
    for waiter in mine:
        q.push(waiter)
    q.push(w("b", "interactive"))
    assert q.ahead_view().ahead_of(3, "a") == 6  # a better band's one, and its own 5
    q.remove(mine[0].waiter_id, expired=True)
    assert q.ahead_view().ahead_of(3, "a") == 1  # only the better band's
    assert q.ahead_view().ahead_of(2, "c") == 1  # another band: unchanged


def test_left_waiters_do_not_pile_up_under_a_standing_backlog() -> None:
    """Leaving is lazy; a tenant that is never empty must not keep every entry it had."""
    q = DeferralQueue(0.0, {"standard": 100_000})
    for i in range(2000):
        q.push(w("a", deadline=float(i)))
        if i >= 10:
            assert q.pop() is not None  # a backlog of about 10, for ever
    waiting = q._bands[2].per_tenant["a"]
    assert waiting.count == 10
    assert len(waiting.oldest) <= 2 * 10 + 17 and len(waiting.newest) <= 2 * 10 + 17


def test_a_band_has_a_pace_once_it_stands_and_loses_it_when_empty() -> None:
    from sidecar.core.queue import PACE_KEPT

    q = DeferralQueue(0.0, BOUNDS)
    waiters = [w("a", "batch", deadline=100.0 + i) for i in range(PACE_KEPT + 10)]
    for waiter in waiters:
        q.push(waiter, now_s=0.0)
    q.push(w("b", "interactive"), now_s=0.0)
    q.pop(now_s=1.0)  # the interactive one
    assert q.paces(2.0) == {}  # nothing expired: no band stands, none has a pace
    q.pop(now_s=2.0)
    q.pop(now_s=4.0)
    q.remove(waiters[-1].waiter_id, expired=True)
    pace = q.paces(6.0)
    assert list(pace) == [3]  # the standing band only (the interactive one is empty)
    assert (pace[3].let_go, pace[3].span_s) == (2, 6.0)  # 2 let go since it got busy at 0
    assert pace[3].wait_s(3) == 12.0  # 4 to go, one per 3 s
    for i in range(PACE_KEPT):  # then it quickens: only the last PACE_KEPT let-gos count
        q.pop(now_s=10.0 + i * 0.1)
    fast = q.paces(10.0 + PACE_KEPT * 0.1)[3]
    assert fast.let_go == PACE_KEPT - 1 and abs(fast.span_s - PACE_KEPT * 0.1) < 1e-9
    while q.pop(now_s=20.0) is not None:
        pass
    q.push(w("a", "batch"), now_s=30.0)
    assert q.paces(31.0) == {}  # emptied: its pace starts again, and it no longer stands


def test_a_standing_band_that_lets_nobody_go_predicts_a_growing_wait() -> None:
    from sidecar.core.signals import BandPace, Signals

    q = DeferralQueue(0.0, BOUNDS)
    for i, tenant in enumerate(["a", "b", "c"]):
        q.push(w(tenant, "batch", deadline=float(i)), now_s=0.0)
    q.remove(next(iter(q)).waiter_id, expired=True)
    for now, expected in ((1.0, 2.0), (4.0, 8.0)):  # 1 of the others ahead; none went
        signals = Signals(None, q.waiting_by_rank(), here=q.ahead_view(), paces=q.paces(now))
        assert signals.band_wait_s(3, "c") == expected
    assert Signals(None).band_wait_s(3, "c") == 0.0  # no pace: no bound
    assert BandPace(0, 0.0).wait_s(5) == 0.0


def test_weighted_tenants_are_given_work_in_proportion_to_their_weights() -> None:
    """Weighted VTC: while both are backlogged, a tenant of weight 3 is let go three times as
    often as one of weight 1 for the same work, and three times the work for the same turns."""
    q = DeferralQueue(0.0, {"standard": 1000})
    for i in range(40):
        q.push(replace(w("big", deadline=float(i)), weight=3.0))
        q.push(replace(w("small", deadline=float(i)), weight=1.0))
    first = [popped.tenant for _ in range(40) if (popped := q.pop()) is not None]
    assert first.count("big") == 30 and first.count("small") == 10
    assert q.fairness.counter(2, "big") == q.fairness.counter(2, "small") == 10.0
    heavy = DeferralQueue(0.0, {"standard": 1000})
    for i in range(20):
        heavy.push(replace(w("big", deadline=float(i), work=3.0), weight=3.0))
        heavy.push(replace(w("small", deadline=float(i), work=1.0), weight=1.0))
    assert [x.tenant for x in drain(heavy)[:20]].count("big") == 10  # equal turns, 3x the work


def test_a_weight_leaves_the_order_within_a_tenant_and_between_bands_alone() -> None:
    q = DeferralQueue(0.0, BOUNDS)
    late, early = w("a", deadline=9.0), w("a", deadline=1.0)
    for waiter in (replace(late, weight=5.0), replace(early, weight=5.0), w("b", "interactive")):
        q.push(waiter)
    assert [x.waiter_id for x in drain(q)][1:] == [early.waiter_id, late.waiter_id]
