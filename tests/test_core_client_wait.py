"""What a client says it waits, and how it bounds its hold (core/client_wait.py,
core.signals.hold_budget). Pure: the frozen clock and scripted signals of the admission
tests."""

from __future__ import annotations

from dataclasses import replace

import pytest

from sidecar.core import admission
from sidecar.core.admission import Hold, LoadAction, TakeQuota, judge_load
from sidecar.core.client_wait import client_wait_s, grpc_timeout_s, millis_s
from sidecar.core.compiled import compile_policy
from sidecar.core.decide import Admission
from sidecar.core.load import SignalState
from sidecar.core.signals import ModelSignals, Signals, hold_budget
from sidecar.core.types import RequestAttributes
from sidecar.policy.model import IdentityPolicy, OverloadPolicy
from tests.test_core_admission import ALLOWED, INFER, NOW, policy_with, signals
from tests.test_core_upstream import INTERACTIVE


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("2S", 2.0),
        ("500m", 0.5),
        ("1H", 3600.0),
        ("3M", 180.0),
        ("250000u", 0.25),
        ("99999999n", 0.099999999),
        ("12345678m", 12345.678),  # eight digits: the most the format allows
        ("123456789m", None),  # nine
        ("5s", None),  # not a unit
        ("S", None),
        ("", None),
        ("-5S", None),
        ("1.5S", None),
        ("\u0663S", None),  # a digit, but not an ASCII one
    ],
)
def test_grpc_timeout_is_read_in_grpcs_own_format(value: str, seconds: float | None) -> None:
    assert grpc_timeout_s(value) == (None if seconds is None else pytest.approx(seconds))


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1500", 1.5),
        (" 1500 ", 1.5),
        ("0", 0.0),
        ("999999999", 999999.999),
        ("1234567890", None),
        ("1.5", None),
        ("1e3", None),
        ("-1", None),
        ("soon", None),
        ("", None),
    ],
)
def test_the_timeout_header_is_whole_milliseconds(value: str, seconds: float | None) -> None:
    assert millis_s(value) == (None if seconds is None else pytest.approx(seconds))


def test_the_shorter_of_the_two_counts_and_an_unreadable_one_is_noted_and_ignored() -> None:
    trace: list[str] = []
    both = {"grpc-timeout": "2S", "x-qos-timeout-ms": "1500"}
    assert client_wait_s(both, "x-qos-timeout-ms", trace) == 1.5
    assert client_wait_s({**both, "grpc-timeout": "300m"}, "x-qos-timeout-ms", trace) == 0.3
    assert trace == []
    bad = {"grpc-timeout": "forever", "x-qos-timeout-ms": "1500"}
    assert client_wait_s(bad, "x-qos-timeout-ms", trace) == 1.5
    assert trace == ["grpc-timeout 'forever' is not a timeout: ignored"]
    assert client_wait_s({"x-qos-timeout-ms": "1500"}, "x-deadline", []) is None  # not its name
    assert client_wait_s({"x-deadline": "700"}, "x-deadline", []) == 0.7
    assert client_wait_s({}, "x-qos-timeout-ms", []) is None


def test_a_planned_request_carries_its_clients_wait_and_the_policy_names_the_header() -> None:
    policy = policy_with()
    headers = {"x-api-key": "k-search", "x-qos-class": "standard", "x-qos-timeout-ms": "800"}
    step = admission.plan(RequestAttributes("POST", INFER, headers), compile_policy(policy))
    assert isinstance(step, Admission) and step.client_wait_s == 0.8
    assert step.traced("why").client_wait_s == 0.8  # kept through its steps
    renamed = replace(policy, identity=replace(IdentityPolicy(), timeout_header="x-budget"))
    step = admission.plan(RequestAttributes("POST", INFER, headers), compile_policy(renamed))
    assert isinstance(step, Admission) and step.client_wait_s is None
    unreadable = {**headers, "x-qos-timeout-ms": "soon"}
    step = admission.plan(RequestAttributes("POST", INFER, unreadable), compile_policy(policy))
    assert isinstance(step, Admission) and step.client_wait_s is None
    assert "x-qos-timeout-ms 'soon' is not a timeout: ignored" in step.trace


def test_the_clients_wait_cuts_the_hold_budget_and_never_lengthens_it() -> None:
    # INTERACTIVE: max_wait 90 ms, objective 225 ms.
    assert hold_budget(INTERACTIVE, {}, 0.05)[0] == pytest.approx(0.05)
    assert hold_budget(INTERACTIVE, {}, 60.0)[0] == pytest.approx(0.09)  # never more
    # Upstream takes 30 ms lately: what the client's 100 ms leaves is 70 ms.
    assert hold_budget(INTERACTIVE, {"interactive": 0.03}, 0.1)[0] == pytest.approx(0.07)
    # A client that waits less than the class takes upstream: nothing left to hold for.
    assert hold_budget(INTERACTIVE, {"interactive": 0.03}, 0.02)[0] == 0.0
    assert hold_budget(INTERACTIVE, {"interactive": 0.03}, None)[0] == pytest.approx(0.09)
    # Its own time unknown: the least any class of the model took (no request is quicker).
    quick_others = {"standard": 0.04, "batch": 0.5}
    assert hold_budget(INTERACTIVE, quick_others, 0.1)[0] == pytest.approx(0.06)
    assert hold_budget(INTERACTIVE, quick_others, None)[0] == pytest.approx(0.09)


def test_a_wait_the_client_will_not_sit_out_is_relegated_or_shed_at_once() -> None:
    """Depth 6 at 20/s: 3 ahead, 0.15 s predicted, within the class's 300 ms. A client that
    waits 100 ms is not held for it: shed (or relegated) at once, with its Retry-After."""
    klass = policy_with().classes["standard"]
    fresh = SignalState.FRESH
    held = judge_load(klass, fresh, 6, 20.0, 0, client_wait_s=1.0)
    assert held.action is LoadAction.DEFER and held.budget_s == pytest.approx(0.3)
    shed = judge_load(klass, fresh, 6, 20.0, 0, client_wait_s=0.1)
    assert shed.action is LoadAction.SHED and shed.predicted_wait_s == pytest.approx(0.15)
    assert "hold budget 0.100s (its client waits 0.100s)" in shed.why
    took = judge_load(klass, fresh, 6, 20.0, 0, upstream_s={"standard": 0.05}, client_wait_s=0.1)
    assert "(its client waits 0.100s, standard took 0.050s upstream lately)" in took.why
    relegating = replace(klass, relegate_to="batch")
    moved = judge_load(relegating, fresh, 6, 20.0, 0, client_wait_s=0.1)
    assert moved.action is LoadAction.RELEGATE


def test_a_hold_ends_when_its_client_would_stop_waiting() -> None:
    policy = policy_with()
    headers = {"x-api-key": "k-search", "x-qos-class": "standard", "x-qos-timeout-ms": "250"}
    planned = admission.plan(RequestAttributes("POST", INFER, headers), compile_policy(policy))
    assert isinstance(planned, Admission)
    step = admission.judge(planned, signals(6), policy)  # 0.15 s predicted: fits 250 ms
    assert isinstance(step, TakeQuota) and step.holds
    slow = Signals(ModelSignals(SignalState.FRESH, 6, 20.0, upstream_s={"standard": 0.05}))
    held = admission.on_quota(step, ALLOWED, NOW, signals=slow)
    assert isinstance(held, Hold) and held.deadline_s == pytest.approx(NOW + 0.2)
    assert held.client_cut  # the class's budget was 250 ms: its expiry shows no standing band


def test_relegated_into_a_longer_class_it_is_still_held_only_while_its_client_waits() -> None:
    """Standard over shed_above is relegated to batch at arrival and held there (batch waits up
    to 5 s). Its client said 400 ms: the hold ends then, not at batch's budget."""
    policy = policy_with(relegate=True, batch=OverloadPolicy(admit_below=2, shed_above=1000))
    headers = {"x-api-key": "k-search", "x-qos-class": "standard", "x-qos-timeout-ms": "400"}
    planned = admission.plan(RequestAttributes("POST", INFER, headers), compile_policy(policy))
    assert isinstance(planned, Admission)
    step = admission.judge(planned, signals(50, drain=200.0), policy)  # 49 ahead: 0.245 s
    assert isinstance(step, TakeQuota) and step.admission.klass.name == "batch" and step.holds
    held = admission.on_quota(step, ALLOWED, NOW, signals=signals(50, drain=200.0))
    assert isinstance(held, Hold) and held.deadline_s == pytest.approx(NOW + 0.4)
    without = admission.plan(
        RequestAttributes("POST", INFER, {k: v for k, v in headers.items() if "timeout" not in k}),
        compile_policy(policy),
    )
    assert isinstance(without, Admission)
    step = admission.judge(without, signals(50, drain=200.0), policy)
    assert isinstance(step, TakeQuota)
    held = admission.on_quota(step, ALLOWED, NOW, signals=signals(50, drain=200.0))
    assert isinstance(held, Hold) and held.deadline_s == pytest.approx(NOW + 5.0)
    assert not held.client_cut
