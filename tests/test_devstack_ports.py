"""free_port (devstack/procs.py): ports below the kernel's ephemeral range, never one in use."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from devstack import procs, valkey_cluster


def ephemeral_low() -> int:
    if not procs.EPHEMERAL_RANGE.exists():
        pytest.skip("no /proc/sys/net/ipv4/ip_local_port_range here")
    return int(procs.EPHEMERAL_RANGE.read_text().split()[0])


def test_ports_come_from_below_the_ephemeral_range_and_are_not_handed_out_twice() -> None:
    low = ephemeral_low()
    if low - procs.LOWEST_PORT < procs.MIN_SPAN:
        pytest.skip("this kernel's ephemeral range leaves no room below it")
    ports = [procs.free_port() for _ in range(50)]
    assert all(procs.LOWEST_PORT <= p < low for p in ports)
    assert len(set(ports)) == len(ports)


def test_a_port_in_use_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    ephemeral_low()
    with socket.socket() as held:
        held.bind((procs.LOCALHOST, 0))
        held.listen()
        busy = held.getsockname()[1]
        offered = [busy, busy]  # offered twice, then whatever the draw gives
        choice = procs.random.choice
        monkeypatch.setattr(
            procs.random, "choice", lambda r: offered.pop(0) if offered else choice(r)
        )
        port = procs.free_port()
    assert port != busy and not offered


def test_without_room_below_the_range_the_kernel_picks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    narrow = tmp_path / "ip_local_port_range"
    narrow.write_text(f"{procs.LOWEST_PORT + 100}\t60999\n")
    monkeypatch.setattr(procs, "EPHEMERAL_RANGE", narrow)
    assert procs.below_ephemeral() is None
    monkeypatch.setattr(procs, "EPHEMERAL_RANGE", tmp_path / "missing")
    assert procs.below_ephemeral() is None
    port = procs.free_port()
    assert port > 0 and procs.bindable(procs.LOCALHOST, port)


def test_a_cluster_node_is_never_given_a_port_or_bus_port_handed_out_already(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The nodes of one cluster get their ports before any starts: a draw that repeats an
    earlier node's port (or lands on its bus port) is drawn again, and each pick records both
    of its ports."""
    first = valkey_cluster._cluster_port()
    bus = first + valkey_cluster.BUS_OFFSET
    assert procs.handed_out(first) and procs.handed_out(bus)
    offered = [first, first]  # the earlier node's port twice, then whatever the draw gives
    draw = valkey_cluster.random.randint
    monkeypatch.setattr(
        valkey_cluster.random, "randint", lambda a, b: offered.pop(0) if offered else draw(a, b)
    )
    second = valkey_cluster._cluster_port()
    assert second != first and not offered
    assert not {second, second + valkey_cluster.BUS_OFFSET} & {first, bus}
