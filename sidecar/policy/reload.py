"""The current policy, and replacing it when its files change.

Rules:
- The holder is the one home of the current policy. Everything that decides reads it through
  `snapshot()`: the policy together with its compiled lookup tables (`CompiledPolicy`), so
  the two can never disagree.
- Starting needs a valid policy: `PolicyHolder(...)` raises PolicyError otherwise, so the
  service refuses to start rather than guess.
- After that, a policy that fails to load never replaces a good one. `reload()` keeps the last
  good snapshot, records the error and reports it, once, to `on_result`; the app keeps serving
  and reports the problem (metrics, logs, health detail) until the files are fixed. A bug in
  the loader (any other exception) is a failed reload too: it never reaches the caller, which
  is the serving sidecar's event loop.
- The snapshot is compiled first and then replaced in one assignment, so every request sees
  one whole snapshot, old or new, never a mix. A caller that needs one policy across several
  steps (an ext_proc stream) keeps the snapshot it read.
- No asyncio and no threads here: the app decides when to look (`changed()` is cheap enough to
  poll every second) and when to reload (on a change, or on SIGHUP).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from sidecar.core.compiled import CompiledPolicy
from sidecar.core.policy_notes import policy_notes
from sidecar.core.shadow import compile_with_shadow
from sidecar.errors import PolicyError
from sidecar.policy.loader import load_policy, policy_files
from sidecar.policy.model import Policy

log = logging.getLogger(__name__)

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


class PolicySource(Protocol):
    """Where the admission service reads the current policy."""

    def snapshot(self) -> CompiledPolicy:
        """The current policy, whole: the same object until the policy is replaced."""
        ...


class FixedPolicy:
    """A policy that never changes: for a service built from one `Policy` (the `explain`
    command, tests)."""

    def __init__(self, policy: Policy) -> None:
        self._snapshot = compile_with_shadow(policy)

    def snapshot(self) -> CompiledPolicy:
        return self._snapshot


def _log_notes(policy: Policy) -> None:
    """What a valid policy asks for and will not get (`qos-sidecar validate` prints the same)."""
    for note in policy_notes(policy):
        log.warning("policy %s: %s", policy.version, note)


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

        `on_result(ok)` is called exactly once after each `reload()` (not this first load), for
        metrics; it is the only place a reload is counted. `clock` gives wall-clock seconds for
        `last_loaded_at`.
        """
        self.paths: tuple[Path, ...] = tuple(Path(p) for p in paths)
        self._on_result = on_result
        self._clock = clock
        self.last_error: PolicyError | None = None
        self.reloads_ok = 0
        self.reloads_failed = 0
        # Taken before reading, so an edit made while loading shows up as a change next time.
        self._seen = fingerprint(self.paths)
        self._snapshot: CompiledPolicy = compile_with_shadow(load_policy(self.paths))
        self.last_loaded_at: float = self._clock()
        _log_notes(self._snapshot.policy)

    @property
    def current(self) -> Policy:
        return self._snapshot.policy

    def snapshot(self) -> CompiledPolicy:
        return self._snapshot

    def changed(self) -> bool:
        """Whether the files differ (list, mtime or size) from when they were last read.

        Compared with the last attempt, good or bad, so a broken file is reported once rather
        than on every poll; the next edit is seen again.
        """
        return fingerprint(self.paths) != self._seen

    def reload(self) -> bool:
        """Load the files again; replace the snapshot only if they are valid.

        Returns True when the snapshot was replaced. On failure it stays as it was and a
        PolicyError is kept in `last_error`. Never raises.
        """
        self._seen = fingerprint(self.paths)
        kept = self._snapshot.policy.version
        try:
            snapshot = compile_with_shadow(load_policy(self.paths))
        except PolicyError as exc:
            self.last_error = exc
            log.error("policy reload failed, keeping %s:\n%s", kept, exc)
            ok = False
        except Exception:  # a loader bug must not take down the serving sidecar
            log.exception("policy reload crashed; keeping %s", kept)
            ok = False
        else:
            self._snapshot = snapshot
            self.last_error = None
            self.last_loaded_at = self._clock()
            log.info("policy %s loaded", snapshot.policy.version)
            _log_notes(snapshot.policy)
            ok = True
        if ok:
            self.reloads_ok += 1
        else:
            self.reloads_failed += 1
        if self._on_result is not None:
            self._on_result(ok)
        return ok
