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
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

REDIS_MODES = ("single", "cluster", "sentinel")


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
        return cluster, []
    if mode == "sentinel":
        if not sentinel_master:
            raise ValueError("sentinel mode needs the primary's name (sentinel_master)")
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
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
        return client, list(sentinel.sentinels)
    raise ValueError(f"mode must be one of {', '.join(REDIS_MODES)}, not {mode!r}")
