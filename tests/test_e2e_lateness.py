"""The lateness limit (sidecar/core/lateness.py) on the real stack: Envoy (ext_authz HTTP), the
sidecar watching real Triton every 50 ms, Valkey.

The `quick` class's objective is 200 ms, and the simulated GPU runs a batch of up to 8 in
60 ms. A burst of 64 is sent over 0.15 s (its queue threshold lets every one go): the
requests deep in the queue wait for the batches ahead and end after 200 ms. The sidecar
learns from the access log at which depth its requests ended late; in the next burst it
sheds the arrivals from that depth at once (how much that buys is the QoS benchmark's to
show, not a timed assertion's).
(Spread, not all at once: requests whose quota calls are out together read the same depth,
as they do for `admit_below`.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.stack import LocalStack
from tests.stack_client import metric_value, wait_for
from tests.test_e2e_overload import Flood, _key, idle, watching_stack

pytestmark = pytest.mark.stack
OBJECTIVE_S = 0.2
WORK_MS = 60  # one batch of up to 8 (simgpu's max_batch_size)
BURST = 64
SPREAD_S = 0.15


def write_policy(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policy.yaml").write_text(
        f"""
classes:
  quick:
    rank: 1
    latency_objective_ms: {int(OBJECTIVE_S * 1000)}
    max_wait_ms: 0
    triton_priority: 1
    overload: {{admit_below: 1000, shed_above: 2000}}
tenants:
  flood:
    match: {{api_key_sha256: [{_key("flood")}]}}
    allowed_classes: [quick]
    default_class: quick
    max_concurrency: 100000
"""
    )
    return directory


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    yield from watching_stack(tmp_path_factory, "lateness", write_policy)


def limit(stack: LocalStack) -> float:
    return metric_value(stack.admin_url, "qos_lateness_limit", model="simgpu", **{"class": "quick"})


def late_share(flood: Flood) -> float:
    served = [seconds for seconds, status, _, _ in flood.results if status == 200]
    return sum(seconds > OBJECTIVE_S for seconds in served) / len(served)


def test_the_depths_a_class_ends_late_from_are_learnt_and_shed(stack: LocalStack) -> None:
    Flood(stack.url("http"), 8, delay_ms=WORK_MS).join()  # Triton's first batches are slow
    idle(stack)
    first = Flood(stack.url("http"), BURST, delay_ms=WORK_MS, spread_s=SPREAD_S)
    first.join()
    assert {status for _, status, _, _ in first.results} == {200}  # nothing known: all sent
    late_before = late_share(first)
    assert late_before > 0.3, sorted(seconds for seconds, *_ in first.results)
    wait_for(lambda: limit(stack) > 0, 10, "a lateness limit learnt from the access log")
    learnt = limit(stack)
    assert 1 <= learnt < BURST
    idle(stack)
    second = Flood(stack.url("http"), BURST, delay_ms=WORK_MS, spread_s=SPREAD_S)
    second.join()
    shed = [(reason, retry) for _, status, reason, retry in second.results if status == 503]
    assert shed, second.results
    assert all(reason == "overloaded" and retry is not None for reason, retry in shed)
    assert len(shed) < BURST  # the shallow depths are still sent
