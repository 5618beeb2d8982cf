"""The Redis store on a real local Valkey Cluster (3 primaries, 3 replicas) and behind Sentinel.

A cluster refuses any script whose keys span slots (CROSSSLOT), so every call below running at
all shows its keys share one hash tag. The failover test kills a primary under a loop of
decisions and measures the window; the bound it asserts is generous (the machine is shared),
the measured value is printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis

from devstack.procs import ValkeyProcess
from devstack.valkey_cluster import SentinelProcess, ValkeyCluster
from sidecar.core.types import BucketCheck, LeaseRef, QuotaCheck
from sidecar.errors import StateUnavailable
from sidecar.state.breaker import CircuitBreaker, GuardedStore
from sidecar.state.keys import HEARTBEATS_KEY, KeyKind, build_key, build_model_key
from sidecar.state.redis_store import RedisQuotaStore

pytestmark = pytest.mark.stack

MODEL = "llama"
# Short, as the service's renewed lease TTLs are: what a model entry left by a failed model
# step costs.
FAILOVER_TTL_S = 3.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[ValkeyCluster]:
    with tempfile.TemporaryDirectory(prefix="qos-cluster-") as tmp, ValkeyCluster(Path(tmp)) as c:
        yield c


def run(
    seeds: str, body: Callable[[RedisQuotaStore], Awaitable[None]], timeout_s: float = 2.0
) -> None:
    async def main() -> None:
        store = RedisQuotaStore(seeds, mode="cluster", timeout_s=timeout_s)
        try:
            await body(store)
        finally:
            await store.close()

    asyncio.run(main())


def check(
    tenant: str, lease_id: str | None = None, lease_ttl_s: float = 60.0, **kwargs: object
) -> QuotaCheck:
    return QuotaCheck(
        tenant=tenant,
        klass="gold",
        buckets=(BucketCheck(name="req", rate_per_s=1000.0, burst=1000.0, cost=1.0),),
        max_concurrency=kwargs.get("max_concurrency", 100),  # type: ignore[arg-type]
        max_class_concurrency=None,
        lease_ttl_s=lease_ttl_s,
        model=MODEL,
        lease_id=lease_id,
    )


def tenants_on_every_primary(cluster: ValkeyCluster, per_primary: int = 1) -> list[str]:
    """Tenant names whose keys land on each primary, `per_primary` of each."""
    found: dict[int, list[str]] = {node.port: [] for node in cluster.primaries}
    for i in itertools.count():
        tenant = f"t{i}"
        port = cluster.primary_for(build_key(tenant, KeyKind.LEASES)).port
        if len(found[port]) < per_primary:
            found[port].append(tenant)
        if all(len(names) == per_primary for names in found.values()):
            return [name for names in found.values() for name in names]
    raise AssertionError("unreachable")


def test_every_call_runs_on_the_cluster_and_tenants_spread_over_primaries(
    cluster: ValkeyCluster,
) -> None:
    tenants = tenants_on_every_primary(cluster)
    for node in cluster.primaries:  # every primary must load the scripts itself (NOSCRIPT)
        with cluster.client(node) as c:
            c.script_flush()

    async def body(store: RedisQuotaStore) -> None:
        leases = []
        for tenant in tenants:
            held = await store.acquire(check(tenant))
            assert held.allowed and held.in_flight == 1
            assert held.lease_id is not None
            leases.append(LeaseRef(tenant, "gold", held.lease_id, MODEL))
            denied = await store.acquire(check(tenant, max_concurrency=1))
            assert not denied.allowed
            await store.charge(tenant, [BucketCheck("req", 1000.0, 1000.0, 5.0)])
            assert await store.renew(tenant, [leases[-1]], 30.0) == {held.lease_id}
        assert await store.model_in_flight(MODEL) == len(tenants)
        for tenant in tenants:  # each tenant's lease is on the node that serves its tag
            key = build_key(tenant, KeyKind.LEASES)
            with cluster.client(cluster.primary_for(key)) as c:
                assert c.zcard(key) == 1
        pairs = [(tenant, klass) for tenant in tenants for klass in (None, "gold")]
        assert await store.in_flight_many(pairs) == dict.fromkeys(pairs, 1)
        assert await store.heartbeat("replica-a", 5.0) == 1
        assert await store.heartbeat("replica-b", 5.0) == 2
        assert await store.release(leases[0])
        assert not await store.release(leases[0])  # idempotent
        # Together: one script call per tenant, each on the primary of its tenant's tag, and
        # one for the model's set, all in one pipeline.
        assert await store.release_many(leases) == [False] + [True] * (len(leases) - 1)
        assert await store.release_many(leases) == [False] * len(leases)
        assert await store.in_flight_many(pairs) == dict.fromkeys(pairs, 0)
        assert await store.model_in_flight(MODEL) == 0

    run(cluster.seeds, body)
    # Each tenant's keys live on its own primary (three different nodes), the model's set and
    # the heartbeats in their own slots.
    homes = {cluster.primary_for(build_key(t, KeyKind.LEASES)).port for t in tenants}
    assert len(homes) == 3
    with cluster.client(cluster.primary_for(HEARTBEATS_KEY)) as c:
        assert c.zcard(HEARTBEATS_KEY) == 2
    for node in cluster.primaries:  # the NOSCRIPT fallback cached the scripts on each node
        with cluster.client(node) as c:
            assert c.execute_command("INFO", "memory")["number_of_cached_scripts"] >= 1


async def probe_while_open(store: GuardedStore) -> None:
    """What the app runs beside a guarded store: the probes that close its circuit."""
    while True:
        await asyncio.sleep(0.05)
        await store.probe()


class Loop:
    """Workers that acquire and release for `tenants` until stopped, recording each decision's
    time, latency and outcome. A failed acquire or release is owed a release (by its lease
    id, which makes it idempotent), done at the end, as the service does once Redis is back."""

    def __init__(self, store: GuardedStore, tenants: list[str]) -> None:
        self.store, self.tenants = store, tenants
        self.events: list[tuple[float, str, float, bool]] = []  # (t, tenant, latency_s, ok)
        self.owed: list[LeaseRef] = []
        self.stopped = False
        self._ids = itertools.count()

    async def worker(self, tenant: str) -> None:
        while not self.stopped:
            lease = LeaseRef(tenant, "gold", f"{tenant}-{next(self._ids)}", MODEL)
            start = time.monotonic()
            try:
                result = await self.store.acquire(check(tenant, lease.lease_id, FAILOVER_TTL_S))
                ok = True
            except StateUnavailable:
                ok, result = False, None
            self.events.append((start, tenant, time.monotonic() - start, ok))
            if result is None:
                self.owed.append(lease)
                await asyncio.sleep(0.005)
                continue
            assert result.allowed
            await asyncio.sleep(0.002)
            try:
                await self.store.release(lease)
            except StateUnavailable:
                self.owed.append(lease)


def test_a_killed_primary_is_followed_and_leaves_no_lease(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with tempfile.TemporaryDirectory(prefix="qos-failover-") as tmp, ValkeyCluster(Path(tmp)) as c:
        tenants = tenants_on_every_primary(c, per_primary=2)
        victim_tenant = tenants[0]
        victim = c.primary_for(build_key(victim_tenant, KeyKind.LEASES))
        replica = c.replicas[c.primaries.index(victim)]

        async def main() -> tuple[Loop, float]:
            redis_store = RedisQuotaStore(c.seeds, mode="cluster", timeout_s=0.1)
            store = GuardedStore(redis_store, CircuitBreaker(probe_interval_s=0.2))
            prober = asyncio.create_task(probe_while_open(store))
            try:
                loop = Loop(store, tenants)
                workers = [asyncio.create_task(loop.worker(t)) for t in tenants]
                await asyncio.sleep(0.5)
                killed_at = time.monotonic()
                await asyncio.to_thread(c.kill, victim)
                # Until every decision has succeeded for 1 s (the victim's tenant included).
                deadline = killed_at + 30.0
                while time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                    last_failure = max((t for t, _, _, ok in loop.events if not ok), default=0.0)
                    served = [
                        t for t, tenant, _, ok in loop.events if tenant == victim_tenant and ok
                    ]
                    if last_failure and served and served[-1] > last_failure + 1.0:
                        break
                loop.stopped = True
                await asyncio.gather(*workers)
                for lease in loop.owed:  # what the service owes once the store answers
                    await store.release(lease)
                counts = await redis_store.in_flight_many(
                    [(t, k) for t in tenants for k in (None, "gold")]
                )
                assert set(counts.values()) == {0}, counts
                # A model step that failed in the window (its node down, or its answer lost) is
                # not undone by the release; its entry expires with the lease TTL (base.py).
                model_deadline = time.monotonic() + 2 * FAILOVER_TTL_S + 5

                async def model_entries_left() -> int:
                    return await redis_store.model_in_flight(MODEL)

                while await model_entries_left() and time.monotonic() < model_deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.2)
                assert await redis_store.model_in_flight(MODEL) == 0
                return loop, killed_at
            finally:
                # Closed even when an assertion fails: a leaked connection would surface as
                # an unclosed-transport warning in whichever test runs next.
                prober.cancel()
                await store.close()

        loop, killed_at = asyncio.run(main())
        assert c.replicas[c.primaries.index(victim)] is replica
        with c.client(replica) as r:
            assert r.info("replication")["role"] == "master"  # promoted
        failures = [t for t, _, _, ok in loop.events if not ok and t >= killed_at]
        assert failures, "killing the primary failed no decision"
        first_failure, last_failure = min(failures), max(failures)
        recovered = [t for t, tenant, _, ok in loop.events if ok and t > last_failure]
        assert recovered, "the store never served the killed primary's slots again"
        assert any(
            t > last_failure + 1.0 for t, tenant, _, _ in loop.events if tenant == victim_tenant
        )
        window_s = min(recovered) - first_failure
        during = sorted(lat for t, _, lat, _ in loop.events if first_failure <= t <= min(recovered))
        p99_ms = during[min(len(during) - 1, int(len(during) * 0.99))] * 1000
        with capsys.disabled():
            print(
                f"\ncluster failover: window {window_s:.2f} s (first failed decision -> first"
                f" success after the last failure), decisions in it {len(during)}, latency p99"
                f" {p99_ms:.1f} ms, failed {len(failures)} of {len(loop.events)};"
                f" {len(loop.owed)} releases owed and done after"
            )
        assert window_s < 15.0  # promotion takes ~1.5 s (REFERENCE.md); generous for a busy box
        # Fail fast: a decision in the window costs at most about the store timeout (100 ms),
        # plus the slot-map refresh; generous for a shared machine.
        assert p99_ms < 1000
        # Every write went to a live node: the victim really is dead.
        assert not c.nodes[c.nodes.index(victim)].running


def test_sentinel_mode_finds_the_primary() -> None:
    with (
        tempfile.TemporaryDirectory(prefix="qos-sentinel-") as tmp,
        sentinel_pair(Path(tmp)) as (primary, _replica, sentinel),
    ):

        async def main() -> None:
            store = RedisQuotaStore(
                f"127.0.0.1:{sentinel.port}",
                mode="sentinel",
                sentinel_master="qos",
                timeout_s=2.0,
            )
            try:
                held = await store.acquire(check("acme", "req-1"))
                assert held.allowed and held.lease_id is not None
                assert await store.model_in_flight(MODEL) == 1
                await store.release(LeaseRef("acme", "gold", held.lease_id, MODEL))
            finally:
                await store.close()

        asyncio.run(main())
        # The writes went to the primary the sentinel named, and reached its replica.
        with redis.Redis(port=primary.port) as p:
            # The release's tombstone: written on the primary the sentinel named.
            assert p.zscore(build_key("acme", KeyKind.RELEASED), "req-1") is not None
            assert p.zcard(build_model_key(MODEL)) == 0


def test_sentinel_failover_is_followed_and_leaves_no_lease(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Kill the primary behind Sentinel under a loop of decisions: the sentinel promotes the
    replica, the store finds it by itself (redis-py's sentinel pool asks again after a
    connection error), and once every owed release is done no lease is left."""
    with (
        tempfile.TemporaryDirectory(prefix="qos-sentinel-") as tmp,
        sentinel_pair(Path(tmp)) as (primary, replica, sentinel),
    ):
        wait_replicated(sentinel.port, replica.port)

        async def main() -> tuple[Loop, float]:
            redis_store = RedisQuotaStore(
                f"127.0.0.1:{sentinel.port}",
                mode="sentinel",
                sentinel_master="qos",
                timeout_s=0.1,
            )
            store = GuardedStore(redis_store, CircuitBreaker(probe_interval_s=0.2))
            prober = asyncio.create_task(probe_while_open(store))
            try:
                loop = Loop(store, ["s1", "s2"])
                workers = [asyncio.create_task(loop.worker(t)) for t in ("s1", "s2")]
                await asyncio.sleep(0.5)
                killed_at = time.monotonic()
                assert primary.pid is not None
                os.kill(primary.pid, signal.SIGKILL)  # a crash, no handover
                deadline = killed_at + 30.0
                while time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                    failed = [t for t, _, _, ok in loop.events if not ok]
                    served = [t for t, _, _, ok in loop.events if ok]
                    if failed and served and served[-1] > max(failed) + 1.0:
                        break
                loop.stopped = True
                await asyncio.gather(*workers)
                for lease in loop.owed:
                    await store.release(lease)
                counts = await redis_store.in_flight_many([("s1", None), ("s2", None)])
                assert set(counts.values()) == {0}, counts
                return loop, killed_at
            finally:
                prober.cancel()
                await store.close()

        loop, killed_at = asyncio.run(main())
        with redis.Redis(port=replica.port) as r:
            assert r.info("replication")["role"] == "master"  # promoted
        failures = [t for t, _, _, ok in loop.events if not ok and t >= killed_at]
        assert failures, "killing the primary failed no decision"
        recovered = [t for t, _, _, ok in loop.events if ok and t > max(failures)]
        assert recovered, "the store never found the promoted replica"
        window_s = min(recovered) - killed_at
        with capsys.disabled():
            print(
                f"\nsentinel failover: {window_s:.2f} s from the kill to the first decision on"
                f" the promoted replica (down-after 1 s), failed {len(failures)} of"
                f" {len(loop.events)}; {len(loop.owed)} releases owed and done after"
            )
        assert window_s < 20.0  # down-after 1 s + election + promotion; generous for CI


@contextlib.contextmanager
def sentinel_pair(tmp: Path) -> Iterator[tuple[ValkeyProcess, ValkeyProcess, SentinelProcess]]:
    """A primary, its replica, and one sentinel watching them as master "qos"."""
    with ValkeyProcess(tmp / "p") as primary:
        follows = ["--replicaof", "127.0.0.1", str(primary.port)]
        replica = ValkeyProcess(tmp / "r", extra_args=follows)
        with (
            replica,
            SentinelProcess(tmp / "s", primary_port=primary.port, master_name="qos") as sentinel,
        ):
            yield primary, replica, sentinel


def wait_replicated(sentinel_port: int, replica_port: int, timeout_s: float = 15.0) -> None:
    """Until the sentinel knows the replica (it learns it from the primary's INFO): before
    that, a failover has nobody to promote."""
    deadline = time.monotonic() + timeout_s
    with redis.Redis(port=sentinel_port) as s:
        while time.monotonic() < deadline:
            if s.execute_command("SENTINEL", "REPLICAS", "qos"):
                return
            time.sleep(0.1)
    raise AssertionError("the sentinel never saw the replica")
