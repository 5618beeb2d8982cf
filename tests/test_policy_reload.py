"""PolicyHolder: the last good policy survives a bad edit, a good edit replaces it whole.

No sleeping: file changes are made visible to `changed()` with explicit os.utime calls, since
two writes within one mtime tick would otherwise look the same.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

import sidecar.policy.reload as reload_module
from sidecar.app import make_policy_holder
from sidecar.errors import PolicyError
from sidecar.metrics import Metrics
from sidecar.policy.reload import PolicyHolder, fingerprint
from sidecar.service import AdmissionService
from sidecar.state.memory import MemoryQuotaStore

POLICIES = Path(__file__).resolve().parent.parent / "policies"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def touch(path: Path, text: str | None = None) -> None:
    """Rewrite `path` (if `text`) and move its mtime a second past its current one."""
    if text is not None:
        path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "policies"
    shutil.copytree(POLICIES, folder)
    return folder


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1
    touch(path, text.replace(old, new))


def test_initial_invalid_policy_raises(policy_dir: Path) -> None:
    edit(policy_dir / "classes.yaml", "rank: 1", "rank: 0")
    with pytest.raises(PolicyError) as info:
        PolicyHolder([policy_dir])
    assert [p.message for p in info.value.problems] == [
        "classes.interactive.rank: must be at least 1, got 0"
    ]


def test_initial_load(policy_dir: Path) -> None:
    clock = Clock()
    holder = PolicyHolder([policy_dir], clock=clock)
    assert set(holder.current.tenants) == {"search", "analytics", "research", "anonymous"}
    assert holder.last_error is None
    assert holder.last_loaded_at == 1000.0
    assert (holder.reloads_ok, holder.reloads_failed) == (0, 0)
    assert not holder.changed()


def test_bad_edit_keeps_the_last_good_policy_and_records_the_error(policy_dir: Path) -> None:
    clock = Clock()
    results: list[bool] = []
    holder = PolicyHolder([policy_dir], on_result=results.append, clock=clock)
    good = holder.current

    tenants = policy_dir / "tenants.yaml"
    edit(tenants, "rate: 20\n", "rate: -20\n")
    assert holder.changed()
    clock.now = 2000.0
    assert holder.reload() is False

    assert holder.current is good
    assert holder.last_error is not None
    line = tenants.read_text().splitlines().index("        rate: -20") + 1
    assert [str(p) for p in holder.last_error.problems] == [
        f"{tenants}:{line}: tenants.search.buckets[0].rate: must be greater than 0, got -20"
    ]
    assert holder.last_loaded_at == 1000.0
    assert (holder.reloads_ok, holder.reloads_failed) == (0, 1)
    assert results == [False]
    # Seen once: the broken files are not reloaded on every poll until they change again.
    assert not holder.changed()


def test_good_edit_replaces_the_policy(policy_dir: Path) -> None:
    clock = Clock()
    results: list[bool] = []
    holder = PolicyHolder([policy_dir], on_result=results.append, clock=clock)
    first = holder.current
    tenants = policy_dir / "tenants.yaml"

    edit(tenants, "rate: 20\n", "rate: -20\n")
    assert holder.reload() is False

    edit(tenants, "rate: -20\n", "rate: 40\n")
    assert holder.changed()
    clock.now = 3000.0
    assert holder.reload() is True

    assert holder.current is not first
    assert holder.current.tenants["search"].buckets[0].rate_per_s == 40.0
    assert holder.current.version != first.version
    assert holder.last_error is None
    assert holder.last_loaded_at == 3000.0
    assert (holder.reloads_ok, holder.reloads_failed) == (1, 1)
    assert results == [False, True]
    assert not holder.changed()


def test_version_follows_content(policy_dir: Path) -> None:
    holder = PolicyHolder([policy_dir])
    first = holder.current.version
    models = policy_dir / "models.yaml"
    original = models.read_text()

    edit(models, "cost_per_request: 10", "cost_per_request: 12")
    assert holder.reload()
    assert holder.current.version != first

    # Back to the same bytes: back to the same version, whatever the mtime says.
    touch(models, original)
    assert holder.reload()
    assert holder.current.version == first


def test_changed_sees_edits_new_and_removed_files(policy_dir: Path) -> None:
    holder = PolicyHolder([policy_dir])
    assert not holder.changed()

    touch(policy_dir / "classes.yaml")  # same bytes, new mtime
    assert holder.changed()
    holder.reload()
    assert not holder.changed()

    extra = policy_dir / "extra.yaml"
    extra.write_text("# nothing yet\n")
    assert holder.changed()
    holder.reload()
    assert not holder.changed()

    extra.unlink()
    assert holder.changed()
    holder.reload()
    assert not holder.changed()

    # Files that are not policies do not count.
    (policy_dir / "README.txt").write_text("hello")
    assert not holder.changed()


def test_changed_sees_a_same_size_edit(policy_dir: Path) -> None:
    holder = PolicyHolder([policy_dir])
    models = policy_dir / "models.yaml"
    size = models.stat().st_size
    edit(models, "cost_per_request: 10", "cost_per_request: 20")
    assert models.stat().st_size == size
    assert holder.changed()


def test_a_deleted_file_fails_the_reload_and_keeps_the_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    shutil.copy(POLICIES / "classes.yaml", path)
    holder = PolicyHolder([path])
    good = holder.current
    path.unlink()
    assert holder.changed()
    assert holder.reload() is False
    assert holder.current is good
    assert holder.last_error is not None
    assert [str(p) for p in holder.last_error.problems] == [f"{path}:1: no such file or directory"]


def test_fingerprint_lists_each_policy_file(policy_dir: Path) -> None:
    names = [Path(entry[0]).name for entry in fingerprint([policy_dir])]
    assert names == ["classes.yaml", "identity.yaml", "models.yaml", "tenants.yaml"]
    missing = policy_dir / "missing.yaml"
    assert fingerprint([missing]) == ((str(missing), None, None),)


# -- the one home of the policy, and its reloads counted once ------------------------------


def reloads(metrics: Metrics, result: str) -> float:
    return metrics.registry.get_sample_value("qos_policy_reloads_total", {"result": result}) or 0


def last_reload_ok(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("qos_policy_last_reload_success")


def test_each_reload_is_counted_exactly_once(
    policy_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = Metrics(CollectorRegistry())
    holder = make_policy_holder([policy_dir], metrics)
    first = holder.current.version
    assert (reloads(metrics, "ok"), reloads(metrics, "error")) == (0, 0)
    assert last_reload_ok(metrics) == 1
    assert metrics.registry.get_sample_value("qos_policy_info", {"version": first}) == 1

    edit(policy_dir / "models.yaml", "cost_per_request: 10", "cost_per_request: 12")
    assert holder.reload() is True
    assert (reloads(metrics, "ok"), reloads(metrics, "error")) == (1, 0)
    assert last_reload_ok(metrics) == 1
    version = holder.current.version
    assert metrics.registry.get_sample_value("qos_policy_info", {"version": version}) == 1
    assert metrics.registry.get_sample_value("qos_policy_info", {"version": first}) is None

    edit(policy_dir / "tenants.yaml", "rate: 20\n", "rate: -20\n")
    assert holder.reload() is False
    assert (reloads(metrics, "ok"), reloads(metrics, "error")) == (1, 1)
    assert last_reload_ok(metrics) == 0
    assert metrics.registry.get_sample_value("qos_policy_info", {"version": version}) == 1

    def crash(paths: object) -> None:
        raise RuntimeError("a loader bug")

    monkeypatch.setattr(reload_module, "load_policy", crash)
    assert holder.reload() is False
    assert (reloads(metrics, "ok"), reloads(metrics, "error")) == (1, 2)
    assert last_reload_ok(metrics) == 0
    assert (holder.reloads_ok, holder.reloads_failed) == (1, 2)


def test_a_loader_crash_keeps_the_last_good_policy_and_never_raises(
    policy_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    results: list[bool] = []
    holder = PolicyHolder([policy_dir], on_result=results.append)
    good = holder.snapshot()

    def crash(paths: object) -> None:
        raise RuntimeError("a loader bug")

    monkeypatch.setattr(reload_module, "load_policy", crash)
    touch(policy_dir / "classes.yaml")
    with caplog.at_level("ERROR", logger="sidecar.policy.reload"):
        assert holder.reload() is False
    assert holder.snapshot() is good
    assert results == [False]
    assert not holder.changed()  # seen: not retried on every poll until the files change
    assert "a loader bug" in caplog.text


def test_the_snapshot_is_the_policy_with_its_tables_swapped_whole(policy_dir: Path) -> None:
    holder = PolicyHolder([policy_dir])
    before = holder.snapshot()
    assert before.policy is holder.current
    assert holder.snapshot() is before  # the same object until a reload replaces it

    edit(policy_dir / "models.yaml", "cost_per_request: 10", "cost_per_request: 12")
    assert holder.reload()
    after = holder.snapshot()
    assert after is not before
    assert after.policy is holder.current
    assert after.policy.version != before.policy.version
    # Compiled from the new policy: its lookup tables name the new policy's tenants.
    assert all(t is after.policy.tenants[t.name] for t in after.by_api_key.values())
    assert before.policy.tenants["search"] is not after.policy.tenants["search"]


def test_the_service_reads_the_holder_and_keeps_no_copy(policy_dir: Path) -> None:
    holder = PolicyHolder([policy_dir])
    service = AdmissionService(holder, MemoryQuotaStore(), Metrics(CollectorRegistry()))
    pinned = service.snapshot()
    assert pinned is holder.snapshot()
    assert service.policy is holder.current

    edit(policy_dir / "models.yaml", "cost_per_request: 10", "cost_per_request: 12")
    assert holder.reload()
    assert service.snapshot() is holder.snapshot() is not pinned
    assert service.policy is holder.current
    assert pinned.policy.version != service.policy.version  # a pinned snapshot stays as it was


def test_a_service_built_from_a_policy_keeps_it(policy_dir: Path) -> None:
    policy = PolicyHolder([policy_dir]).current
    service = AdmissionService(policy, MemoryQuotaStore(), Metrics(CollectorRegistry()))
    assert service.policy is policy
    assert service.snapshot() is service.snapshot()
    assert service.snapshot().policy is policy
