"""The QoS load generator times requests with Python's cyclic garbage collector off.

The generator shares its process with every earlier point's records; a full collection there
stopped its loop for up to 110 ms, which a 225 ms deadline cannot absorb
(benchmarks/loadgen.py). These check that a run really has the collector off, that overlapping
runs (the fleet benchmark runs one per replica, in threads) keep it off until the last ends,
and that a collector the caller had turned off stays off.
"""

from __future__ import annotations

import gc
import socket
import threading
import weakref
from collections.abc import Iterator

import pytest

from benchmarks import loadgen
from benchmarks.loadgen import GenOptions, collector_paused, prepare
from benchmarks.models import MODELS
from benchmarks.workload import WorkloadConfig, generate


@pytest.fixture(autouse=True)
def collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_run_sends_with_the_collector_off_and_turns_it_back_on() -> None:
    config = WorkloadConfig()
    schedule = generate(config, 50.0, 0.2, seed=1)
    prepared = prepare(schedule, MODELS["llm"], config.tenants, config.classes, GenOptions())
    seen: list[bool] = []
    result = loadgen.run(
        f"http://127.0.0.1:{_closed_port()}",
        prepared,
        {name: 1.0 for name in config.classes},
        on_progress=lambda _i: seen.append(gc.isenabled()),
    )
    # Nothing listens there: every request ends in a connection error, and is recorded.
    assert len(result.records) == len(prepared) > 0
    assert all(r.error for r in result.records)
    assert seen == [False]
    assert gc.isenabled()


def test_overlapping_runs_keep_it_off_until_the_last_one_ends() -> None:
    first_in, second_in, first_may_end = threading.Event(), threading.Event(), threading.Event()
    during: list[bool] = []

    def first() -> None:
        with collector_paused():
            first_in.set()
            second_in.wait(5)
            first_may_end.wait(5)

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait(5)
    with collector_paused():
        second_in.set()
        first_may_end.set()
        thread.join(5)
        during.append(gc.isenabled())  # the first run has ended; this one has not
    assert during == [False]
    assert gc.isenabled()


def test_a_collector_the_caller_turned_off_stays_off() -> None:
    gc.disable()
    with collector_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_garbage_from_before_and_during_a_run_is_collected_when_it_ends() -> None:
    class Node:
        def __init__(self) -> None:
            self.me = self

    gc.collect()
    gone: list[str] = []
    before = Node()
    before_ref = weakref.ref(before, lambda _r: gone.append("before"))
    del before
    with collector_paused():
        assert gone == ["before"]  # collected as the run began, not during it
        during = Node()
        during_ref = weakref.ref(during, lambda _r: gone.append("during"))
        del during
        assert during_ref() is not None  # a cycle: only the collector frees it
    assert gone == ["before", "during"]
    assert before_ref() is None and during_ref() is None
