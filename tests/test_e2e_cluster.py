"""Issue 10 §2 on the real stack: sidecar processes on a real Valkey Cluster.

Two sidecars (a gateway tier) share tenant concurrency through a 3-primary cluster: a limit
holds across both, and a completion through either frees the slot. Then the primary that
holds a tenant's keys is killed while both keep deciding: decisions never fail with anything
but the documented answers, the sidecars follow the promoted replica by themselves, and once
the releases they owe are done no lease is left.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest
import redis

from devstack.sidecar_proc import SidecarProcess
from devstack.valkey_cluster import ValkeyCluster
from sidecar.state.keys import KeyKind, build_key
from tests.binaries import require_binaries
from tests.stack_client import key_digest, metric_value, wait_for, write_policy_file
from tests.test_e2e_fleet import ask, complete

pytestmark = pytest.mark.stack
LIMIT = 3


def write_policy(directory: Path) -> Path:
    key = key_digest("k-app")
    return write_policy_file(
        directory,
        f"""
classes:
  standard: {{rank: 1, latency_objective_ms: 2000, max_wait_ms: 0, triton_priority: 1}}
tenants:
  app:
    match: {{api_key_sha256: [{key}]}}
    allowed_classes: [standard]
    default_class: standard
    max_concurrency: {LIMIT}
""",
    )


def test_a_cluster_shares_the_limit_and_survives_a_killed_primary() -> None:
    require_binaries("valkey")
    with tempfile.TemporaryDirectory(prefix="qos-e2e-cluster-") as tmp:
        work = Path(tmp)
        with ValkeyCluster(work) as cluster:
            policy = write_policy(work / "policies")
            env = {
                "QOS_REDIS_MODE": "cluster",
                "QOS_REDIS_TIMEOUT_MS": "100",
                "QOS_LEASE_KEY": "one-key-for-the-whole-fleet",  # a lease signed by A, freed by B
            }
            a = SidecarProcess(
                work, policy, redis_url=cluster.seeds, transport="tcp", extra_env=env
            )
            b = SidecarProcess(
                work, policy, redis_url=cluster.seeds, transport="tcp", extra_env=env
            )
            with a, b:
                leases_key = build_key("app", KeyKind.LEASES)
                primary = cluster.primary_for(leases_key)
                # One limit across both replicas: 3 admitted in turn, the 4th refused.
                admitted = [ask(s, "k-app") for s in (a, b, a)]
                assert [r.status for r in admitted] == [200, 200, 200]
                refused = ask(b, "k-app")
                assert (
                    refused.status == 429 and refused.headers["x-qos-reason"] == "over_concurrency"
                )
                # Completions through the other replica free them.
                for reply in admitted:
                    complete(b, reply.headers["x-qos-lease"])
                with cluster.client(primary) as node:
                    wait_for(lambda: node.zcard(leases_key) == 0, 10, "released through B")

                statuses = decide_through_a_kill(cluster, primary, a, b)
                # Local share (the default) while the primary is gone: one request in flight
                # at a time, so no 429 either.
                assert set(statuses) == {200}, statuses
                print(f"\nkilled primary: decisions {statuses}")
                for sidecar in (a, b):  # the circuit closed: decisions in the store again
                    wait_for(
                        lambda s=sidecar: metric_value(s.admin_url, "qos_degraded") == 0,
                        20,
                        "both replicas out of degraded mode",
                    )
                assert ask(a, "k-app").status == 200 and ask(b, "k-app").status == 200
                # The two admits just above hold a slot each; everything else was released
                # (owed releases retried until the new primary took them).
                store = redis.RedisCluster.from_url("redis://" + cluster.seeds.split(",")[0])
                try:
                    wait_for(lambda: store.zcard(leases_key) == 2, 15, "owed releases done")
                finally:
                    store.close()


def decide_through_a_kill(
    cluster: ValkeyCluster, primary: object, a: SidecarProcess, b: SidecarProcess
) -> dict[int, int]:
    """Admit and complete on both replicas for 6 s, killing `primary` after 1 s; how many
    decisions ended in each status, and when the primary was killed."""
    statuses: dict[int, int] = {}
    started, killed = time.monotonic(), False
    while time.monotonic() - started < 6.0:
        if not killed and time.monotonic() - started > 1.0:
            cluster.kill(primary)  # type: ignore[arg-type]
            killed = True
        for sidecar in (a, b):
            reply = ask(sidecar, "k-app")
            statuses[reply.status] = statuses.get(reply.status, 0) + 1
            if reply.status == 200:  # its Envoy's access log reaches the same sidecar
                complete(sidecar, reply.headers["x-qos-lease"])
    return statuses
