"""Table tests of the admission state machine (core.admission): every step, a frozen clock, no
event loop and no sleeps. The load verdict's own table is in test_core_overload.py."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from types import MappingProxyType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core import admission
from sidecar.core.admission import (
    Answer,
    Hold,
    HoldOutcome,
    LoadAction,
    TakeQuota,
    judge_load,
)
from sidecar.core.compiled import compile_policy
from sidecar.core.decide import Admission
from sidecar.core.fleet import Elsewhere
from sidecar.core.load import SignalState
from sidecar.core.signals import (
    QUOTA_ONLY,
    SIGNAL_READING,
    ModelSignals,
    Reader,
    Signals,
    may_go,
)
from sidecar.core.types import LimitKind, QuotaResult, Reason, RequestAttributes
from sidecar.policy.model import (
    ClassPolicy,
    FailMode,
    OverloadPolicy,
    Policy,
    StaleAction,
)
from tests.core_fixtures import make_policy

FRESH, STALE, MISSING = SignalState.FRESH, SignalState.STALE, SignalState.MISSING
INFER = "/v2/models/simgpu/infer"
NOW = 1000.0  # the frozen clock


def policy_with(
    standard: OverloadPolicy | None = None,
    batch: OverloadPolicy | None = None,
    relegate: bool = False,
    max_wait_ms: int = 300,
) -> Policy:
    policy = make_policy()
    classes = dict(policy.classes)
    classes["standard"] = replace(
        classes["standard"],
        max_wait_ms=max_wait_ms,
        overload=standard or OverloadPolicy(admit_below=4, shed_above=40),
        relegate_to="batch" if relegate else None,
    )
    classes["batch"] = replace(classes["batch"], overload=batch or OverloadPolicy(100))
    return replace(policy, classes=MappingProxyType(classes))


def planned(policy: Policy, path: str = INFER) -> Admission:
    attrs = RequestAttributes("POST", path, {"x-api-key": "k-search", "x-qos-class": "standard"})
    step = admission.plan(attrs, compile_policy(policy))
    assert isinstance(step, Admission)
    return step


def signals(depth: int, drain: float = 20.0, **kwargs: object) -> Signals:
    state = kwargs.pop("state", FRESH)
    in_flight = kwargs.pop("in_flight", None)
    waiting = kwargs.pop("waiting", {})
    assert not kwargs
    return Signals(ModelSignals(state, depth, drain, in_flight), waiting)  # type: ignore[arg-type]


ALLOWED = QuotaResult(True, lease_id="L1", in_flight=1, class_in_flight=1)


# -- reading the signal; may the head go ---------------------------------------------------------


def test_every_signal_state_has_a_reading_for_every_reader() -> None:
    combos = set(itertools.product(SignalState, StaleAction, Reader))
    assert set(SIGNAL_READING) == combos


def klass(
    admit_below: int = 8,
    on_stale: StaleAction = StaleAction.SATURATED,
    max_in_flight: int | None = None,
) -> ClassPolicy:
    overload = OverloadPolicy(admit_below, 32, on_stale, max_in_flight=max_in_flight)
    return ClassPolicy("standard", 2, 2000, 500, 2, FailMode.OPEN, overload=overload)


@pytest.mark.parametrize(
    ("policy", "model", "goes"),
    [
        (None, ModelSignals(STALE, 1000, 0.0), True),  # class gone from the policy
        (replace(klass(), overload=None), ModelSignals(FRESH, 1000, 0.0), True),
        (klass(), ModelSignals(FRESH, 7, 10.0), True),
        (klass(), ModelSignals(FRESH, 8, 10.0), False),  # at admit_below
        (klass(max_in_flight=4), ModelSignals(FRESH, 0, 10.0, 3), True),
        (klass(max_in_flight=4), ModelSignals(FRESH, 0, 10.0, 4), False),  # at the cap
        (klass(max_in_flight=4), ModelSignals(FRESH, 0, 10.0, None), True),  # never said
        # an old signal lets nobody go early, whatever on_stale says for arrivals
        (klass(), ModelSignals(STALE, 0, 10.0), False),
        (klass(on_stale=StaleAction.ADMIT), ModelSignals(STALE, 0, 10.0), False),
        (klass(on_stale=StaleAction.ADMIT), ModelSignals(MISSING, 0, 10.0), False),
    ],
)
def test_may_the_head_go(policy: ClassPolicy | None, model: ModelSignals, goes: bool) -> None:
    assert may_go(policy, model) is goes


@given(
    depth=st.integers(0, 50),
    in_flight=st.one_of(st.none(), st.integers(0, 20)),
    admit_below=st.integers(1, 30),
    cap=st.one_of(st.none(), st.integers(1, 20)),
)
def test_one_room_rule_for_arrivals_and_the_head(
    depth: int, in_flight: int | None, admit_below: int, cap: int | None
) -> None:
    """With a fresh signal and nobody waiting, an arrival is admitted at once exactly when a
    held request at the head would be let go: the same rule, written once."""
    policy = klass(admit_below, max_in_flight=cap)
    verdict = judge_load(policy, FRESH, depth, 10.0, 0, in_flight=in_flight)
    head = may_go(policy, ModelSignals(FRESH, depth, 10.0, in_flight))
    assert (verdict.action is LoadAction.ADMIT) is head


# -- plan and judge: before any state is touched ------------------------------------------------


def test_shed_for_load_answers_503_and_takes_no_quota() -> None:
    first = admission.judge(planned(policy_with()), signals(60, drain=20.0), policy_with())
    # The tenant has buckets: its quota is looked at first (taking nothing).
    assert isinstance(first, admission.QuotaFirst)
    for seen in (ALLOWED, None):  # within its quota, or the store cannot say
        step = admission.on_peek(first, seen)
        assert step.give_back is None and step.decision.lease is None
        assert (step.decision.status, step.decision.reason) == (503, Reason.OVERLOADED)
        assert json.loads(step.decision.body)["retry_after_ms"] == 2850  # 57 ahead at 20/s


def test_a_request_over_its_quota_is_told_so_even_when_the_load_sheds_it() -> None:
    """An anonymous flood over its 2 req/s got 503s for load and learnt nothing of its quota
    (issue 12): it gets the quota's 429 and Retry-After."""
    first = admission.judge(planned(policy_with()), signals(60, drain=20.0), policy_with())
    assert isinstance(first, admission.QuotaFirst)
    over = QuotaResult(False, denied_by=LimitKind.BUCKET, denied_bucket="rps", retry_after_s=0.4)
    step = admission.on_peek(first, over)
    assert (step.decision.status, step.decision.reason) == (429, Reason.OVER_RATE)
    assert json.loads(step.decision.body)["retry_after_ms"] == 400
    assert step.decision.lease is None and step.give_back is None


def test_a_tenant_without_limits_is_shed_for_load_without_a_store_call() -> None:
    policy = policy_with()
    tenants = {
        name: replace(t, buckets=(), max_concurrency=None, max_concurrency_per_class={})
        for name, t in policy.tenants.items()
    }
    policy = replace(policy, tenants=MappingProxyType(tenants))
    step = admission.judge(planned(policy), signals(60, drain=20.0), policy)
    assert isinstance(step, Answer) and step.decision.status == 503


@pytest.mark.parametrize(
    ("sig", "action"),
    [
        (signals(0), LoadAction.ADMIT),
        (signals(6), LoadAction.DEFER),  # held: not in flight until let go
        (signals(0, waiting={2: 1}), LoadAction.DEFER),  # behind its band's waiter
        (signals(0, waiting={3: 5}), LoadAction.ADMIT),  # a worse band does not count
        (QUOTA_ONLY, LoadAction.ADMIT),  # no view of Triton
    ],
)
def test_judge_asks_for_quota(sig: Signals, action: LoadAction) -> None:
    policy = policy_with()
    step = admission.judge(planned(policy), sig, policy)
    assert isinstance(step, TakeQuota)
    assert step.verdict.action is action
    assert step.holds is (action is LoadAction.DEFER)
    # Never in the quota call: the answer asks for the model's count (one call per decision).
    assert step.admission.check.count_model_now is False
    assert step.admission.trace[-1] == step.verdict.why


def test_a_request_for_no_model_is_judged_on_quota_only() -> None:
    policy = policy_with()
    step = admission.judge(planned(policy, "/v2/health/ready"), signals(1000), policy)
    assert isinstance(step, TakeQuota)
    assert step.verdict is admission.QUOTA_ONLY_VERDICT


def test_relegated_at_arrival_takes_its_quota_in_the_new_class() -> None:
    policy = policy_with(relegate=True)
    step = admission.judge(planned(policy), signals(50), policy)  # over shed_above 40
    assert isinstance(step, TakeQuota)
    assert (step.admission.klass.name, step.admission.check.klass) == ("batch", "batch")
    assert step.admission.relegated and step.verdict.action is LoadAction.ADMIT


# -- the quota's answer -------------------------------------------------------------------------


def take(policy: Policy, sig: Signals) -> TakeQuota:
    step = admission.judge(planned(policy), sig, policy)
    assert isinstance(step, TakeQuota)
    return step


@pytest.mark.parametrize(
    ("fail_mode", "status", "reason"),
    [
        (FailMode.OPEN, 200, Reason.ADMITTED_FAIL_OPEN),
        (FailMode.CLOSED, 503, Reason.STATE_UNAVAILABLE),
    ],
)
def test_store_down_follows_the_fail_mode_and_never_holds(
    fail_mode: FailMode, status: int, reason: Reason
) -> None:
    policy = policy_with()
    standard = replace(policy.classes["standard"], on_state_error=fail_mode)
    policy = replace(policy, classes=MappingProxyType({**policy.classes, "standard": standard}))
    step = admission.on_quota(take(policy, signals(6)), None, NOW)  # would have been held
    assert isinstance(step, Answer)
    assert (step.decision.status, step.decision.reason) == (status, reason)
    assert step.note_admitted is None and not step.count_for_model


def test_over_quota_is_answered_without_a_hold() -> None:
    denied = QuotaResult(False, denied_by=None, denied_bucket="requests", retry_after_s=0.4)
    step = admission.on_quota(take(policy_with(), signals(6)), denied, NOW)
    assert isinstance(step, Answer) and step.decision.status == 429


def test_admitted_at_once_is_noted_for_its_model() -> None:
    step = admission.on_quota(take(policy_with(), signals(0)), ALLOWED, NOW)
    assert isinstance(step, Answer)
    assert step.decision.reason is Reason.ADMITTED and step.note_admitted == "simgpu"
    assert step.count_for_model  # after the answer, by the service


def test_admitted_but_deferred_is_held_until_its_deadline() -> None:
    step = admission.on_quota(take(policy_with(max_wait_ms=300), signals(6)), ALLOWED, NOW)
    assert isinstance(step, Hold)
    assert (step.started_s, step.deadline_s) == (NOW, NOW + 0.3)
    assert step.max_wait_s == pytest.approx(0.3)
    assert step.decision.lease is not None and step.decision.lease.lease_id == "L1"


# -- the hold's end -----------------------------------------------------------------------------


def hold(policy: Policy) -> Hold:
    step = admission.on_quota(take(policy, signals(6)), ALLOWED, NOW)
    assert isinstance(step, Hold)
    return step


def test_let_go_is_admitted_as_deferred_and_counted_for_its_model() -> None:
    policy = policy_with()
    answer = admission.on_hold_end(hold(policy), HoldOutcome.LET_GO, signals(6), policy, 0.12)
    assert answer.decision.reason is Reason.ADMITTED_DEFERRED
    assert answer.count_for_model and answer.give_back is None
    assert answer.note_admitted is None  # the Deferrer counted it when it let it go
    assert answer.decision.trace[-2] == "held 0.120s, then Triton had room"


def test_expired_and_relegated_with_room_below_keeps_its_lease_class() -> None:
    policy = policy_with(relegate=True)
    answer = admission.on_hold_end(hold(policy), HoldOutcome.EXPIRED, signals(6), policy, 0.3)
    assert answer.decision.reason is Reason.ADMITTED_RELEGATED
    assert answer.decision.klass == "batch" and answer.decision.triton_priority == 3
    lease = answer.decision.lease
    assert lease is not None and lease.klass == "standard"  # released where it was taken
    assert answer.note_admitted == "simgpu" and answer.count_for_model


def test_expired_and_relegated_without_room_below_is_shed_and_gives_back() -> None:
    policy = policy_with(relegate=True, batch=OverloadPolicy(admit_below=2))
    answer = admission.on_hold_end(hold(policy), HoldOutcome.EXPIRED, signals(5), policy, 0.3)
    assert (answer.decision.status, answer.decision.klass) == (503, "batch")
    assert any("relegated from 'standard' to 'batch'" in s for s in answer.decision.trace)
    assert answer.give_back is not None and answer.give_back.lease is not None
    assert [b.name for b in answer.give_back.buckets] == ["requests", "tokens"]


def test_expired_and_not_sheddable_is_admitted_anyway() -> None:
    policy = policy_with(standard=OverloadPolicy(admit_below=4, shed_above=None))
    answer = admission.on_hold_end(hold(policy), HoldOutcome.EXPIRED, signals(6), policy, 0.3)
    assert answer.decision.admitted and answer.give_back is None
    assert answer.decision.trace[-2] == "held 0.300s; not sheddable: admitted"
    assert answer.note_admitted == "simgpu" and answer.count_for_model


def test_expired_without_relegation_is_shed_with_the_drain_retry_after() -> None:
    policy = policy_with()
    answer = admission.on_hold_end(hold(policy), HoldOutcome.EXPIRED, signals(6), policy, 0.3)
    assert (answer.decision.status, answer.decision.reason) == (503, Reason.OVERLOADED)
    assert json.loads(answer.decision.body)["retry_after_ms"] == 150  # 3 ahead at 20/s
    assert answer.give_back is not None and answer.give_back.tenant == "search"


def test_cancelled_while_held_gives_everything_back() -> None:
    policy = policy_with()
    held = hold(policy)
    answer = admission.on_hold_end(held, HoldOutcome.CANCELLED, signals(6), policy, 0.05)
    assert answer.give_back == held.give_back()
    assert answer.give_back is not None and answer.give_back.lease == held.decision.lease


# -- the model rule: a model Triton does not serve ----------------------------------------------


@pytest.mark.parametrize(
    ("served", "path", "status"),
    [
        (frozenset({"simgpu"}), "/v2/models/simgpu/infer", None),  # served: on to the quota
        (frozenset({"simgpu"}), "/v2/models/simgpux/infer", 404),  # a typo, known for sure
        (None, "/v2/models/simgpux/infer", None),  # not known (stale, restarting): no 404
        (frozenset({"simgpu"}), "/v2/health/ready", None),  # no model named: quota only
    ],
)
def test_a_model_triton_does_not_serve_is_404_only_when_that_is_known(
    served: frozenset[str] | None, path: str, status: int | None
) -> None:
    policy = policy_with()
    step = admission.judge(planned(policy, path), replace(signals(0), served=served), policy)
    if status is None:
        assert isinstance(step, TakeQuota)
        return
    assert isinstance(step, Answer) and step.give_back is None
    decision = step.decision
    assert decision.status == 404 and decision.reason is Reason.UNKNOWN_MODEL
    assert "retry-after" not in dict(decision.headers)
    body = json.loads(decision.body)
    assert body["reason"] == "unknown_model" and body["error"] == "not_found"
    assert body["retry_after_ms"] is None


@pytest.mark.parametrize("kind", [LimitKind.CONCURRENCY, LimitKind.CLASS_CONCURRENCY])
def test_a_concurrency_refusal_waits_for_releases_until_the_grace_ends(kind: LimitKind) -> None:
    """A finished request's completion can reach the sidecar after its client's next request:
    a refusal for concurrency waits for a release and asks again, until the grace from the
    first refusal ends; a refusal then is the answer."""
    refused = QuotaResult(False, denied_by=kind, retry_after_s=0.7)
    first = admission.on_quota(take(policy_with(), signals(0)), refused, NOW, 0.05)
    assert isinstance(first, TakeQuota) and first.release_deadline_s == NOW + 0.05
    assert "waits up to 0.05s for a release" in first.admission.trace[-1]
    again = admission.on_quota(first, refused, NOW + 0.04, 0.05)  # another waiter won the slot
    assert again == first
    last = admission.on_quota(first, refused, NOW + 0.05, 0.05)
    assert isinstance(last, Answer) and last.decision.status == 429
    admitted = admission.on_quota(first, ALLOWED, NOW + 0.01, 0.05)
    assert isinstance(admitted, Answer) and admitted.decision.admitted


def test_a_rate_refusal_or_no_grace_answers_at_once() -> None:
    over_rate = QuotaResult(False, denied_by=LimitKind.BUCKET, denied_bucket="requests")
    assert isinstance(
        admission.on_quota(take(policy_with(), signals(0)), over_rate, NOW, 0.05), Answer
    )
    over_concurrency = QuotaResult(False, denied_by=LimitKind.CONCURRENCY, retry_after_s=0.7)
    assert isinstance(
        admission.on_quota(take(policy_with(), signals(0)), over_concurrency, NOW), Answer
    )


def test_room_taken_while_the_quota_call_was_out_holds_instead_of_going_over_the_cap() -> None:
    """Judged to go (in flight 1 of 2), but a held request was let go and another arrival
    admitted while Redis answered: at the cap now, the request is held, not sent as a third."""
    policy = policy_with(OverloadPolicy(admit_below=4, shed_above=40, max_in_flight=2))
    step = take(policy, signals(0, in_flight=1))
    assert not step.holds
    held = admission.on_quota(step, ALLOWED, NOW, signals=signals(0, in_flight=2))
    assert isinstance(held, Hold) and held.deadline_s == NOW + 0.3
    assert "room gone" in held.admission.trace[-1]
    still_room = admission.on_quota(step, ALLOWED, NOW, signals=signals(0, in_flight=1))
    assert isinstance(still_room, Answer) and still_room.decision.admitted


def test_a_quiet_tenants_arrival_is_not_judged_behind_a_noisy_tenants_backlog() -> None:
    """Ten of a noisy tenant's requests wait in the band; a quiet tenant that has been served
    less goes before all of them, so its predicted wait counts none of them (else it would be
    shed for a wait it would not have)."""
    counters = {(2, "noisy"): 50.0, (2, "search"): 1.0}
    here = Elsewhere({2: {"noisy": 10}}, {}, lambda rank, t: counters.get((rank, t), 0.0))
    crowded = Signals(ModelSignals(FRESH, 6, 20.0), {2: 10}, here=here)
    assert crowded.ahead_of(2, "search") == 0
    assert crowded.ahead_of(2, "noisy") == 10  # its own backlog is ahead of it
    assert crowded.ahead_of(2) == 10  # who is asking unknown: every waiter of the band
    step = admission.judge(planned(policy_with()), crowded, policy_with())
    assert isinstance(step, TakeQuota) and step.verdict.predicted_wait_s < 0.3


def test_a_hold_ends_at_the_budget_its_class_leaves_upstream() -> None:
    """Held at a quota answer: the hold's deadline is the budget as the load says it now,
    max_wait (300 ms) cut to the objective less the class's median time upstream."""
    policy = policy_with()
    objective_s = policy.classes["standard"].latency_objective_ms / 1000
    step = take(policy, signals(6))  # 3 ahead at 20/s: 0.15 s, held
    assert step.holds
    slow = Signals(ModelSignals(FRESH, 6, 20.0, upstream_s={"standard": objective_s - 0.1}))
    held = admission.on_quota(step, ALLOWED, NOW, signals=slow)
    assert isinstance(held, Hold) and held.deadline_s == pytest.approx(NOW + 0.1)
    plain = admission.on_quota(step, ALLOWED, NOW, signals=signals(6))
    assert isinstance(plain, Hold) and plain.deadline_s == pytest.approx(NOW + 0.3)
