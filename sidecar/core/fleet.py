"""Priority and tenant fairness across the replicas of a gateway tier.

In the gateway topology N replicas hold requests for one pool of Tritons, and each replica
decides alone when its held head may go. Alone, each would be fair only among its own
waiters: a noisy tenant sending through every replica gets a turn on each, and a replica
whose slot frees lets its own batch request go while an interactive request waits on another
replica. Two things are therefore shared through the store, once per refresh interval, by
each replica (`store.fleet_exchange`):

- what it holds: per model, per band, per tenant, how many wait (`Summary`);
- the tenants' fairness counters (VTC, see `core.queue`): each replica sends what it changed
  (work charged, `+`; a lift of an idle tenant to the backlogged floor, `^`) and reads the
  fleet's counters back, so every replica orders tenants by the same counters.

The rules, for a request of band `rank` and tenant `t` on this replica:
- Another replica's waiter is AHEAD of it when its band is better, or its band is the same
  and its tenant's counter is smaller than `t`'s (the order every replica's own queue uses),
  or the counters are equal and that replica's id sorts first. Every replica so sees the
  same total order of heads: one goes, nobody waits for another for ever, and two replicas
  never both take the last room because they tie.
- Of another tenant's waiters in the same band, only as many are ahead as go before `t`'s
  counter is reached: each one served adds its work to its tenant's counter, so a tenant at
  counter c with n waiters of work w each has min(n, the k with c + k*w below `t`'s counter,
  or equal to it when ties go its way) ahead. (Counting all n put a quiet tenant lifted to
  a noisy tenant's counter behind the noisy tenant's whole backlog: it was shed for a wait
  of seconds it would never have had.) `t`'s own waiters elsewhere tie with it. The work per
  waiter is what each adds to its tenant's counter, its work over the tenant's weight: the
  tenant's mean as this replica saw it (`Fairness.work_of`), or one unit over its policy
  weight if never seen here (a weight-3 tenant counted at 1 a waiter had a third of its
  turns counted).
- Room that those waiters ahead would take is RESERVED for them: the request may go only if
  the model has room once they are counted as already in flight (`signals.has_room`).
- What another replica holds is known as of its last exchange (one refresh interval). A
  waiter it let go since is still reserved for until then: room stays idle for at most one
  interval, never given to a request that should wait.
- A replica also shares, per model, the requests it let go whose count is not written to
  the store yet (`core.in_flight`'s pending admits), as the pseudo-band IN_TRANSIT, ahead of
  every band. Without it a request let go on one replica would be in neither the count
  another replica reads nor the list of waiters it reads, and that replica would fill the
  same room. (A replica reads the count and exchanges back to back, so a write that lands
  between the two, unseen by both, is left to the next interval.)
- A replica that stopped exchanging (dead, partitioned) drops out after the exchange TTL.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

# model -> band (class rank) -> tenant -> how many wait
Summary = Mapping[str, Mapping[int, Mapping[str, int]]]
# ("+", rank, tenant, work) adds charged work; ("^", rank, tenant, floor) lifts to a floor
CounterOp = tuple[str, int, str, float]
IN_TRANSIT = -(2**31)  # the band of requests let go but maybe not counted yet: ahead of all


def _no_counter(rank: int, tenant: str) -> float:
    return 0.0


def _unit_work(rank: int, tenant: str) -> float:
    return 1.0


def served_before(n: int, theirs: float, mine: float, work: float, *, ties_win: bool) -> int:
    """How many of a tenant's `n` waiters (counter `theirs`, `work` each) a tenant at
    counter `mine` waits for: those served while their counter is still below `mine` (or
    equal, when ties go their way)."""
    gap = mine - theirs
    if n <= 0 or gap < 0 or (gap == 0 and not ties_win):
        return 0
    if work <= 0:
        return n
    turns = math.floor(gap / work) + 1 if ties_win else math.ceil(gap / work)
    return min(n, turns)


@dataclass(frozen=True, slots=True)
class Elsewhere:
    """Other replicas' waiters for one model, and the counters that order them: `first`
    those of replicas whose id sorts before this one's (they win ties), `after` the rest."""

    first: Mapping[int, Mapping[str, int]] = field(default_factory=dict)
    after: Mapping[int, Mapping[str, int]] = field(default_factory=dict)
    counter: Callable[[int, str], float] = _no_counter
    work: Callable[[int, str], float] = _unit_work  # a tenant's work per waiter
    # Bands whose queue serves each tenant's newest waiter first (`core.queue`): a new
    # arrival there goes before its own tenant's waiters, not after them.
    newest_first: frozenset[int] = frozenset()

    def ahead_of(self, rank: int, tenant: str) -> int:
        """How many of them go before a request of band `rank` and `tenant` (module rules)."""
        better = sum(
            sum(tenants.values())
            for waiting in (self.first, self.after)
            for band, tenants in waiting.items()
            if band < rank
        )
        return better + self.ahead_in_band(rank, tenant)

    def ahead_in_band(self, rank: int, tenant: str) -> int:
        """How many of them in band `rank` itself go before a request of `tenant` there."""
        mine = self.counter(rank, tenant)
        ahead = 0
        for waiting, ties_win in ((self.first, True), (self.after, False)):
            for other, n in waiting.get(rank, {}).items():
                if other == tenant:  # its own: a tie, whoever's id sorts first
                    ahead += n if ties_win and rank not in self.newest_first else 0
                    continue
                theirs, work = self.counter(rank, other), self.work(rank, other)
                ahead += served_before(n, theirs, mine, work, ties_win=ties_win)
        return ahead


NOBODY = Elsewhere()


def encode_summary(summary: Summary) -> str:
    """What one replica holds, as it is stored ("" when it holds nothing)."""
    if not summary:
        return ""
    return json.dumps(
        {m: {str(r): dict(ts) for r, ts in bands.items()} for m, bands in summary.items()},
        separators=(",", ":"),
        sort_keys=True,
    )


def merge_summaries(encoded: list[str]) -> dict[str, dict[int, dict[str, int]]]:
    """Other replicas' summaries, summed. One that cannot be read is skipped: a replica of
    another version must not stop this one from deciding."""
    merged: dict[str, dict[int, dict[str, int]]] = {}
    for text in encoded:
        try:
            summary = json.loads(text) if text else {}
            for model, bands in summary.items():
                for rank, tenants in bands.items():
                    into = merged.setdefault(str(model), {}).setdefault(int(rank), {})
                    for tenant, n in tenants.items():
                        into[str(tenant)] = into.get(str(tenant), 0) + int(n)
        except (ValueError, TypeError, AttributeError):
            continue
    return merged


def backlogged(merged: Mapping[str, Mapping[int, Mapping[str, int]]]) -> dict[int, set[str]]:
    """Per band, the tenants some other replica holds a waiter of (on any model)."""
    out: dict[int, set[str]] = {}
    for bands in merged.values():
        for rank, tenants in bands.items():
            if rank != IN_TRANSIT:
                out.setdefault(rank, set()).update(t for t, n in tenants.items() if n > 0)
    return out


def with_in_transit(
    summary: Mapping[str, Mapping[int, Mapping[str, int]]], in_transit: Mapping[str, int]
) -> dict[str, dict[int, dict[str, int]]]:
    """`summary` plus each model's requests let go and maybe not counted yet."""
    out = {model: {r: dict(ts) for r, ts in bands.items()} for model, bands in summary.items()}
    for model, n in in_transit.items():
        if n > 0:
            out.setdefault(model, {})[IN_TRANSIT] = {"": n}
    return out


def counter_field(rank: int, tenant: str) -> str:
    """The store's name of a tenant's counter in a band."""
    return f"{rank}:{tenant}"


def parse_counter_field(name: str) -> tuple[int, str] | None:
    rank, sep, tenant = name.partition(":")
    if not sep:
        return None
    try:
        return int(rank), tenant
    except ValueError:
        return None
