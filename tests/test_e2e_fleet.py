"""Issue 10 §1 on the real stack: priority and tenant weights across a gateway tier's replicas.

Two sidecar processes on one Valkey front one pool (one real Triton) capped at one request
in flight. Replica A holds a batch request, replica B an interactive one. When the running
request completes through A (its Envoy's access log reaches A), the room must go to B's
interactive request: alone, A would hand it to its own batch waiter at once. Decisions are
asked of each sidecar's ext_authz HTTP listener directly, as Envoy would, and the completion
is sent on A's access-log stream, as Envoy sends it. Then tenant weights: A holds only a
tenant of weight 3, B only one of weight 1, and the room must go 3 to 1 between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import grpc
import pytest
import redis
from envoy.service.accesslog.v3 import als_pb2_grpc

from devstack.procs import ValkeyProcess
from devstack.sidecar_proc import SidecarProcess
from devstack.triton import TritonProcess
from tests.stack_client import (
    INFER_PATH,
    Reply,
    in_background,
    key_digest,
    metric_value,
    post,
    wait_for,
    write_policy_file,
)
from tests.test_listener_auth import access_log_of, one

pytestmark = pytest.mark.stack
HOLD_MS = 4000


def write_policy(directory: Path) -> Path:
    keys = {name: key_digest(f"k-{name}") for name in ("app", "etl", "heavy", "light")}
    overload = "{admit_below: 100, shed_above: 1000, max_in_flight: 1}"
    return write_policy_file(
        directory,
        f"""
classes:
  interactive:
    rank: 1
    latency_objective_ms: 5000
    max_wait_ms: {HOLD_MS}
    triton_priority: 1
    overload: {overload}
  batch:
    rank: 3
    latency_objective_ms: 20000
    max_wait_ms: {HOLD_MS}
    triton_priority: 3
    overload: {overload}
tenants:
  app:
    match: {{api_key_sha256: [{keys["app"]}]}}
    allowed_classes: [interactive]
    default_class: interactive
  etl:
    match: {{api_key_sha256: [{keys["etl"]}]}}
    allowed_classes: [batch]
    default_class: batch
  heavy:
    match: {{api_key_sha256: [{keys["heavy"]}]}}
    allowed_classes: [interactive]
    default_class: interactive
    weight: 3
  light:
    match: {{api_key_sha256: [{keys["light"]}]}}
    allowed_classes: [interactive]
    default_class: interactive
""",
    )


def ask(sidecar: SidecarProcess, key: str) -> Reply:
    url = f"http://127.0.0.1:{sidecar.http_port}/authz{INFER_PATH}"
    return post(url, {}, {"x-api-key": key}, timeout_s=30)


def complete(sidecar: SidecarProcess, lease: str) -> None:
    """One access-log entry naming `lease`, on the sidecar's stream, as Envoy sends it."""

    async def send() -> None:
        async with grpc.aio.insecure_channel(sidecar.grpc_target) as channel:
            auth = (("x-qos-auth", sidecar.auth_token),) if sidecar.auth_token else ()
            stub = als_pb2_grpc.AccessLogServiceStub(channel)
            await stub.StreamAccessLogs(one(access_log_of(lease)), metadata=auth)

    asyncio.run(send())


def two_replicas(
    stack: contextlib.ExitStack, work: Path, valkey: ValkeyProcess, triton: TritonProcess
) -> tuple[SidecarProcess, SidecarProcess]:
    """Two sidecar processes on `valkey`, watching `triton` every 50 ms, with this module's
    policy."""
    policy = write_policy(work / "policies")
    env = {
        "QOS_TRITON_URLS": triton.http_url,
        "QOS_TRITON_METRICS_URLS": triton.metrics_url,
        "QOS_TRITON_SCRAPE_MS": "50",
    }
    a, b = (
        stack.enter_context(
            SidecarProcess(work, policy, redis_url=valkey.url, transport="tcp", extra_env=env)
        )
        for _ in range(2)
    )
    return a, b


def counted_by_each(*replicas: SidecarProcess) -> None:
    """Wait until every replica counts the pool's one request in flight."""
    for replica in replicas:
        wait_for(
            lambda s=replica: metric_value(s.admin_url, "qos_model_in_flight_requests") == 1,
            10,
            "every replica counts the running request",
        )


def test_the_room_goes_to_the_better_band_held_on_another_replica(
    valkey_and_triton: tuple[Path, ValkeyProcess, TritonProcess],
) -> None:
    work, valkey, triton = valkey_and_triton
    store = redis.Redis.from_url(valkey.url, decode_responses=True)
    store.flushall()
    with contextlib.ExitStack() as stack:
        a, b = two_replicas(stack, work, valkey, triton)
        first = ask(a, "k-etl")
        assert first.status == 200  # the pool's one slot
        counted_by_each(a, b)
        batch_thread, batch = in_background(lambda: ask(a, "k-etl"))
        interactive_thread, interactive = in_background(lambda: ask(b, "k-app"))
        for sidecar in (a, b):
            wait_for(
                lambda s=sidecar: metric_value(s.admin_url, "qos_held_requests") == 1,
                10,
                "one request held on each replica",
            )
        time.sleep(0.5)  # ten exchanges (every 50 ms): each replica has seen the other's hold
        complete(a, first.headers["x-qos-lease"])
        started = time.monotonic()
        interactive_thread.join(HOLD_MS / 1000 + 5)
        assert interactive[0].status == 200, interactive[0]
        waited_s = time.monotonic() - started
        batch_thread.join(HOLD_MS / 1000 + 5)
        # The batch request never got the room: held to its max wait, then shed as
        # overloaded (the listener's 430, which the shipped Envoy config turns into a 503).
        assert batch[0].headers.get("x-qos-reason") == "overloaded", batch[0]
        print(f"\ninteractive on B admitted {waited_s * 1000:.0f} ms after the slot freed on A")
        assert store.zcard("qos:{=simgpu}:model_leases") == 1
    store.close()


def test_tenant_weights_hold_across_replicas_that_each_hold_one_tenant(
    valkey_and_triton: tuple[Path, ValkeyProcess, TritonProcess],
) -> None:
    """Replica A holds only `heavy` (weight 3), B only `light` (weight 1), for a pool of one
    slot: neither replica can weigh them alone, so the order the room goes in is the fleet's
    shared counters' doing. Of the first four let go, three are heavy's (equal weights would
    alternate, two each)."""
    work, valkey, triton = valkey_and_triton
    store = redis.Redis.from_url(valkey.url, decode_responses=True)
    store.flushall()
    each = 4
    with contextlib.ExitStack() as stack:
        a, b = two_replicas(stack, work, valkey, triton)
        running = (a, ask(a, "k-etl"))  # the pool's one slot
        assert running[1].status == 200
        counted_by_each(a, b)
        waiting = [
            (replica, tenant, *in_background(lambda r=replica, t=tenant: ask(r, f"k-{t}")))
            for replica, tenant in ((a, "heavy"), (b, "light"))
            for _ in range(each)
        ]
        # Pass or fail, the rest expire (HOLD_MS) and answer before the replicas stop.
        stack.callback(lambda: [w[2].join(HOLD_MS / 1000 + 5) for w in waiting])
        for replica in (a, b):
            wait_for(
                lambda s=replica: metric_value(s.admin_url, "qos_held_requests") == each,
                10,
                "each replica holds its tenant's requests",
            )
        time.sleep(0.5)  # ten exchanges (every 50 ms): each replica has seen the other's holds
        taken: set[int] = set()
        tenants: list[str] = []

        def let_go() -> list[int]:
            return [i for i, w in enumerate(waiting) if w[3] and i not in taken]

        for _ in range(each):  # free the slot, see who takes it, and so on
            complete(running[0], running[1].headers["x-qos-lease"])
            wait_for(lambda: len(let_go()) == 1, 10, "the next held request let go")
            index = let_go()[0]
            taken.add(index)
            replica, tenant, _, out = waiting[index]
            assert out[0].status == 200, out[0]
            tenants.append(tenant)
            running = (replica, out[0])
        assert tenants.count("heavy") == 3, tenants
    store.close()
