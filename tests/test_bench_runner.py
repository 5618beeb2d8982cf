"""The QoS benchmark's harness around Triton: what a run says when Triton is gone."""

from __future__ import annotations

import urllib.error
from typing import Any

import pytest

from benchmarks.runner import pending_requests
from devstack.procs import ProcessStartError, free_port


class _Gone:
    """Triton's two members `pending_requests` uses: a metrics port nobody listens on, and
    `check_alive` as a TritonProcess answers once it has exited (or not)."""

    def __init__(self, exited: bool) -> None:
        self.metrics_url = f"http://127.0.0.1:{free_port()}/metrics"
        self.exited = exited

    def check_alive(self) -> None:
        if self.exited:
            raise ProcessStartError("triton exited with status -9\n<the end of its log>")


def test_metrics_that_cannot_be_read_name_the_exit_of_a_triton_that_is_gone() -> None:
    gone: Any = _Gone(exited=True)
    with pytest.raises(ProcessStartError, match="exited with status -9"):
        pending_requests(gone)
    alive: Any = _Gone(exited=False)  # refused, but running: the error as it came
    with pytest.raises(urllib.error.URLError):
        pending_requests(alive)
