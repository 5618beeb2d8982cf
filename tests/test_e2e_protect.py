"""Adaptive caps (`overload.protect`, sidecar/core/protect.py) on the real stack: Envoy
(ext_authz HTTP), the sidecar watching real Triton every 50 ms, Valkey.

The batch class's floor is one request in flight. While no better-ranked request has come for
the model, the cap does not bind: a burst of batch requests goes to Triton together (one
batch). Once an interactive request has come, the same burst is held to the cap: the requests
go one after another (deferred), and the metrics say the cap binds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.stack import LocalStack
from tests.stack_client import infer, metric_value, wait_for
from tests.test_e2e_overload import Flood, _key, idle, watching_stack

pytestmark = pytest.mark.stack
BURST = 4


def write_policy(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policy.yaml").write_text(
        f"""
classes:
  interactive:
    rank: 1
    latency_objective_ms: 2000
    max_wait_ms: 300
    triton_priority: 1
    overload: {{admit_below: 8, shed_above: 64}}
  batch:
    rank: 3
    latency_objective_ms: 30000
    max_wait_ms: 10000
    triton_priority: 3
    overload: {{admit_below: 64, shed_above: 200, max_in_flight: 1, protect: throughput}}
tenants:
  flood:  # leased mode: each admit's lease is its model's entry alone (core/slices.py)
    match: {{api_key_sha256: [{_key("flood")}]}}
    allowed_classes: [batch]
    default_class: batch
    buckets: [{{unit: requests, rate: 1000, burst: 400, lease_ms: 500}}]
  web:
    match: {{api_key_sha256: [{_key("web")}]}}
    allowed_classes: [interactive]
    default_class: interactive
"""
    )
    return directory


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    yield from watching_stack(tmp_path_factory, "protect", write_policy)


def deferred(stack: LocalStack) -> float:
    return metric_value(
        stack.admin_url, "qos_decisions_total", tenant="flood", reason="admitted_deferred"
    )


def binding(stack: LocalStack) -> float:
    return metric_value(
        stack.admin_url, "qos_adaptive_cap_binding", model="simgpu", **{"class": "batch"}
    )


def test_the_cap_binds_only_once_a_better_class_sends_the_model_work(stack: LocalStack) -> None:
    url = stack.url("http")
    idle(stack)
    # Nobody to protect: the whole burst goes to Triton at once, none held.
    before = deferred(stack)
    burst = Flood(url, BURST, delay_ms=400)
    burst.join()
    assert [status for _, status, _, _ in burst.results] == [200] * BURST
    assert deferred(stack) == before
    assert max(seconds for seconds, *_ in burst.results) < BURST * 0.4  # together, not in turn
    wait_for(lambda: binding(stack) == 0, 5, "the cap reported as not binding")

    # An interactive request for the model: from now the burst is held to the floor, one.
    idle(stack)
    assert infer(url, api_key="k-web", delay_ms=10).status == 200
    before = deferred(stack)
    burst = Flood(url, BURST, delay_ms=400)
    wait_for(lambda: binding(stack) == 1, 1.5, "the cap reported as binding")
    burst.join()
    assert [status for _, status, _, _ in burst.results] == [200] * BURST
    # One went at once (the cap's floor is 1); the others waited their turn. (Two at once at
    # most: an arrival judged just before the first one's model entry was counted.)
    assert deferred(stack) >= before + BURST - 2
    # The flood's leases were model entries only, and Envoy's completions freed them all.
    in_flight = "qos_model_in_flight_requests"
    wait_for(lambda: metric_value(stack.admin_url, in_flight, model="simgpu") == 0, 5, "freed")
    assert metric_value(stack.admin_url, "qos_slice_calls_total", call="slice") >= 1


def test_fast_interactive_completions_raise_the_cap_that_holds_batch_back(
    stack: LocalStack,
) -> None:
    """Rule 2 through Envoy's access log: each interactive request's duration reaches the
    sidecar with its completion; all far under their objective while batch is held back by
    the cap, so the cap grows at the end of the period."""
    url = stack.url("http")
    idle(stack)
    learnt = metric_value(stack.admin_url, "qos_adaptive_cap", model="simgpu", **{"class": "batch"})
    assert infer(url, api_key="k-web", delay_ms=5).status == 200
    burst = Flood(url, 2 * BURST, delay_ms=300)  # held back: at the cap
    for _ in range(25):  # more than MIN_SAMPLES completions in the period
        assert infer(url, api_key="k-web", delay_ms=5).status == 200
    wait_for(
        lambda: (
            metric_value(stack.admin_url, "qos_adaptive_cap", model="simgpu", **{"class": "batch"})
            > learnt
        ),
        10,
        "the learnt cap grows",
    )
    burst.join()


def learnt_cap(stack: LocalStack) -> float:
    return metric_value(stack.admin_url, "qos_adaptive_cap", model="simgpu", **{"class": "batch"})


def fast_interactive_period(stack: LocalStack) -> Flood:
    """Batch held back at its cap while more than MIN_SAMPLES fast interactive requests end:
    one period's evidence. Returns the burst (still running)."""
    url = stack.url("http")
    assert infer(url, api_key="k-web", delay_ms=5).status == 200
    burst = Flood(url, 2 * BURST, delay_ms=300)
    for _ in range(25):
        assert infer(url, api_key="k-web", delay_ms=5).status == 200
    return burst


def test_a_lower_protect_share_cuts_the_cap_that_the_same_completions_raise(
    stack: LocalStack,
) -> None:
    """`protect_share` is rule 2's target: interactive requests that end at about 1% of their
    objective are under throughput's share (the cap grows) and over a share of 0.001 (the cap
    is cut), on the same stack after a hot reload."""
    assert stack.sidecar is not None
    idle(stack)
    learnt = learnt_cap(stack)
    burst = fast_interactive_period(stack)
    wait_for(lambda: learnt_cap(stack) > learnt, 10, "the learnt cap grows")
    burst.join()
    raised = learnt_cap(stack)

    policy_file = stack.sidecar.policy_path / "policy.yaml"
    good = policy_file.read_text()
    reloads = metric_value(stack.admin_url, "qos_policy_reloads_total", result="ok")
    try:
        policy_file.write_text(
            good.replace("protect: throughput}", "protect: throughput, protect_share: 0.001}")
        )
        wait_for(
            lambda: (
                metric_value(stack.admin_url, "qos_policy_reloads_total", result="ok") > reloads
            ),
            10,
            "the policy with protect_share loaded",
        )
        idle(stack)
        burst = fast_interactive_period(stack)
        wait_for(lambda: learnt_cap(stack) < raised, 10, "the learnt cap is cut")
        burst.join()
    finally:
        policy_file.write_text(good)
