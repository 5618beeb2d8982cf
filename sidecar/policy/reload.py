"""The current policy, and replacing it when its files change.

Rules:
- Starting needs a valid policy: `PolicyHolder(...)` raises PolicyError otherwise, so the
  service refuses to start rather than guess.
- After that, a policy that fails to load never replaces a good one. `reload()` keeps the last
  good snapshot, records the error and counts it; the app keeps serving and reports the
  problem (metrics, logs, health detail) until the files are fixed.
- `current` is replaced in one assignment, so every request sees one whole snapshot, old or
  new, never a mix.
- No asyncio and no threads here: the app decides when to look (`changed()` is cheap enough to
  poll every second) and when to reload (on a change, or on SIGHUP).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sidecar.errors import PolicyError
from sidecar.policy.loader import load_policy, policy_files
from sidecar.policy.model import Policy

# (path, mtime_ns, size) of each policy file; None, None for a path that cannot be read.
Fingerprint = tuple[tuple[str, int | None, int | None], ...]


def fingerprint(paths: Sequence[Path]) -> Fingerprint:
    """What `changed()` compares: the file list of `paths` and each file's mtime and size.

    Stats follow symlinks, so the atomic `..data` swap of a Kubernetes ConfigMap volume shows
    up as new mtimes of the same names. A file added to or removed from a directory changes
    the list itself.
    """
    out: list[tuple[str, int | None, int | None]] = []
    for path in paths:
        for file in policy_files([path]) or [path]:
            try:
                st = os.stat(file)
            except OSError:
                out.append((str(file), None, None))
            else:
                out.append((str(file), st.st_mtime_ns, st.st_size))
    return tuple(out)


class PolicyHolder:
    """Holds the policy every request reads, and swaps it for a new valid one on reload."""

    def __init__(
        self,
        paths: Sequence[Path | str],
        *,
        on_result: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Load the policy at `paths`. Raises PolicyError if it is not valid.

        `on_result(ok)` is called after each `reload()` (not this first load), for metrics.
        `clock` gives wall-clock seconds for `last_loaded_at`.
        """
        self.paths: tuple[Path, ...] = tuple(Path(p) for p in paths)
        self._on_result = on_result
        self._clock = clock
        self.last_error: PolicyError | None = None
        self.reloads_ok = 0
        self.reloads_failed = 0
        # Taken before reading, so an edit made while loading shows up as a change next time.
        self._seen = fingerprint(self.paths)
        self.current: Policy = load_policy(self.paths)
        self.last_loaded_at: float = self._clock()

    def changed(self) -> bool:
        """Whether the files differ (list, mtime or size) from when they were last read.

        Compared with the last attempt, good or bad, so a broken file is reported once rather
        than on every poll; the next edit is seen again.
        """
        return fingerprint(self.paths) != self._seen

    def reload(self) -> bool:
        """Load the files again; replace `current` only if they are valid.

        Returns True when `current` was replaced. On failure `current` stays as it was and the
        error is kept in `last_error`. Never raises PolicyError.
        """
        self._seen = fingerprint(self.paths)
        try:
            policy = load_policy(self.paths)
        except PolicyError as exc:
            self.last_error = exc
            self.reloads_failed += 1
            ok = False
        else:
            self.current = policy
            self.last_error = None
            self.last_loaded_at = self._clock()
            self.reloads_ok += 1
            ok = True
        if self._on_result is not None:
            self._on_result(ok)
        return ok
