"""At which queue depths a class's requests, sent to Triton at once, have lately ended late.

A request sent when Triton's queue for the model holds d requests ends when the batch it joins
ends: after the batch running then, and after any batch the requests ahead of it fill first.
How long that is depends on the backend (static or in-flight batching), on the batch sizes and
on what the requests ahead ask for; below `admit_below` the load rules send it without asking.
When a class's own demand is more than the model serves in time (issue 12: `--mix 3,1,1` at
3x, interactive demand 1.8 C), its queue stands at `admit_below`, batches run full, and most
requests sent near it end after their objective: the GPU time they take is lost, and it
lengthens the batches of the requests behind them. Rather than model the backend, the sidecar
learns it: it notes the depth each request was sent at at once (as the arrival's rule reads
it: `ModelSignals.queue_depth`), and when Envoy says how it ended, whether it was late.

Rules:
1. Per (model, class), the last KEPT outcomes within HORIZONS of the class's objectives are
   kept: when it ended, the depth it was sent at, and whether it was late
   (`experience.slo_result` against the objective: missed or failed; a client that left
   first is late). Older ones tell of another load: a horizon of 10 s kept a limit learnt
   under a burst for seconds after it, and an interactive class (225 ms) was shed meanwhile
   (benchmarks/README.md, "Lateness limit").
2. Lateness is taken to grow with the depth: the outcomes' late share by depth is made
   non-decreasing (pool adjacent violators: neighbouring depths whose share would fall are
   pooled), so that a few lucky requests deep in the queue do not lift the limit over many
   late ones, nor a few outcomes at depth 0 join many late ones at 15. The class's LIMIT on
   the model is the first depth of the shallowest pool where more than half were late,
   among at least MIN_SEEN of them; None without one. More often late than not: what is sent
   from there costs the model more than it serves, on average.
   2b. A limit needs requests sent beneath it that ended on time: when the shallowest pool is
   the mostly late one (late from an empty queue on, or from the shallowest depth seen), the
   depth is not what made them late (a long batch ahead of them did), and there is no limit.
   Without this rule a transient of long batches gave a limit of 0: every arrival of the
   class was shed for a horizon while the model idled (benchmarks/README.md, "Depth between
   scrapes").
3. What it is for (`core.admission.judge_load`): an arrival that would be sent at once at a
   depth at or over its class's limit is relegated (once, if the class names a target) or shed
   at once, before any quota is taken; a class never shed by load (no `shed_above`) is sent as
   before. The depths under the limit keep being sent, and the batches they join are shorter.
4. A depth refused is not sent, so nothing new would be learnt about it: its outcomes would
   age out (rule 1), the limit lift, and a surge of requests at that depth be sent and end
   late before it held again (benchmarks/README.md, "Probing the limit"). So it is PROBED:
   while fewer than PROBED_WITH (twice MIN_SEEN) outcomes at or over it are kept, counting
   the probes still out, it is not enforced for the class's next arrivals (`enforced`), and
   one sent at or over it is a probe. A limit holds on MIN_SEEN at least, so the other half
   are there before the oldest age out. The limit then holds while its probes end late, and
   lifts when they end on time (their pool is no longer mostly late) or when the load falls
   and no arrival reaches it (its outcomes age out). A probe whose end is never heard
   counts as out for one horizon. Probing costs about PROBED_WITH requests per horizon sent
   where most ended late (more only where arrivals are judged before the probes sent just
   ahead of them are noted).
5. Only requests sent at once with a lease, of a class the load may shed (`shed_above`), are
   noted (the lease id joins the decision to its access-log entry). A held request is let go
   with part of its objective spent, so its lateness says less about the depth. A noted
   request whose end is never heard (a lost access-log entry, another replica's) is
   forgotten past MAX_PENDING; model names come from requests, so past MAX_KEPT (model,
   class) entries all are forgotten (no limit: the policy as written).

Pure: the caller says what was sent, what ended, and the time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from sidecar.policy.model import ClassPolicy

KEPT = 128
MIN_SEEN = 8
PROBED_WITH = 2 * MIN_SEEN  # outcomes at or over a limit, probes out included (rule 4)
HORIZONS = 10.0  # of the class's objective
MAX_PENDING = 65536
MAX_KEPT = 4096


def applies(klass: ClassPolicy) -> bool:
    """Rules 3 and 5: only a class the load may shed has a limit, and only its requests are
    noted."""
    return klass.overload is not None and klass.overload.shed_above is not None


@dataclass(slots=True)
class _Outcomes:
    """One (model, class)'s kept outcomes, oldest first, and the limit they give."""

    kept: deque[tuple[float, int, bool]] = field(default_factory=lambda: deque(maxlen=KEPT))
    limit: int | None = None
    horizon_s: float = 0.0  # as the last outcome's objective gave it
    at_limit: int = 0  # kept outcomes at or over the limit (rule 4)
    probes: deque[float] = field(default_factory=deque)  # when each probe still out was sent

    def probe_due(self, now_s: float) -> bool:
        """Rule 4: a limit with too little evidence at or over it, probes out included."""
        while self.probes and now_s - self.probes[0] > self.horizon_s:
            self.probes.popleft()  # never heard of: counted out for one horizon
        return self.limit is not None and self.at_limit + len(self.probes) < PROBED_WITH

    def expire(self, now_s: float) -> bool:
        """Drop outcomes older than the horizon (rules 1 and 4); True if any went."""
        gone = False
        while self.kept and now_s - self.kept[0][0] > self.horizon_s:
            self.kept.popleft()
            gone = True
        return gone

    def relimit(self) -> None:
        """Rule 2."""
        per_depth: dict[int, list[int]] = {}
        for _, depth, was_late in self.kept:
            counts = per_depth.setdefault(depth, [0, 0])
            counts[0] += 1
            counts[1] += was_late
        blocks: list[list[int]] = []  # [first depth, seen, late], lateness non-decreasing
        for depth in sorted(per_depth):
            blocks.append([depth, *per_depth[depth]])
            while (
                len(blocks) > 1 and blocks[-2][2] * blocks[-1][1] >= blocks[-1][2] * blocks[-2][1]
            ):
                last = blocks.pop()
                blocks[-1][1] += last[1]
                blocks[-1][2] += last[2]
        first_late = next(
            (i for i, (_, seen, late) in enumerate(blocks) if 2 * late > seen and seen >= MIN_SEEN),
            None,
        )
        # Rule 2b: the shallowest pool late (index 0) is no limit, as none late is.
        self.limit = limit = blocks[first_late][0] if first_late else None
        self.at_limit = 0 if limit is None else sum(depth >= limit for _, depth, _ in self.kept)


class Lateness:
    """Every (model, class)'s kept outcomes by depth sent at, and their limits (rule 2)."""

    def __init__(self) -> None:
        # lease id -> model, class, depth, whether it was a probe (rule 4)
        self._sent: dict[str, tuple[str, str, int, bool]] = {}
        self._outcomes: dict[tuple[str, str], _Outcomes] = {}
        self._limits: dict[str, dict[str, int]] = {}  # model -> class -> limit

    def sent(self, lease_id: str, model: str, klass: str, depth: int, now_s: float) -> None:
        """A request of `klass` went to Triton at once with `depth` queued (rule 5); at or
        over the class's limit, as a probe (rule 4)."""
        if len(self._sent) >= MAX_PENDING:
            self._sent.clear()
        depth = max(0, depth)
        outcomes = self._outcomes.get((model, klass))
        probe = outcomes is not None and outcomes.limit is not None and depth >= outcomes.limit
        if probe and outcomes is not None:
            outcomes.probes.append(now_s)
        self._sent[lease_id] = (model, klass, depth, probe)

    def ended(self, lease_id: str, late: bool | None, now_s: float, objective_s: float) -> None:
        """The request of `lease_id` ended, late or not (None: not judged) against its
        class's `objective_s`: rule 1."""
        noted = self._sent.pop(lease_id, None)
        if noted is None:
            return
        model, klass, depth, probe = noted
        key = (model, klass)
        outcomes = self._outcomes.get(key)
        if probe and outcomes is not None and outcomes.probes:
            outcomes.probes.popleft()  # one fewer out (which one does not matter)
        if late is None:
            return
        if outcomes is None:
            if len(self._outcomes) >= MAX_KEPT:
                self._outcomes.clear()
                self._limits.clear()
            outcomes = self._outcomes[key] = _Outcomes()
        outcomes.horizon_s = HORIZONS * objective_s
        outcomes.expire(now_s)
        outcomes.kept.append((now_s, depth, late))
        self._publish(model, klass, outcomes)

    def of(self, model: str, now_s: float) -> dict[str, int]:
        """Each class's limit on `model` now (rule 2; absent: none). The mapping is kept and
        updated in place: read it, do not keep it."""
        limits = self._limits.get(model)
        if not limits:
            return NO_LIMITS
        for klass in list(limits):
            outcomes = self._outcomes[(model, klass)]
            if outcomes.expire(now_s):
                self._publish(model, klass, outcomes)
        return self._limits.get(model, NO_LIMITS)

    def enforced(self, model: str, now_s: float) -> dict[str, int]:
        """`of`, less the classes whose limit is to be probed now (rule 4): what the load
        rules apply to the next arrival."""
        limits = self.of(model, now_s)
        due = [k for k in limits if self._outcomes[(model, k)].probe_due(now_s)]
        return {k: v for k, v in limits.items() if k not in due} if due else limits

    def _publish(self, model: str, klass: str, outcomes: _Outcomes) -> None:
        outcomes.relimit()
        limits = self._limits.setdefault(model, {})
        if outcomes.limit is None:
            limits.pop(klass, None)
        else:
            limits[klass] = outcomes.limit


NO_LIMITS: dict[str, int] = {}
