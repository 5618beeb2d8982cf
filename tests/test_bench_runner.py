"""The QoS benchmark's system start (benchmarks/runner.py) with a real Envoy."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from benchmarks import runner
from benchmarks.runner import SYSTEMS_BY_NAME, Backend, start_system
from tests.binaries import require_binaries

pytestmark = pytest.mark.stack


def bare_backend(workdir: Path) -> Backend:
    """What the passthrough system's Envoy needs of a backend: a Triton port to route to
    (nothing listens there)."""
    return Backend(
        workdir, triton=cast(Any, SimpleNamespace(http_port=1)), valkey=None, model=cast(Any, None)
    )


def test_envoy_starts_again_on_fresh_ports_when_its_port_was_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listener's port was free when picked and taken before Envoy bound it."""
    require_binaries("envoy")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        picks = [busy, busy]  # the first two starts find it taken
        real = runner.free_port
        monkeypatch.setattr(runner, "free_port", lambda: picks.pop(0) if picks else real())
        backend = bare_backend(tmp_path)
        with start_system(SYSTEMS_BY_NAME["passthrough"], backend) as url:
            assert not picks and not url.endswith(f":{busy}")
            try:  # Envoy answers (Triton is not there: 503)
                status = urllib.request.urlopen(url + "/v2/health/ready", timeout=5).status
            except urllib.error.HTTPError as exc:
                status = exc.code
            assert status in (200, 503)


def test_envoy_gives_up_after_its_tries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_binaries("envoy")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        monkeypatch.setattr(runner, "free_port", lambda: busy)
        backend = bare_backend(tmp_path)
        system = start_system(SYSTEMS_BY_NAME["passthrough"], backend)
        with pytest.raises(runner.ProcessStartError, match="Address already in use"), system:
            pass
