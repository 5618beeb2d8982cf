"""The fleet benchmark runs end to end on its smallest scenario and writes what it promises:
the TARGET lines last, results.json and report.md. The measured values are not asserted
(a 3 s window on a shared machine proves nothing); that the run measured real traffic is."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.binaries import require_binaries

pytestmark = pytest.mark.stack
TARGET_LINE = re.compile(r"^TARGET (?P<name>[\w.-]+): .+ \(.+\) (?P<result>met|missed)$")


def test_fleet_benchmark_tiny_run_writes_targets_and_results(tmp_path: Path) -> None:
    require_binaries("envoy", "triton", "valkey")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.fleet", "--quick", "--scenarios", "rate",
         "--scale", "0.1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (out,) = list(tmp_path.iterdir())
    results = json.loads((out / "results.json").read_text())
    targets = results["targets"]
    names = {t["name"] for t in targets}
    assert {
        "tenant_rate_single_metered-a",
        "tenant_rate_single_metered-b",
        "bucket_bound_single_metered-a",
        "bucket_bound_single_metered-b",
        "bucket_bound_single_metered-l",  # leased mode, its model counted
        "concurrency_cap_single",
        "leaked_leases_rate_single",
    } <= names
    for target in targets:
        assert set(target) == {"scenario", "name", "value", "goal", "met"}
        assert isinstance(target["met"], bool)
    # The output ends with exactly one TARGET line per target, in the contract's form.
    tail = done.stdout.strip().splitlines()[-len(targets) :]
    assert [TARGET_LINE.match(line) is not None for line in tail] == [True] * len(targets), tail
    assert [m["name"] for m in map(TARGET_LINE.match, tail) if m] == [t["name"] for t in targets]
    metrics = results["scenarios"]["rate"]["metrics"]
    assert metrics["sent"] > 0 and metrics["cap_samples"] > 0
    assert metrics["metered-a_rate_ratio"] > 0  # requests really went through the fleet
    assert metrics["leased_slice_calls"] > 0  # metered-l's requests spent slices
    assert results["meta"]["command"].startswith("python -m benchmarks.fleet")
    assert "| rate |" in (out / "report.md").read_text()
