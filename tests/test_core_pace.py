"""A model's pace as its settled responses show it, and the size rule that reads it
(core/pace.py, core.admission.on_size): no event loop, no clock."""

from __future__ import annotations

import json
from dataclasses import replace
from types import MappingProxyType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core import admission
from sidecar.core.admission import Answer
from sidecar.core.compiled import compile_policy
from sidecar.core.decide import Admission
from sidecar.core.pace import MIN_SEEN, GenerationPace, infeasibility
from sidecar.core.types import Reason, RequestAttributes
from sidecar.policy.model import Infeasible, ModelPolicy, Policy, TokenPolicy
from tests.core_fixtures import make_policy

LLM = "/v2/models/llm/infer"


def seen(
    *responses: tuple[int, float] | tuple[int, float, int], window: int = 256
) -> GenerationPace:
    """A pace that saw `responses`: (generated, elapsed_s[, prompt tokens, default 10])."""
    pace = GenerationPace(window=window)
    for generated, elapsed_s, *prompt in responses:
        pace.observe(generated, elapsed_s, prompt[0] if prompt else 10)
    return pace


def test_no_pace_until_enough_responses() -> None:
    pace = seen(*[(100, 0.5)] * (MIN_SEEN - 1))
    assert pace.seconds_per_token(100, 10) is None and pace.fastest() is None
    pace.observe(100, 0.5, 10)
    assert pace.seconds_per_token(100, 10) == pytest.approx(0.005)


def test_a_request_is_judged_by_responses_at_least_as_long() -> None:
    # Short responses carry their fixed costs over few tokens: 10 tokens in 50 ms looks like
    # 5 ms per token, though the long ones show 1 ms. A 500-token request is judged by the
    # long ones only; a 10-token one by every response.
    pace = seen(*[(10, 0.05)] * MIN_SEEN, (1000, 1.2), (600, 0.6), (200, 0.5))
    assert pace.seconds_per_token(500, 10) == pytest.approx(0.001)  # 600 tokens in 0.6 s
    assert pace.seconds_per_token(601, 10) == pytest.approx(0.0012)  # only the 1000-token one
    assert pace.seconds_per_token(10, 10) == pytest.approx(0.001)
    assert pace.fastest() == pytest.approx(0.001)


def test_a_request_longer_than_any_response_is_judged_by_the_longest() -> None:
    # Nothing of 1001 tokens was seen. The MIN_SEEN longest responses (prompts no longer) judge
    # it: here the 1000-, 600- and 200-token ones and five of the 10-token ones, whose least
    # pace is the 600-token one's. A short response's fixed costs never judge it alone.
    pace = seen(*[(10, 0.05)] * MIN_SEEN, (1000, 1.2), (600, 0.6), (200, 0.5))
    assert pace.seconds_per_token(1001, 10) == pytest.approx(0.001)
    long_ones = seen(*[(10, 0.001)] * MIN_SEEN, *[(300, 0.3)] * MIN_SEEN)
    assert long_ones.seconds_per_token(400, 10) == pytest.approx(0.001)  # not the 10-token 0.1 ms
    # Fewer than MIN_SEEN responses from prompts no longer: not judged.
    few = seen(*[(100, 0.5, 5_000)] * MIN_SEEN, *[(100, 0.5, 10)] * (MIN_SEEN - 1))
    assert few.seconds_per_token(200, 10) is None
    assert few.seconds_per_token(200, 5_000) == pytest.approx(0.005)


def test_a_request_is_judged_by_responses_with_a_prompt_no_longer() -> None:
    # A 30,000-token prompt's prefill is in its response's time: it says nothing of how fast
    # a request with a short prompt can go, only of one with a prompt at least as long.
    pace = seen(*[(1000, 2.0, 30_000)] * MIN_SEEN, (1000, 1.5, 5_000))
    assert pace.seconds_per_token(1000, 10) is None
    assert pace.seconds_per_token(1000, 5_000) == pytest.approx(0.0015)
    assert pace.seconds_per_token(1000, 40_000) == pytest.approx(0.0015)


def test_responses_that_say_nothing_are_not_counted() -> None:
    pace = seen((0, 1.0), (10, 0.0), (10, -1.0), (10, float("inf")), (10, float("nan")))
    for _ in range(MIN_SEEN - 1):
        pace.observe(10, 0.1, 10)
    assert pace.seconds_per_token(1, 10) is None  # only the 7 real ones


def test_a_model_that_became_slower_is_seen_as_slower() -> None:
    pace = seen(*[(100, 0.1)] * MIN_SEEN, window=MIN_SEEN)
    for _ in range(MIN_SEEN):
        pace.observe(100, 0.4, 10)
    assert pace.seconds_per_token(100, 10) == pytest.approx(0.004)


@given(
    st.lists(
        st.tuples(st.integers(1, 4096), st.floats(1e-4, 100.0), st.integers(0, 50_000)),
        min_size=MIN_SEEN,
        max_size=50,
    ),
    st.integers(1, 5000),
    st.integers(0, 50_000),
)
def test_the_pace_is_the_least_of_the_responses_that_may_judge_it(
    responses: list[tuple[int, float, int]], tokens: int, prompt: int
) -> None:
    pace = seen(*responses).seconds_per_token(tokens, prompt)
    judges = [e / n for n, e, p in responses if n >= tokens and p <= prompt]
    shorter = sorted(((n, e / n) for n, e, p in responses if p <= prompt), reverse=True)
    if judges:
        assert pace == pytest.approx(min(judges))
    elif len(shorter) < MIN_SEEN:
        assert pace is None
    else:  # the MIN_SEEN longest (of equal lengths at the cut, the slower ones)
        assert pace == pytest.approx(min(p for _, p in shorter[:MIN_SEEN]))
        assert pace is not None and pace >= min(e / n for n, e, p in responses if p <= prompt)


def test_infeasibility_is_judged_on_max_tokens_at_the_pace() -> None:
    assert infeasibility(400, 0.005, 2000) is None  # 2 s: exactly the objective
    assert infeasibility(5000, None, 2000) is None  # no pace: nothing assumed
    found = infeasibility(401, 0.005, 2000)
    assert found is not None
    assert found.alone_s == pytest.approx(2.005) and found.most_tokens == 400
    assert "401 max tokens" in found.why and "2000 ms objective" in found.why


@given(st.integers(1, 100_000), st.floats(1e-5, 1.0), st.integers(1, 600_000))
def test_the_most_tokens_always_fit(max_tokens: int, pace: float, objective_ms: int) -> None:
    found = infeasibility(max_tokens, pace, objective_ms)
    if found is not None:
        assert found.most_tokens < max_tokens
        assert infeasibility(found.most_tokens, pace, objective_ms) is None


# -- the size rule --------------------------------------------------------------------------


def llm_policy(infeasible: Infeasible, relegate: bool = False) -> Policy:
    policy = make_policy()
    tokens = TokenPolicy(prompt_tokens="PROMPT", max_tokens="MAX", infeasible=infeasible)
    classes = dict(policy.classes)
    if relegate:
        classes["standard"] = replace(classes["standard"], relegate_to="batch")
    return replace(
        policy,
        classes=MappingProxyType(classes),
        models=MappingProxyType({"llm": ModelPolicy("llm", 300.0, tokens)}),
    )


def planned(policy: Policy, path: str = LLM) -> Admission:
    attrs = RequestAttributes("POST", path, {"x-api-key": "k-search", "x-qos-class": "standard"})
    step = admission.plan(attrs, compile_policy(policy), (500.0, "estimated"))
    assert isinstance(step, Admission)
    return step


def test_refused_with_what_the_class_can_take() -> None:
    policy = llm_policy(Infeasible.REFUSE, relegate=True)  # refuse refuses, relegate_to or not
    step = admission.on_size(planned(policy), 500, 0.005, policy)  # 2.5 s against 2 s
    assert isinstance(step, Answer)
    decision = step.decision
    assert (decision.status, decision.reason) == (422, Reason.INFEASIBLE)
    assert decision.retry_after_s is None and not decision.charged and decision.lease is None
    body = json.loads(decision.body)
    assert body["reason"] == "infeasible" and body["most_max_tokens"] == 400
    assert body["class"] == "standard" and "500 max tokens" in body["message"]


def test_relegated_once_to_relegate_to() -> None:
    policy = llm_policy(Infeasible.RELEGATE, relegate=True)
    step = admission.on_size(planned(policy), 500, 0.005, policy)
    assert isinstance(step, Admission)
    assert (step.klass.name, step.check.klass, step.relegated) == ("batch", "batch", True)
    # Already relegated (by load, say): not moved again, served as it is.
    again = admission.on_size(step, 50_000, 0.005, policy)
    assert isinstance(again, Admission) and again.klass.name == "batch"


def test_relegate_without_a_class_to_go_to_serves_it_as_asked() -> None:
    policy = llm_policy(Infeasible.RELEGATE)
    step = admission.on_size(planned(policy), 500, 0.005, policy)
    assert isinstance(step, Admission) and step.klass.name == "standard"
    assert "served as asked" in step.trace[-1]


@pytest.mark.parametrize(
    ("infeasible", "max_tokens", "pace", "path"),
    [
        (Infeasible.ADMIT, 500, 0.005, LLM),  # the default: the rule is off
        (Infeasible.REFUSE, 400, 0.005, LLM),  # fits exactly
        (Infeasible.REFUSE, 500, None, LLM),  # no pace seen yet
        (Infeasible.REFUSE, 500, 0.005, "/v2/models/simgpu/infer"),  # not a token model
    ],
)
def test_left_as_planned(
    infeasible: Infeasible, max_tokens: int, pace: float | None, path: str
) -> None:
    policy = llm_policy(infeasible, relegate=True)
    before = planned(policy, path)
    assert admission.on_size(before, max_tokens, pace, policy) == before
