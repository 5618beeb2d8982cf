"""`qos-sidecar serve --workers 2` on the real stack (issue 11 §2, sidecar/workers.py).

Two worker processes share the ext_authz and gRPC TCP ports and one Valkey. Every new
connection lands on either worker, so: a tenant's burst is shared (exactly its burst admitted
over both), a lease granted by one worker is released by whichever receives its access-log
entry (one lease key), a worker that dies is started again, and SIGTERM stops them all.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from devstack.procs import LOCALHOST, ValkeyProcess, free_port
from devstack.sidecar_proc import SidecarProcess
from tests.binaries import require_binaries
from tests.stack_client import key_digest, metric_value, wait_for, write_policy_file
from tests.test_e2e_fleet import ask, complete

pytestmark = pytest.mark.stack
BURST = 20
CONCURRENCY = 2


def write_policy(directory: Path) -> Path:
    return write_policy_file(
        directory,
        f"""
classes:
  standard: {{rank: 2, latency_objective_ms: 2000, max_wait_ms: 500, triton_priority: 2}}
tenants:
  burst:
    match: {{api_key_sha256: [{key_digest("k-burst")}]}}
    allowed_classes: [standard]
    default_class: standard
    buckets: [{{unit: requests, rate: 1, per: minute, burst: {BURST}}}]
  conc:
    match: {{api_key_sha256: [{key_digest("k-conc")}]}}
    allowed_classes: [standard]
    default_class: standard
    max_concurrency: {CONCURRENCY}
""",
    )


def two_free_ports() -> int:
    """A port p such that p and p + 1 were free a moment ago (the workers' admin ports)."""
    while True:
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind((LOCALHOST, port + 1))
            except OSError:
                continue
        return port


def children_of(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


def admins(sidecar: SidecarProcess) -> list[str]:
    return [f"http://{LOCALHOST}:{sidecar.admin_port + i}" for i in range(2)]


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[SidecarProcess]:
    require_binaries("valkey")
    with ValkeyProcess(tmp_path / "valkey") as valkey:
        sidecar = SidecarProcess(
            tmp_path,
            write_policy(tmp_path / "policies"),
            redis_url=valkey.url,
            transport="tcp",
            # A loaded host must not push a Redis call past the default 50 ms: a timed-out
            # acquire is decided on the worker's local share, which the burst count below
            # cannot tell from over-admission. The test checks that none timed out.
            extra_env={"QOS_WORKERS": "2", "QOS_REDIS_TIMEOUT_MS": "2000"},
        )
        sidecar.admin_port = two_free_ports()
        with sidecar:
            for url in admins(sidecar):  # worker 0's readiness is the harness's; 1's here
                wait_for(lambda u=url: _answers(u), 30, f"{url} ready")
            yield sidecar


def _answers(url: str) -> bool:
    try:
        metric_value(url, "qos_decisions_total")
    except OSError:
        return False
    return True


def test_two_workers_share_one_burst_and_release_each_others_leases(
    workers: SidecarProcess,
) -> None:
    # Every ask opens its own connection: the kernel spreads them over both workers.
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: ask(workers, "k-burst").status, range(3 * BURST)))
    errors = sum(metric_value(url, "qos_state_errors_total") for url in admins(workers))
    assert errors == 0  # every decision was the store's: the count below is exact
    assert statuses.count(200) == BURST, statuses
    assert statuses.count(429) == 2 * BURST
    per_worker = [metric_value(url, "qos_decisions_total") for url in admins(workers)]
    assert sum(per_worker) == 3 * BURST and min(per_worker) > 0, per_worker

    # A lease from either worker, released on a fresh stream to either worker: a lease key
    # per worker would make about half of them bad_lease, and the tenant would stay full.
    def total(result: str) -> float:
        return sum(metric_value(u, "qos_completions_total", result=result) for u in admins(workers))

    for done in range(1, 13):
        leases = [ask(workers, "k-conc") for _ in range(CONCURRENCY)]
        assert [r.status for r in leases] == [200] * CONCURRENCY
        assert ask(workers, "k-conc").status == 429
        for reply in leases:
            complete(workers, reply.headers["x-qos-lease"])
        wait_for(
            lambda n=done: total("released") >= n * CONCURRENCY,
            10,
            "both releases of the round counted",
        )
    assert total("bad_lease") == 0


def test_a_dead_worker_is_started_again_and_sigterm_stops_them_all(
    workers: SidecarProcess,
) -> None:
    assert workers.pid is not None
    first = children_of(workers.pid)
    assert len(first) == 2
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(children_of(workers.pid or 0) - first) == 1, 20, "a new worker started")
    for url in admins(workers):
        wait_for(lambda u=url: _answers(u), 30, f"{url} answers again")
    assert ask(workers, "k-burst").status == 200
    survivors = children_of(workers.pid)
    assert workers.stop() == 0
    for pid in survivors:
        assert not os.path.exists(f"/proc/{pid}") or _is_zombie_free(pid)


def _is_zombie_free(pid: int) -> bool:
    """A pid still in /proc after its parent exited and was reaped can only be a new process
    that reused it or a zombie; neither is a worker left running."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"sidecar.cli" not in f.read()
    except FileNotFoundError:
        return True
