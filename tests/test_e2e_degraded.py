"""The degraded mode on the real stack (Envoy in ext_authz HTTP mode, Triton, Valkey, the
sidecar): a Valkey restart that fails no call, and an outage under load in which the circuit
opens, decisions stop waiting for Redis and the tenant gets its local share.

Numbers (decision latency while the circuit is open, the admitted rate against the share)
are measured and printed; they are asserted only against generous bounds.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from devstack.procs import ValkeyProcess
from devstack.stack import LocalStack
from sidecar.state.keys import HEARTBEATS_KEY
from tests.binaries import require_binaries
from tests.stack_client import infer, metric_value, wait_for

pytestmark = [pytest.mark.stack, pytest.mark.faults]
RATE = 20.0  # the metered tenant's requests per second, fleet-wide
BURST = 4.0
REPLICAS = 2  # this sidecar and one other, whose heartbeat the test writes
OUTAGE_S = 4.0
REDIS_TIMEOUT_MS = 200  # long, so that a decision that waited for Redis is plain to see
LOAD_THREADS = 4
SPENT_RATE, SPENT_BURST = 0.05, 6  # a bucket that refills one request per 20 s
EPOCH_S = 1704067200  # the Lua prelude's epoch: heartbeat scores are seconds since it


def _tenant(name: str, body: str) -> str:
    key = hashlib.sha256(f"k-{name}".encode()).hexdigest()
    return f"  {name}:\n    match:\n      api_key_sha256: [{key}]\n{body}"


def write_policy(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policy.yaml").write_text(
        "identity:\n  sources:\n    - {kind: api_key, header: x-api-key}\n"
        "unknown_tenants: {action: reject}\n"
        "classes:\n"  # on_state_error left out: local_share, the default
        "  standard: {rank: 2, latency_objective_ms: 2000, max_wait_ms: 0, triton_priority: 2}\n"
        "tenants:\n"
        + _tenant(
            "metered",
            "    allowed_classes: [standard]\n    default_class: standard\n"
            f"    buckets: [{{unit: requests, rate: {RATE}, burst: {BURST}}}]\n",
        )
        + _tenant(
            "free",
            "    allowed_classes: [standard]\n    default_class: standard\n"
            "    max_concurrency: 16\n",
        )
        + _tenant(
            "spent",
            "    allowed_classes: [standard]\n    default_class: standard\n"
            f"    buckets: [{{unit: requests, rate: {SPENT_RATE}, burst: {SPENT_BURST}}}]\n",
        )
        + _tenant(
            "sliced",  # leased mode: slices of 2 (0.05/s x 40 s), spent here
            "    allowed_classes: [standard]\n    default_class: standard\n"
            f"    buckets: [{{unit: requests, rate: {SPENT_RATE}, burst: {SPENT_BURST}, "
            "lease_ms: 40000}]\n",
        )
        + _tenant(
            "leased",  # leased mode, no model counted: its admits carry no lease at all
            "    allowed_classes: [standard]\n    default_class: standard\n"
            "    buckets: [{unit: requests, rate: 100, burst: 100, lease_ms: 1000}]\n",
        )
        + _tenant(
            "owing",
            "    allowed_classes: [standard]\n    default_class: standard\n"
            f"    buckets: [{{unit: requests, rate: {SPENT_RATE}, burst: {SPENT_BURST}}}]\n",
        )
    )
    return directory


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    require_binaries("envoy", "triton", "valkey")
    work = tmp_path_factory.mktemp("degraded")
    env = {"QOS_REDIS_TIMEOUT_MS": str(REDIS_TIMEOUT_MS)}
    with LocalStack(work, write_policy(work / "policies"), modes=("http",), sidecar_env=env) as s:
        yield s


def restart_valkey(stack: LocalStack) -> None:
    """SIGKILL the stack's Valkey (stopped or not), reap it, and start a fresh, empty one on
    the same port: the sidecar's pooled connections all point at the dead one."""
    old = stack.valkey
    assert old is not None and old.pid is not None
    os.kill(old.pid, signal.SIGKILL)
    wait_for(lambda: not old.ping(timeout=0.2), 5, "Valkey gone")
    old.stop()
    stack.valkey = stack._exit.enter_context(ValkeyProcess(old.workdir, port=old.port))


def counters(stack: LocalStack) -> tuple[float, float]:
    url = stack.admin_url
    return (
        metric_value(url, "qos_state_errors_total", operation="acquire"),
        metric_value(url, "qos_decisions_total", reason="admitted_fail_open"),
    )


def test_a_valkey_restart_fails_no_decision(stack: LocalStack) -> None:
    """Connections pooled before the restart are dead, and no decision may fail on one.
    (redis-py 8 already reconnects at checkout an idle connection whose peer has closed; the
    store's retry covers one that dies between checkout and answer: test_state_retry.py.)"""
    url = stack.url("http")
    # Fill the pool: concurrent requests leave several connections behind.
    threads = [
        threading.Thread(target=lambda: [infer(url, api_key="k-free") for _ in range(10)])
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    restart_valkey(stack)
    # A background call may have met the dead server twice and opened the circuit: a probe
    # (retried on a fresh connection) closes it within a second.
    wait_for(lambda: metric_value(stack.admin_url, "qos_degraded") == 0, 5, "circuit closed")
    errors, fail_open = counters(stack)
    statuses = [infer(url, api_key="k-free").status for _ in range(40)]
    assert statuses == [200] * 40
    assert counters(stack) == (errors, fail_open)  # no decision met a dead connection


def test_admits_without_a_lease_count_in_their_tenants_experience(stack: LocalStack) -> None:
    """Leased mode's admits (a policy that counts no model) carry no lease, and Envoy's
    access-log entries for them nothing to release; their tenant's latency and SLO are still
    recorded, from the grant headers the sidecar set upstream."""
    url = stack.url("http")
    statuses = [infer(url, api_key="k-leased").status for _ in range(10)]
    assert statuses == [200] * 10
    wait_for(
        lambda: metric_value(stack.admin_url, "qos_slo_requests_total", tenant="leased") == 10,
        10,
        "the ten completions in the tenant's experience",
    )
    assert metric_value(stack.admin_url, "qos_slice_calls_total", call="slice") >= 1


def _decision_quantiles(before: dict[str, float], after: dict[str, float]) -> dict[float, str]:
    """p50 and p99 of the decisions between two histogram readings, as bucket upper bounds."""
    bounds = sorted(before, key=lambda le: float(le))
    total = after["+Inf"] - before["+Inf"]
    found = {}
    for q in (0.5, 0.99):
        found[q] = next(le for le in bounds if after[le] - before[le] >= q * total)
    return found


def _histogram(stack: LocalStack) -> dict[str, float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(stack.admin_url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    buckets: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "qos_decision_duration_seconds_bucket":
                le = sample.labels["le"]
                buckets[le] = buckets.get(le, 0.0) + sample.value
    return buckets


class Load:
    """LOAD_THREADS clients sending the metered tenant's requests as fast as they can."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.admitted: list[float] = []  # when each 200 came back (monotonic)
        self.others: list[int] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(4)]

    def _run(self) -> None:
        while not self.stop.is_set():
            status = infer(self.url, api_key="k-metered").status
            (
                self.admitted.append(time.monotonic())
                if status == 200
                else self.others.append(status)
            )

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


def another_replica(stack: LocalStack) -> None:
    """Write a second replica's heartbeat (an hour long) and wait until the sidecar counts it."""
    assert stack.valkey is not None
    client = redis.Redis.from_url(stack.valkey.url)
    seconds, _ = client.time()
    client.zadd(HEARTBEATS_KEY, {"another-replica": seconds - EPOCH_S + 3600})
    client.close()
    wait_for(lambda: metric_value(stack.admin_url, "qos_replicas") == REPLICAS, 10, "2 replicas")


def test_valkey_down_under_load_fails_fast_and_admits_the_local_share(stack: LocalStack) -> None:
    another_replica(stack)
    assert stack.valkey is not None
    degraded_s = metric_value(stack.admin_url, "qos_degraded_seconds_total")

    with Load(stack.url("http")) as load:
        wait_for(lambda: len(load.admitted) >= 10, 10, "load admitted")
        os.kill(stack.valkey.pid or 0, signal.SIGSTOP)  # answers nothing: calls time out
        opened_at = wait_for(
            lambda: metric_value(stack.admin_url, "qos_degraded") == 1, 10, "circuit open"
        )
        time.sleep(0.5)  # decisions already waiting for Redis when it opened end
        histogram, started = _histogram(stack), time.monotonic()
        time.sleep(OUTAGE_S)  # the load runs on, degraded
        ended, histogram_after = time.monotonic(), _histogram(stack)
        restart_valkey(stack)
        restarted_at = time.monotonic()
        closed_at = wait_for(
            lambda: metric_value(stack.admin_url, "qos_degraded") == 0, 10, "circuit closed"
        )
    quantiles = _decision_quantiles(histogram, histogram_after)
    admitted = sum(1 for t in load.admitted if started <= t < ended)
    share = RATE / REPLICAS * (ended - started) + BURST / REPLICAS
    print(
        f"\ndegraded {closed_at - opened_at:.1f}s, closed {closed_at - restarted_at:.2f}s after "
        f"Valkey was back; decisions while open: "
        f"p50 <= {float(quantiles[0.5]) * 1000:g} ms, p99 <= {float(quantiles[0.99]) * 1000:g}"
        f" ms (Redis timeout {REDIS_TIMEOUT_MS} ms); admitted {admitted} in "
        f"{ended - started:.1f}s against a share of {share:.1f}: {admitted / share:.2f}x"
    )
    # Fail fast: while open, no decision waited for the Redis timeout (generous: a quarter).
    assert float(quantiles[0.99]) <= REDIS_TIMEOUT_MS / 1000 / 4
    # Bounded: at most 1.1x this replica's share, and not shut off either.
    assert share / 3 <= admitted <= 1.1 * share
    assert set(load.others) <= {429, 503}
    assert metric_value(stack.admin_url, "qos_completions_total", result="released") > 0
    assert metric_value(stack.admin_url, "qos_degraded_seconds_total") > degraded_s + OUTAGE_S / 2

    # Back: no lease left anywhere once the load stops, and the tenant is admitted normally.
    def no_lease() -> bool:
        assert stack.valkey is not None
        with redis.Redis.from_url(stack.valkey.url) as fresh:
            return not fresh.keys("qos:{metered}:*leases*")

    wait_for(no_lease, 10, "no lease left in Valkey")
    # The leases taken locally while it was down were released locally (the gauge is read
    # every heartbeat, 2 s); some were taken.
    wait_for(lambda: metric_value(stack.admin_url, "qos_local_leases") == 0, 10, "local leases")
    errors, fail_open = counters(stack)
    # (The load ran on after the return and may have emptied the bucket for a few ms.)
    wait_for(lambda: infer(stack.url("http"), api_key="k-metered").status == 200, 5, "admitted")
    assert counters(stack) == (errors, fail_open)


def stall_valkey(stack: LocalStack) -> None:
    """SIGSTOP Valkey (it answers nothing, calls time out) and wait for the circuit to open."""
    assert stack.valkey is not None and stack.valkey.pid is not None
    os.kill(stack.valkey.pid, signal.SIGSTOP)
    wait_for(lambda: metric_value(stack.admin_url, "qos_degraded") == 1, 10, "circuit open")


def end_stall(stack: LocalStack) -> None:
    """A fresh Valkey in the stopped one's place, and the circuit closed again."""
    restart_valkey(stack)
    wait_for(lambda: metric_value(stack.admin_url, "qos_degraded") == 0, 10, "circuit closed")


@pytest.mark.parametrize("tenant", ["spent", "sliced"])
def test_a_spent_bucket_stays_spent_through_a_valkey_stall(stack: LocalStack, tenant: str) -> None:
    """A stall must not hand a tenant a fresh burst: its local share starts from what this
    replica spent through the store (here all of it), not from full. In exact mode and in
    leased mode (slices taken from the store, spent here)."""
    another_replica(stack)  # the share: 1/2 of the bucket, 3 requests, one per 40 s
    url = stack.url("http")
    statuses = [infer(url, api_key=f"k-{tenant}").status for _ in range(SPENT_BURST + 2)]
    assert statuses == [200] * SPENT_BURST + [429, 429]  # the fleet's bucket, spent
    stall_valkey(stack)
    try:
        during = [infer(url, api_key=f"k-{tenant}") for _ in range(4)]
    finally:
        end_stall(stack)
    assert [reply.status for reply in during] == [429] * 4
    # Refused by the local share (a 429 with the bucket's wait), not by the store.
    assert all(reply.json()["reason"] == "over_rate" for reply in during), during[0].body
    assert int(during[0].headers["retry-after"]) >= 10


def test_what_a_stall_admitted_is_charged_to_valkey_once_it_is_back(stack: LocalStack) -> None:
    """Burst 6 over 2 replicas: the local share admits 3 during the stall. Valkey comes back
    (empty: a restart), and is charged those 3, so the tenant gets 3 more, not a whole 6."""
    another_replica(stack)
    url = stack.url("http")
    stall_valkey(stack)
    try:
        during = [infer(url, api_key="k-owing").status for _ in range(SPENT_BURST // 2 + 1)]
    finally:
        end_stall(stack)
    assert during == [200] * (SPENT_BURST // 2) + [429]
    assert stack.valkey is not None
    with redis.Redis.from_url(stack.valkey.url) as client:
        # Settled with the next heartbeat (every 2 s): the tenant's bucket is in Valkey.
        wait_for(lambda: bool(client.keys("qos:{owing}:*")), 10, "the local admits charged")
    after = [infer(url, api_key="k-owing").status for _ in range(SPENT_BURST)]
    assert after == [200] * (SPENT_BURST // 2) + [429] * (SPENT_BURST // 2)
