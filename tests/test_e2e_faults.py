"""Faults on the real stack, through all three Envoy modes (ext_authz HTTP, ext_authz gRPC,
ext_proc): an upstream that times out, Valkey killed and restarted mid-run, a forged route
priority, and, last (it ends Triton for the module), Triton killed: connection failures,
readiness, and no 404 on a view the sidecar no longer has.

After each fault: the slots come back (no lease left once the load stops), the tenant is
admitted again, and every answer that is not the upstream's is the sidecar's JSON. Counters
are read as deltas inside each test; recovery times are measured and printed, and asserted
only against generous bounds.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import devstack.stack
from devstack.procs import ValkeyProcess
from devstack.stack import LocalStack
from tests.binaries import require_binaries
from tests.stack_client import explain, in_background, infer, metric_value, post, wait_for

pytestmark = [pytest.mark.stack, pytest.mark.faults]
MODES = ("http", "grpc", "extproc")
ROUTE_TIMEOUT_S = 2.5  # Envoy's route timeout here (shipped: 60 s); every request is shorter
WORK_MS = 5000  # an inference longer than the route timeout
RECOVERY_BOUND_S = 10.0
RECOVERED_IN_A_ROW = 20  # generous: the sidecar reconnects on its next store call


def _tenant(name: str, body: str) -> str:
    key = hashlib.sha256(f"k-{name}".encode()).hexdigest()
    return f"  {name}:\n    match:\n      api_key_sha256: [{key}]\n{body}"


def write_policy(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tenants = []
    for mode in MODES:
        tenants += [
            *(
                _tenant(
                    f"{name}-{mode}",
                    "    allowed_classes: [standard]\n    default_class: standard\n"
                    "    max_concurrency: 2\n",
                )
                for name in ("slow", "down")
            ),
            _tenant(
                f"kv-{mode}",
                "    allowed_classes: [interactive, batch]\n    default_class: batch\n"
                "    max_concurrency: 2\n",
            ),
            _tenant(
                f"route-{mode}",
                "    allowed_classes: [interactive, batch]\n    default_class: batch\n",
            ),
        ]
    (directory / "policy.yaml").write_text(
        "identity:\n  sources:\n    - {kind: api_key, header: x-api-key}\n"
        "unknown_tenants: {action: reject}\n"
        "classes:\n"
        "  interactive: {rank: 1, latency_objective_ms: 250, max_wait_ms: 50, triton_priority: 1,"
        " on_state_error: open, route_priority: high}\n"
        "  standard: {rank: 2, latency_objective_ms: 2000, max_wait_ms: 500, triton_priority: 2}\n"
        "  batch: {rank: 3, latency_objective_ms: 20000, max_wait_ms: 5000, triton_priority: 3,"
        " on_state_error: closed, concurrency_retry_after_ms: 2000}\n"
        "tenants:\n" + "".join(tenants)
    )
    return directory


def short_route_timeouts(work: Path) -> dict[str, Path]:
    """The shipped bootstraps with one change: Triton's routes time out after
    `ROUTE_TIMEOUT_S` instead of 60 s, so an upstream timeout can be had in a test."""
    patched = {}
    for mode, path in devstack.stack.BOOTSTRAPS.items():
        config = yaml.safe_load(path.read_text())
        (listener,) = config["static_resources"]["listeners"]
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        for host in hcm["route_config"]["virtual_hosts"]:
            for route in host["routes"]:
                route["route"]["timeout"] = f"{ROUTE_TIMEOUT_S}s"
        patched[mode] = work / path.name
        patched[mode].write_text(yaml.safe_dump(config, sort_keys=False))
    return patched


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    require_binaries("envoy", "triton", "valkey")
    work = tmp_path_factory.mktemp("faults")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(devstack.stack, "BOOTSTRAPS", short_route_timeouts(work))
        with LocalStack(work, write_policy(work / "policies"), modes=MODES) as running:
            yield running


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def released(stack: LocalStack) -> float:
    return metric_value(stack.admin_url, "qos_completions_total", result="released")


def slots_free(stack: LocalStack, key: str) -> bool:
    return bool(explain(stack.admin_url, key)["outcome"] == "admit")


def get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.load(exc)


# -- an upstream that times out --------------------------------------------------------------


def test_upstream_timeout_releases_the_slots(stack: LocalStack, mode: str) -> None:
    """Envoy gives up on Triton after its route timeout, 2.5 s (504), while Triton still works
    for 5 s: the access log's entry for the timed-out request frees its slot, long before the
    work ends."""
    url, key = stack.url(mode), f"k-slow-{mode}"
    wait_for(lambda: slots_free(stack, key), 10, "slots free at the start")
    before, started = released(stack), time.monotonic()
    timed_out = [
        in_background(lambda: infer(url, api_key=key, delay_ms=WORK_MS))
        for _ in range(2)
    ]  # fmt: skip
    wait_for(
        lambda: explain(stack.admin_url, key)["reason"] == "over_concurrency",
        ROUTE_TIMEOUT_S,
        "both requests hold a slot while Triton works",
    )
    for thread, out in timed_out:
        thread.join(15)
        assert out[0].status == 504, out[0]  # Envoy's upstream timeout, not the sidecar's
        assert "x-qos-reason" not in out[0].headers
    # Both released: `slots_free` holds once one slot is back, so wait for the count too.
    freed_at = wait_for(lambda: released(stack) >= before + 2, 5, "both slots released")
    assert slots_free(stack, key)
    assert freed_at - started < WORK_MS / 1000  # Triton still busy: only the timeout freed them
    # Triton still works on them: the next tests start once it answers within the timeout.
    wait_for(lambda: infer(url, api_key=key).status == 200, 15, "Triton free again")


# -- Valkey killed and restarted mid-run -----------------------------------------------------


def _kill_valkey(stack: LocalStack) -> None:
    """SIGKILL the stack's Valkey and reap it (its port stays free for a fresh one)."""
    old = stack.valkey
    assert old is not None and old.pid is not None
    os.kill(old.pid, signal.SIGKILL)
    wait_for(lambda: not old.ping(timeout=0.2), 5, "Valkey gone")
    old.stop()  # reap it


def admitted_in_a_row(url: str, key: str) -> Callable[[], bool]:
    """A predicate: true once the batch class has been admitted RECOVERED_IN_A_ROW times in a
    row (one admit can come through a healed connection while others are still dead)."""
    streak = [0]

    def admitted() -> bool:
        ok = infer(url, api_key=key, klass="batch").status == 200
        streak[0] = streak[0] + 1 if ok else 0
        return streak[0] >= RECOVERED_IN_A_ROW

    return admitted


def test_valkey_killed_mid_run_fails_as_documented_then_recovers(stack: LocalStack) -> None:
    """One SIGKILL for all three modes (a restart leaves the sidecar's pooled connections to
    heal one failed call each, which would blur a second round's "mid-run" leases)."""
    old = stack.valkey
    assert old is not None
    keys = {mode: f"k-kv-{mode}" for mode in MODES}
    # Mid-run: in every mode, two requests admitted with leases run in Triton when Valkey dies.
    urls = {mode: stack.url(mode) for mode in MODES}
    running = [
        in_background(lambda m=m: infer(urls[m], api_key=keys[m], klass="interactive",
                                        delay_ms=400))
        for m in MODES for _ in range(2)
    ]  # fmt: skip
    for mode in MODES:
        wait_for(
            lambda k=keys[mode]: (
                explain(stack.admin_url, k, "batch")["reason"] == "over_concurrency"
            ),
            5,
            f"[{mode}] both hold a slot",
        )
    fail_open = metric_value(stack.admin_url, "qos_decisions_total", reason="admitted_fail_open")
    _kill_valkey(stack)
    killed_at = time.monotonic()
    for thread, out in running:  # admitted before the outage: unaffected by it
        thread.join(15)
        assert out[0].status == 200, out[0]

    # Down: the fail-open class is admitted, the fail-closed one refused with the JSON 503.
    for mode in MODES:
        url = stack.url(mode)
        assert infer(url, api_key=keys[mode], klass="interactive").status == 200, mode
        shed = infer(url, api_key=keys[mode], klass="batch")
        assert shed.status == 503 and shed.headers["retry-after"] == "2", (mode, shed)
        assert shed.json()["reason"] == "state_unavailable"
    after = metric_value(stack.admin_url, "qos_decisions_total", reason="admitted_fail_open")
    assert after >= fail_open + len(MODES)
    # The in-flight gauges cannot be read: they say how old they are.
    wait_for(lambda: metric_value(stack.admin_url, "qos_state_stale_seconds") > 0, 5, "stale")

    fresh = ValkeyProcess(old.workdir, port=old.port)
    stack.valkey = stack._exit.enter_context(fresh)
    for mode in MODES:
        # Recovered: the fail-closed class admitted RECOVERED_IN_A_ROW times in a row.
        recovered_at = wait_for(
            admitted_in_a_row(urls[mode], keys[mode]), RECOVERY_BOUND_S, f"[{mode}] batch is back"
        )
        print(f"\n[{mode}] admitted again {recovered_at - killed_at:.2f}s after the SIGKILL")
    # Once the load stops: no lease left, and the gauges are current again.
    wait_for(
        lambda: (
            all(
                metric_value(stack.admin_url, "qos_in_flight_requests", tenant=f"kv-{mode}") == 0
                for mode in MODES
            )
            and metric_value(stack.admin_url, "qos_state_stale_seconds") == 0
        ),
        5,
        "no lease left and the gauges read again",
    )


# -- a forged route priority -------------------------------------------------------------------


def _route_requests(stack: LocalStack, mode: str, route: str) -> float:
    """Requests Envoy of `mode` sent upstream through the route with stat_prefix `route`."""
    envoy = stack.envoys[mode]
    with urllib.request.urlopen(envoy.admin_url + "/stats?format=json", timeout=5) as response:
        stats = json.load(response)["stats"]
    name = f"vhost.triton.route.{route}.upstream_rq_completed"
    return float(sum(s.get("value", 0) for s in stats if s.get("name") == name))


def test_a_forged_route_priority_never_selects_the_high_route(stack: LocalStack, mode: str) -> None:
    url, key = stack.url(mode), f"k-route-{mode}"
    forged = {"x-qos-route-priority": "high"}
    high, default = (
        _route_requests(stack, mode, "qos_high"),
        _route_requests(stack, mode, "qos_default"),
    )
    for _ in range(3):
        assert infer(url, api_key=key, klass="batch", headers=forged).status == 200
    wait_for(lambda: _route_requests(stack, mode, "qos_default") >= default + 3, 5, "counted")
    assert _route_requests(stack, mode, "qos_high") == high  # the forged header did nothing
    # The control: a class the policy routes high does take the HIGH route.
    assert infer(url, api_key=key, klass="interactive").status == 200
    wait_for(lambda: _route_requests(stack, mode, "qos_high") == high + 1, 5, "high route used")


# -- Triton killed: connection failures, readiness, no 404 on a lost view ----------------------


def test_triton_killed_connection_failures_release_and_readyz_fails(stack: LocalStack) -> None:
    """Runs last: Triton stays down for the rest of the module."""
    total = released(stack)
    unknown = "/v2/models/no-such-model/infer"
    wait_for(lambda: get_json(stack.admin_url + "/readyz")[0] == 200, 10, "ready before")
    assert stack.triton is not None and stack.triton.pid is not None
    os.kill(stack.triton.pid, signal.SIGKILL)

    status, body = 0, {}

    def not_ready() -> bool:
        nonlocal status, body
        status, body = get_json(stack.admin_url + "/readyz")
        return status == 503

    wait_for(not_ready, 10, "/readyz 503 with Triton down")  # fmt: skip
    assert body["status"] == "not_ready" and body["reason"] == "triton_not_ready"
    assert body["not_ready"] == ["triton triton-0: not ready"]
    assert get_json(stack.admin_url + "/healthz") == (200, {"status": "ok"})  # still alive

    for mode in MODES:
        url, key = stack.url(mode), f"k-down-{mode}"
        for _ in range(3):  # one more than the tenant's slots: each must come back
            refused = infer(url, api_key=key)
            assert refused.status == 503, (mode, refused)
            assert "x-qos-reason" not in refused.headers  # Envoy's connection failure
            total += 1
            # Released through the access log, a few ms after the answer.
            wait_for(lambda t=total: released(stack) >= t, 5, f"[{mode}] lease released")
        # The counter is global (a late release of an earlier test may move it): the tenant's
        # own slots are what must come back.
        wait_for(lambda k=key: slots_free(stack, k), 5, f"[{mode}] the tenant's slots back")
        # The sidecar's view of Triton is gone: a model it cannot check is not called unknown.
        reply = post(url + unknown, {"inputs": []}, {"x-api-key": key})
        assert reply.status == 503 and "x-qos-reason" not in reply.headers, (mode, reply)
    wait_for(lambda: released(stack) >= total + len(MODES), 5, "every lease released")
