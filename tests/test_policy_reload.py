"""PolicyHolder: the last good policy survives a bad edit, a good edit replaces it whole.

No sleeping: file changes are made visible to `changed()` with explicit os.utime calls, since
two writes within one mtime tick would otherwise look the same.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sidecar.errors import PolicyError
from sidecar.policy.reload import PolicyHolder, fingerprint

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
