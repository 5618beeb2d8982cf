"""How long a request can be held: the class's intent, bounded by the transport Envoy asks on.

Rules:
- Envoy stops waiting for the sidecar at a bound of its own: the ext_authz check timeout (HTTP
  and gRPC), or in ext_proc the filter's `max_message_timeout` (the sidecar extends the
  message timeout up to it before it holds). A hold that outlives it is answered by Envoy
  (403/503/504, no Retry-After, no reason), not by the sidecar, and its lease is owed.
- So each transport has a MAX HOLD (`QOS_CHECK_MAX_HOLD_MS`, `QOS_EXT_PROC_MAX_HOLD_MS`),
  and a class's `max_wait_ms` is its intent: the hold a request of it gets on a transport is
  the smaller of the two. A batch class may then say "hold up to half my deadline": ext_proc
  holds it that long, ext_authz as long as its check timeout allows.
- A request whose predicted wait fits `max_wait_ms` but not its transport's bound is judged as
  one whose wait does not fit: relegated, else shed with Retry-After = the predicted wait,
  which lands inside its deadline whenever `max_wait_ms` does (a batch client that honours
  Retry-After takes it as its turn).
- Applied by giving each transport the policy with every class's `max_wait_ms` at most its
  bound (`bounded_holds`): every rule that reads `max_wait_ms` (the load verdict, the hold's
  deadline, explain) then reads the transport's, and none of them needs to know transports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType

from sidecar.core.compiled import CompiledPolicy
from sidecar.core.shadow import ShadowedPolicy, compile_with_shadow
from sidecar.policy.model import Policy


def over_bound(policy: Policy, max_hold_ms: int) -> list[str]:
    """The classes whose `max_wait_ms` is longer than `max_hold_ms`, by name."""
    return sorted(name for name, c in policy.classes.items() if c.max_wait_ms > max_hold_ms)


def bounded_holds(policy: Policy, max_hold_ms: int) -> Policy:
    """`policy` with every class's `max_wait_ms` at most `max_hold_ms` (itself when none is
    longer)."""
    if not over_bound(policy, max_hold_ms):
        return policy
    classes = {
        name: replace(c, max_wait_ms=min(c.max_wait_ms, max_hold_ms))
        for name, c in policy.classes.items()
    }
    return replace(policy, classes=MappingProxyType(classes))


class HoldBounds:
    """Each transport's view of the policy (`api` -> its max hold in ms; an `api` not named
    is not bounded). A view is compiled once per policy snapshot and transport, and kept
    while that snapshot is among the last few used (an ext_proc stream pins its snapshot)."""

    KEPT = 8

    def __init__(self, max_hold_ms: Mapping[str, int] | None = None) -> None:
        self.max_hold_ms = dict(max_hold_ms or {})
        self._views: dict[tuple[int, str], tuple[CompiledPolicy, CompiledPolicy]] = {}

    def view(self, compiled: CompiledPolicy, api: str) -> CompiledPolicy:
        """`compiled` as `api` sees it: every class's `max_wait_ms` at most its bound. Per
        decision this is one lookup: the view (or `compiled` itself) is kept."""
        kept = self._views.get((id(compiled), api))
        if kept is not None and kept[0] is compiled:
            return kept[1]
        bound = self.max_hold_ms.get(api)
        written = compiled.written if isinstance(compiled, ShadowedPolicy) else None
        policy = written.policy if written is not None else compiled.policy
        bounded = policy if bound is None else bounded_holds(policy, bound)
        view = compiled if bounded is policy else compile_with_shadow(bounded)
        if len(self._views) >= self.KEPT:
            self._views.clear()
        self._views[(id(compiled), api)] = (compiled, view)
        return view
