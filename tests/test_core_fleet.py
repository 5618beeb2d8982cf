"""Priority and fairness across a gateway tier's replicas (`core.fleet`, and the shared
`Fairness` counters of `core.queue`), as pure rules."""

from __future__ import annotations

import pytest

from sidecar.core.fleet import (
    NOBODY,
    Elsewhere,
    backlogged,
    counter_field,
    encode_summary,
    merge_summaries,
    parse_counter_field,
    served_before,
)
from sidecar.core.queue import Fairness, HoldQueues, Waiter

COUNTERS = {(0, "noisy"): 10.0, (0, "quiet"): 2.0, (2, "noisy"): 5.0}


def counter(rank: int, tenant: str) -> float:
    return COUNTERS.get((rank, tenant), 0.0)


def test_better_bands_elsewhere_are_ahead_whatever_the_tenant() -> None:
    elsewhere = Elsewhere({}, {0: {"noisy": 3}}, counter)
    assert elsewhere.ahead_of(2, "quiet") == 3  # batch here, interactive elsewhere
    assert elsewhere.ahead_of(0, "noisy") == 0  # a tie with a replica whose id sorts after


def test_ties_go_to_the_replica_whose_id_sorts_first() -> None:
    assert Elsewhere({0: {"noisy": 3}}, {}, counter).ahead_of(0, "noisy") == 3
    assert Elsewhere({}, {0: {"noisy": 3}}, counter).ahead_of(0, "noisy") == 0


def test_in_the_same_band_only_tenants_with_smaller_counters_are_ahead() -> None:
    elsewhere = Elsewhere({0: {"noisy": 4, "quiet": 1}}, {}, counter)
    assert elsewhere.ahead_of(0, "noisy") == 5  # quiet (served less) and noisy's own (a tie)
    assert elsewhere.ahead_of(0, "quiet") == 1  # ties: quiet elsewhere, on a first replica
    assert Elsewhere({}, {0: {"noisy": 4}}, counter).ahead_of(0, "quiet") == 0  # never noisy
    assert Elsewhere({2: {"noisy": 9}}, {}, counter).ahead_of(0, "quiet") == 0  # worse band


def test_nobody_elsewhere_reserves_nothing() -> None:
    assert NOBODY.ahead_of(0, "anyone") == 0


def test_summaries_round_trip_and_sum_over_replicas() -> None:
    one = encode_summary({"m": {0: {"a": 2}}, "n": {1: {"b": 1}}})
    two = encode_summary({"m": {0: {"a": 1, "c": 4}}})
    assert encode_summary({}) == ""
    merged = merge_summaries([one, two, ""])
    assert merged == {"m": {0: {"a": 3, "c": 4}}, "n": {1: {"b": 1}}}
    assert backlogged(merged) == {0: {"a", "c"}, 1: {"b"}}


def test_a_summary_that_cannot_be_read_is_skipped_not_fatal() -> None:
    good = encode_summary({"m": {0: {"a": 1}}})
    assert merge_summaries(["{not json", '{"m": 3}', '["x"]', good]) == {"m": {0: {"a": 1}}}


def test_counter_fields_keep_tenants_with_colons() -> None:
    assert parse_counter_field(counter_field(2, "team:a")) == (2, "team:a")
    assert parse_counter_field("x:y") is None
    assert parse_counter_field("nocolon") is None


def test_shared_fairness_records_what_it_changes_and_keeps_it_across_an_exchange() -> None:
    fairness = Fairness(shared=True)
    fairness.arrive(0, "a")
    fairness.leave(0, "a", charged_work=3.0)
    sent = fairness.take_ops()
    assert sent == [("+", 0, "a", 3.0)]
    # While the exchange is out, more work is charged here...
    fairness.arrive(0, "a")
    fairness.leave(0, "a", charged_work=2.0)
    # ...the fleet answers with the counters including what was sent (and others' work)...
    fairness.adopt({(0, "a"): 3.0 + 10.0, (0, "b"): 4.0}, {})
    # ...and the work charged meanwhile is applied again on top: nothing is lost.
    assert fairness.counter(0, "a") == 15.0
    assert fairness.counter(0, "b") == 4.0
    assert fairness.take_ops() == [("+", 0, "a", 2.0)]


def test_a_tenant_backlogged_on_another_replica_is_not_lifted_there() -> None:
    fairness = Fairness(shared=True)
    fairness.adopt({(0, "noisy"): 50.0, (0, "quiet"): 1.0}, {0: {"quiet"}})
    fairness.arrive(0, "quiet")  # waiting elsewhere: not idle, keeps its counter
    assert fairness.counter(0, "quiet") == 1.0
    fairness.arrive(0, "idle")  # idle everywhere: lifted to the backlogged floor (quiet's)
    assert fairness.counter(0, "idle") == 1.0
    assert ("^", 0, "idle", 1.0) in fairness.take_ops()


def test_failed_exchange_ops_go_out_with_the_next() -> None:
    fairness = Fairness(shared=True)
    fairness.arrive(0, "a")
    fairness.leave(0, "a", charged_work=1.0)
    lost = fairness.take_ops()
    fairness.arrive(0, "a")
    fairness.leave(0, "a", charged_work=2.0)
    fairness.restore_ops(lost)
    assert fairness.take_ops() == [("+", 0, "a", 1.0), ("+", 0, "a", 2.0)]


def test_a_local_fairness_records_nothing() -> None:
    fairness = Fairness()
    fairness.arrive(0, "a")
    fairness.leave(0, "a", charged_work=1.0)
    assert fairness.take_ops() == []


def test_hold_queues_summary_counts_per_model_band_and_tenant() -> None:
    queues = HoldQueues(0.0, {"i": 10, "b": 10})
    for n, (tenant, klass, rank, model) in enumerate(
        [("a", "i", 0, "m"), ("a", "i", 0, "m"), ("b", "b", 2, "m"), ("a", "b", 2, "n")]
    ):
        assert queues.push(Waiter(n, tenant, klass, rank, 1.0 + n, 1.0, model)).queued
    assert queues.summary() == {"m": {0: {"a": 2}, 2: {"b": 1}}, "n": {2: {"a": 1}}}


def test_of_another_tenants_backlog_only_the_turns_before_mine_are_ahead() -> None:
    """A quiet tenant lifted to a noisy tenant's counter (a tie) waits for one of the noisy
    tenant's requests, not its whole backlog; two turns behind, for two."""
    tied = {(0, "noisy"): 7.0, (0, "quiet"): 7.0}
    elsewhere = Elsewhere({0: {"noisy": 200}}, {}, lambda r, t: tied.get((r, t), 0.0))
    assert elsewhere.ahead_of(0, "quiet") == 1  # the tie goes to the first replica
    assert Elsewhere({}, {0: {"noisy": 200}}, elsewhere.counter).ahead_of(0, "quiet") == 0
    behind = {(0, "noisy"): 5.0, (0, "quiet"): 7.0}
    two = Elsewhere({}, {0: {"noisy": 200}}, lambda r, t: behind.get((r, t), 0.0))
    assert two.ahead_of(0, "quiet") == 2  # noisy at 5 and 6 go first, then quiet at 7
    heavy = Elsewhere(
        {}, {0: {"noisy": 200}}, two.counter, lambda r, t: 4.0 if t == "noisy" else 1.0
    )
    assert heavy.ahead_of(0, "quiet") == 1  # noisy's requests weigh 4: one turn (5 -> 9)
    assert two.ahead_of(0, "noisy") == 0  # its own, on a replica that loses ties


def test_served_before_counts_turns_and_ties() -> None:
    assert served_before(10, 0.0, 3.0, 1.0, ties_win=False) == 3  # at 0, 1, 2
    assert served_before(10, 0.0, 3.0, 1.0, ties_win=True) == 4  # and the tie at 3
    assert served_before(2, 0.0, 3.0, 1.0, ties_win=True) == 2  # only two wait
    assert served_before(5, 4.0, 3.0, 1.0, ties_win=True) == 0  # served more than me
    assert served_before(5, 3.0, 3.0, 1.0, ties_win=False) == 0


def test_fairness_learns_each_tenants_work_per_waiter() -> None:
    fairness = Fairness()
    assert fairness.work_of(0, "a") == 1.0  # never seen
    fairness.arrive(0, "a", 40.0)
    assert fairness.work_of(0, "a") == 40.0
    fairness.arrive(0, "a", 8.0)
    assert 8.0 < fairness.work_of(0, "a") < 40.0


def test_a_tenant_never_seen_here_is_charged_one_unit_over_its_weight() -> None:
    """In a gateway tier a tenant only another replica holds has no work seen here: its
    waiters are counted at one unit over its weight, so the turns it takes before mine
    follow its weight (3 of its waiters go before a tenant one unit ahead, not 1)."""
    fairness = Fairness(shared=True)
    fairness.unseen_charge = {"heavy": 1 / 3}
    assert fairness.work_of(2, "heavy") == pytest.approx(1 / 3)
    assert fairness.work_of(2, "light") == 1.0
    elsewhere = Elsewhere({}, {2: {"heavy": 5}}, lambda r, t: {"light": 1.0}.get(t, 0.0),
                          fairness.work_of)  # fmt: skip
    assert elsewhere.ahead_in_band(2, "light") == 3  # at 0, 1/3 and 2/3: below my 1
    fairness.arrive(2, "heavy", 0.5)  # seen here: its own moving mean from now on
    assert fairness.work_of(2, "heavy") == 0.5
