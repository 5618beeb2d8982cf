"""GCRA, the token bucket kept as one number: the theoretical arrival time (TAT).

Rules:
- A bucket with `rate_per_s` and `burst` lets through `burst` cost units at once and
  `rate_per_s` units per second after that, so over any window of `elapsed` seconds it
  admits at most `burst + rate_per_s * elapsed` units.
- A request of `cost` fits when `max(tat, now) + cost / rate - now <= burst / rate`.
- When it does not fit, `retry_after_s` is the wait after which this same cost would fit.
  A cost above `burst` can never fit; its retry_after_s is the time to refill completely.
- `recorded_tat` charges without a check (what was spent elsewhere), at most down to an empty
  bucket (TAT `now + burst / rate`), and refunds (a negative cost) at most up to a full one.
- The Redis script `sidecar/state/lua/acquire.lua` implements the same arithmetic against the
  Redis server's clock; the contract tests run both stores through the same cases.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from sidecar.core.record import record
from sidecar.core.types import BucketCheck


@record
class GcraStep:
    allowed: bool
    new_tat: float  # the TAT to store if the request is taken (unchanged when not allowed)
    retry_after_s: float


def gcra_step(tat: float, now: float, cost: float, rate_per_s: float, burst: float) -> GcraStep:
    """Evaluate one bucket at `now` for `cost`; pure, the caller stores `new_tat`."""
    base = max(tat, now)
    if cost <= 0:
        return GcraStep(True, base, 0.0)
    tolerance_s = burst / rate_per_s
    if cost > burst:
        return GcraStep(False, tat, tolerance_s)
    new_tat = base + cost / rate_per_s
    excess_s = new_tat - now - tolerance_s
    if excess_s <= 1e-9:
        return GcraStep(True, new_tat, 0.0)
    return GcraStep(False, tat, excess_s)


def recorded_tat(tat: float, now: float, cost: float, rate_per_s: float, burst: float) -> float:
    """The TAT after `cost` is recorded without a check: never past empty, never past full."""
    charged = max(tat, now) + cost / rate_per_s
    return min(max(charged, now), now + burst / rate_per_s)


@record
class BucketsStep:
    """Every bucket of one check at once: the worst denial, or the TATs to store."""

    denied: tuple[float, str] | None  # (retry_after_s, bucket name) of the worst denial
    new_tats: tuple[tuple[str, float], ...]  # (bucket name, TAT) to store when not denied


def step_buckets(
    buckets: Iterable[BucketCheck], tats: Mapping[str, float], now: float
) -> BucketsStep:
    """All of `buckets` (TATs by bucket name; absent: a full bucket) at `now`. Every bucket is
    evaluated, so the denial reported is the one that is longest to wait for."""
    new_tats: list[tuple[str, float]] = []
    worst: tuple[float, str] | None = None
    for bucket in buckets:
        step = gcra_step(
            tats.get(bucket.name, now), now, bucket.cost, bucket.rate_per_s, bucket.burst
        )
        if not step.allowed:
            if worst is None or step.retry_after_s > worst[0]:
                worst = (step.retry_after_s, bucket.name)
        elif bucket.cost > 0:
            new_tats.append((bucket.name, step.new_tat))
    return BucketsStep(worst, tuple(new_tats))
