"""The autoscaling signal on the real stack: a flood of more than Triton drains shows as demand
above drain on the sidecar's /metrics, and the demand falls again once the flood is over."""

from __future__ import annotations

import pytest

from devstack.stack import LocalStack
from tests.stack_client import metric_value, wait_for
from tests.test_e2e_overload import Flood, idle, stack  # noqa: F401 (the module's own stack)

pytestmark = pytest.mark.stack


def rates(stack: LocalStack) -> tuple[float, float, float]:  # noqa: F811
    admin = stack.admin_url
    return (
        metric_value(admin, "qos_model_demand_rate", model="simgpu"),
        metric_value(admin, "qos_model_drain_rate", model="simgpu"),
        metric_value(admin, "qos_model_demand_ratio", model="simgpu"),
    )


def test_a_flood_shows_as_demand_over_drain_and_the_demand_falls_when_it_ends(
    stack: LocalStack,  # noqa: F811
) -> None:
    idle(stack)
    # About 1.5x what the simulated GPU serves (8 per 60 ms batch = 133/s), for 2 s: some of
    # it is held, some shed for load.
    flood = Flood(stack.url("http"), 400, spread_s=2.0)
    wait_for(
        lambda: metric_value(stack.admin_url, "qos_held_requests", **{"class": "batch"}) > 0,
        10,
        "the flood is being held",
    )
    flood.join()
    statuses = [status for _, status, _, _ in flood.results]
    served = statuses.count(200)
    assert served and statuses.count(503), statuses  # some drained, some shed for load
    # Every completion reached the access log: the drain counted them all.
    wait_for(
        lambda: metric_value(stack.admin_url, "qos_completions_total", result="released") >= served,
        10,
        "the access log released every served request",
    )
    demand, drain, ratio = rates(stack)
    assert drain > 0
    assert demand > drain, (demand, drain)  # the shed ones were offered, never drained
    assert ratio > 1, ratio
    # Idle: nothing is offered, the demand rate decays (about 10 s to halve, tau 15 s).
    wait_for(lambda: rates(stack)[0] < demand / 2, 60, "the demand rate falls while idle")
