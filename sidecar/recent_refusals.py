"""The last refusals this replica made, with the steps that led to each: `/v1/refusals`.

`/v1/explain` says what a request WOULD get; an operator asked why a tenant was refused a
minute ago needs what it DID get. Every decision already carries its trace (core/types.py
`Decision.trace`), so each refusal is kept as it was made, in a ring of the last KEPT.

Rules:
- Only refusals (any 4xx or 5xx the sidecar answered) are kept: admits are the bulk of the
  traffic and say nothing to explain. A malformed request, refused before anything was known,
  is kept too (its trace names what was wrong).
- The ring is bounded (KEPT entries): a flood of refusals costs a constant amount of memory
  and pushes out the oldest. Noting one is O(1), on the deciding loop.
- Read newest first, optionally only one tenant's, at most `limit` of them.
- The path is kept without its query: a query may carry a credential.
- Per process: each replica (and each worker) keeps its own; query each one.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from sidecar.core.explain import decided
from sidecar.core.types import Decision, Outcome, RequestAttributes

KEPT = 256


class RecentRefusals:
    """A ring of the last KEPT refusals (module rules). `clock`: wall time, for the entries."""

    def __init__(self, kept: int = KEPT, clock: Callable[[], float] = time.time) -> None:
        self._kept: deque[tuple[float, Decision, str | None, str]] = deque(maxlen=kept)
        self._clock = clock

    def note(self, decision: Decision, attrs: RequestAttributes | None = None) -> None:
        """Keep `decision` if it refused the request (module rules)."""
        if decision.outcome is Outcome.SHED:
            request_id = None if attrs is None else attrs.request_id
            path = "" if attrs is None else attrs.path.partition("?")[0]
            self._kept.append((self._clock(), decision, request_id, path))

    def read(self, tenant: str | None = None, limit: int = KEPT) -> list[dict[str, Any]]:
        """The kept refusals, newest first, only `tenant`'s when given, at most `limit`."""
        out: list[dict[str, Any]] = []
        for at, decision, request_id, path in reversed(self._kept):
            if len(out) >= limit:
                break
            if tenant is not None and decision.tenant != tenant:
                continue
            out.append({"at": at, "request_id": request_id, "path": path, **decided(decision)})
        return out
