"""benchmarks/tombstone_expiry.py runs end to end and shows the store's layout: a burst of
releases leaves no key per lease (the tombstones are members of the tenant's one set), so
nothing of theirs is left for Redis to expire in bulk. Checks shape and counts, never
latency values (this machine is shared and noisy)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks import tombstone_expiry
from tests.binaries import require_binaries

pytestmark = [
    pytest.mark.stack,
    pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler"),
]


def test_a_burst_of_releases_leaves_a_handful_of_keys(tmp_path: Path) -> None:
    require_binaries("envoy", "valkey")
    args = ["--ttl", "2", "--burst", "0.5", "--window", "0.5", "--rate", "200"]
    assert tombstone_expiry.main([*args, "--out", str(tmp_path)]) == 0
    (out,) = list(tmp_path.iterdir())
    results = json.loads((out / "results.json").read_text())
    assert results["burst"]["completed"] > 100
    # The tenant's bucket, lease set and tombstone set (a key per lease before: thousands).
    assert results["burst"]["keys_after"] <= 5
    for name in ("calm", "expiry"):
        window = results[name]
        assert window["completed"] > 0 and window["keys"] <= 5, (name, window)
        assert window["expire_stalls"] >= 0 and window["latency_ms"]["p99"] > 0
