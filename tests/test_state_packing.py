"""Commands packed by hiredis (`state.redis_client.hiredis_packing`): the same bytes redis-py
packs, for every kind of argument the store sends, and redis-py's own packer for the rest."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from sidecar.state.redis_client import hiredis_packing, make_client

ARGS = [
    ("EVALSHA", "a" * 40, 3, "qos:{t}:leases", "qos:{t}:class_leases:i", "req-1", 10.0, 8),
    ("EVALSHA", "b" * 40, 1, "qos:{=m@pod-0}:model_leases", "add", "id", 0.1, 1 / 3, -0.0),
    ("ZADD", b"\xff\x00key", 1e-7, "é", 2**53 + 1, float("inf")),
    ("CLUSTER SLOTS",),  # a name with a space: redis-py splits it
    ("SET", "k", memoryview(b"value")),
]


def joined(chunks: list[bytes] | list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(chunk) for chunk in chunks)


@pytest.mark.parametrize("args", ARGS, ids=lambda a: str(a[0]))
def test_hiredis_packs_the_bytes_redis_py_packs(args: tuple[object, ...]) -> None:
    plain, fast = Connection(), hiredis_packing(Connection)()
    assert joined(fast.pack_command(*args)) == joined(plain.pack_command(*args))
    assert joined(fast.pack_commands([args, args])) == joined(plain.pack_commands([args, args]))


def test_what_hiredis_refuses_redis_py_still_refuses_its_way() -> None:
    with pytest.raises(DataError):
        hiredis_packing(Connection)().pack_command("SET", "k", True)


def test_the_class_is_made_once_and_never_wrapped_twice() -> None:
    fast = hiredis_packing(Connection)
    assert hiredis_packing(Connection) is fast
    assert hiredis_packing(fast) is fast


@pytest.mark.parametrize(
    ("url", "mode"),
    [
        ("redis://127.0.0.1:1/0", "single"),
        ("unix:///tmp/none.sock", "single"),
        ("127.0.0.1:1", "sentinel"),
    ],
)
def test_every_client_packs_with_hiredis(url: str, mode: str) -> None:
    client, _ = make_client(url, mode, "primary", 0.05, 4)
    assert client.connection_pool.connection_class.__name__.startswith("Hiredis")


def test_cluster_nodes_pack_with_hiredis_seeds_and_later_ones() -> None:
    cluster, _ = make_client("127.0.0.1:1,127.0.0.1:2", "cluster", "", 0.05, 4)
    manager = cluster.nodes_manager
    assert manager.connection_kwargs["connection_class"].__name__.startswith("Hiredis")
    assert all(
        n.connection_class.__name__.startswith("Hiredis") for n in manager.startup_nodes.values()
    )
