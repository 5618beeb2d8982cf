"""A refusal's trace in its body (sidecar/core/explain.py `with_trace`): pure."""

from __future__ import annotations

import json

from sidecar.core.decide import shed
from sidecar.core.explain import with_trace
from sidecar.core.types import Decision, Outcome, Reason


def test_a_refusal_carries_its_steps_in_order_and_keeps_every_field() -> None:
    refused = shed(
        Reason.OVERLOADED, "t1", "batch", "batch", ["class 'batch' allowed"], retry_after_s=2.5
    )
    traced = with_trace(refused)
    body = json.loads(traced.body)
    assert body["trace"] == ["class 'batch' allowed", "shed 503 overloaded"]
    del body["trace"]
    assert body == json.loads(refused.body)  # nothing else in the body moved
    assert (traced.status, traced.headers, traced.retry_after_s) == (
        refused.status,
        refused.headers,
        refused.retry_after_s,
    )


def test_an_admit_and_a_body_that_is_not_a_json_object_stay_as_they_are() -> None:
    admit = Decision(Outcome.ADMIT, 200, Reason.ADMITTED, "t1", "batch", "batch", trace=("a",))
    assert with_trace(admit) is admit
    refused = shed(Reason.OVERLOADED, "t1", "batch", "batch", ["a"])
    for body in (b"not json", b"[1, 2]", b""):
        odd = Decision(
            Outcome.SHED, 503, Reason.OVERLOADED, "t1", "batch", "batch", body=body, trace=("a",)
        )
        assert with_trace(odd) is odd
    untraced = Decision(Outcome.SHED, 503, Reason.OVERLOADED, None, None, None, body=refused.body)
    assert with_trace(untraced) is untraced  # no steps: nothing to add
