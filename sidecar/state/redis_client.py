"""The redis-py client for each way Redis is deployed (`RedisQuotaStore`'s `mode`).

- `single`: `url` is one server's URL (`redis://`, `rediss://`, `unix://`), with a blocking
  pool: a call finding every connection busy waits for one within its deadline.
- `cluster`: `url` lists seed nodes (`host:port,...`). redis-py's cluster client learns the
  slot map from them, routes each call by its keys' hash tag, follows MOVED, and rereads the
  map after a connection error: how it finds a replica promoted after its primary died.
- `sentinel`: `url` lists the sentinels; `sentinel_master` names the primary they monitor.
  Each new connection asks them where the primary is, so a failover is followed once the
  store drops its old connections (it does on a connection error).
In every mode redis-py's own retries are off and every socket operation is bounded by the
store's timeout (redis_store.py says why).

Commands are packed by hiredis's C packer (`hiredis_packing`): redis-py's asyncio connections
pack in Python, which cost 14% of the sidecar's CPU at its maximum rate (every decision sends
scripts of 10-15 arguments). The bytes are the same (tests/test_state_packing.py); anything
hiredis does not take (a bool, a command name with a space) goes to redis-py's own packer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, Connection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

REDIS_MODES = ("single", "cluster", "sentinel")


class _HiredisPacking(AbstractConnection):
    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0] if args else None
        if not isinstance(name, str | bytes) or " " in str(name):
            return super().pack_command(*args)
        try:
            return [hiredis.pack_command(args)]
        except TypeError:  # a type hiredis does not take: redis-py's packer says what
            return super().pack_command(*args)


_PACKING: dict[type[Any], type[Any]] = {}
C = TypeVar("C", bound=AbstractConnection)


def hiredis_packing(connection_class: type[C]) -> type[C]:
    """`connection_class`, packing its commands with hiredis (see module rules)."""
    if issubclass(connection_class, _HiredisPacking):
        return connection_class
    if connection_class not in _PACKING:
        name = f"Hiredis{connection_class.__name__}"
        _PACKING[connection_class] = type(name, (_HiredisPacking, connection_class), {})
    return cast("type[C]", _PACKING[connection_class])


def parse_seeds(url: str) -> list[tuple[str, int]]:
    """`host:port` pairs from `url`, separated by commas, each optionally written
    `redis://host:port`. Raises ValueError for an empty list or a seed without a port."""
    seeds = []
    for raw in url.split(","):
        seed = raw.strip()
        if not seed:
            continue
        seed = seed.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
        host, sep, port = seed.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"expected HOST:PORT, got {raw.strip()!r}")
        seeds.append((host.strip("[]"), int(port)))
    if not seeds:
        raise ValueError("no HOST:PORT seed given")
    return seeds


def make_client(
    url: str, mode: str, sentinel_master: str, timeout_s: float, max_connections: int
) -> tuple[Redis | RedisCluster, list[Redis]]:
    """The redis-py client for `mode` (see module rules), and the clients it uses to find
    its server (sentinel mode: one per sentinel), which its owner closes too. Every socket
    operation is bounded by `timeout_s`, and redis-py's own retries are off (module rules)."""
    no_retry = Retry(NoBackoff(), 0)
    if mode == "single":
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=no_retry,
        )
        pool.connection_class = hiredis_packing(pool.connection_class)
        return Redis.from_pool(pool), []  # the client owns the pool and closes it
    seeds = parse_seeds(url)
    if mode == "cluster":
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in seeds],
            max_connections=max_connections,  # per node
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=no_retry,
        )
        # Nodes found later are made from these kwargs; the seeds were made already.
        cluster.nodes_manager.connection_kwargs["connection_class"] = hiredis_packing(Connection)
        for node in cluster.nodes_manager.startup_nodes.values():
            node.connection_class = hiredis_packing(node.connection_class)
        return cluster, []
    if mode == "sentinel":
        if not sentinel_master:
            raise ValueError("sentinel mode needs the primary's name (sentinel_master)")
        # redis-py typed Sentinel's constructor only in 8.x; the alias types it for both.
        make_sentinel = cast(Callable[..., Sentinel], Sentinel)
        sentinel = make_sentinel(
            seeds,
            sentinel_kwargs={"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s},
        )
        client: Redis = sentinel.master_for(
            sentinel_master,
            max_connections=max_connections,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=no_retry,
        )
        managed = client.connection_pool
        managed.connection_class = hiredis_packing(managed.connection_class)
        return client, list(sentinel.sentinels)
    raise ValueError(f"mode must be one of {', '.join(REDIS_MODES)}, not {mode!r}")
