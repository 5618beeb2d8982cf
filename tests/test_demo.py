"""The README's first command runs the demo; make sure it runs and reports sensibly."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.binaries import require_binaries

pytestmark = pytest.mark.stack


def test_demo_runs_and_reports_every_stream() -> None:
    require_binaries("envoy", "triton", "valkey")
    done = subprocess.run(
        [sys.executable, "-m", "devstack.demo", "--duration", "3", "--mode", "grpc"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    rows = {tuple(line.split()[:2]) for line in out.splitlines() if line[:1].isalpha()}
    for row in [("search", "interactive"), ("analytics", "interactive"), ("research", "batch")]:
        assert row in rows, out
    analytics = next(
        line for line in out.splitlines() if line.startswith("analytics   interactive")
    )
    assert "class_not_allowed" in analytics  # the policy forbids it: every one refused
    assert analytics.split()[3] == "0"  # admitted
    assert "sidecar decision time (holds included) over" in out
    # Token accounting through the ext_proc Envoy: the refund of the first two requests is
    # what lets the second in; the third's estimate no longer fits the bucket.
    assert "request 1: 400 prompt + 800 max tokens -> 200, generated 50" in out, out
    assert "request 2: 400 prompt + 800 max tokens -> 200, generated 50" in out, out
    assert "request 3: 400 prompt + 800 max tokens -> 429 over_rate" in out, out
    assert "2 reconciled" in out, out
