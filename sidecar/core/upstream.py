"""How long each class's requests have lately spent upstream (in Triton) on each model.

Rules:
1. A request's upstream time is Envoy's: from the last byte it sent Triton to the last byte
   it got back (the access log's `upstream_time_of`): hold and decision left out.
2. Per (model, class), the last KEPT of them are kept; the class's time on the model is their
   lower quartile (nearest rank): three in four took at least that. Fewer than MIN_SEEN:
   not known.
3. What it is for (`core.signals.hold_budget`): a request held past its objective minus
   that time would be let go only to miss, as three in four of its class did lately, and
   its GPU time would come out of the requests behind it. With interactive demand at 1.8x
   what the model serves (issue 12, `--mix 3,1,1` at 3x), requests let go at the end of a
   90 ms hold against a 225 ms objective kept the model busy with answers nobody used. The
   median cut more there, but also cut interactive's holds on the default mix at 3x, where
   more of it then missed; the lower quartile did not (benchmarks/README.md, "Hold budget").
4. Model names come from requests: past MAX_KEPT (model, class) entries all are forgotten
   (every hold back to its policy's max_wait, the side the policy wrote).

Pure: the caller says what ended and how long it was upstream.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

KEPT = 64
MIN_SEEN = 8
MAX_KEPT = 4096


@dataclass(slots=True)
class UpstreamTimes:
    """Every (model, class)'s last upstream times, and their lower quartiles per model."""

    _times: dict[tuple[str, str], deque[float]] = field(default_factory=dict)
    _quartiles: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> class -> s

    def took(self, model: str, klass: str, upstream_s: float) -> None:
        """A request of `klass` for `model` spent `upstream_s` in Triton (rules 1, 2 and 4)."""
        key = (model, klass)
        times = self._times.get(key)
        if times is None:
            if len(self._times) >= MAX_KEPT:
                self._times.clear()
                self._quartiles.clear()
            times = self._times[key] = deque(maxlen=KEPT)
        times.append(max(0.0, upstream_s))
        if len(times) >= MIN_SEEN:
            ordered = sorted(times)
            self._quartiles.setdefault(model, {})[klass] = ordered[(len(ordered) - 1) // 4]

    def of(self, model: str) -> dict[str, float]:
        """Each class's lower quartile of upstream times on `model` (rule 2; absent: not
        known). The mapping is kept and updated in place: read it, do not keep it."""
        return self._quartiles.get(model, NOTHING)


NOTHING: dict[str, float] = {}
