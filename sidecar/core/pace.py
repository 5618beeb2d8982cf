"""How fast a model has been seen to generate, and the requests that no schedule could serve
within their class's objective (a token model's `tokens.infeasible`).

Rules:
1. A settled response (ext_proc, a model with `tokens`) says how many tokens it generated and
   how long it took from its admission to the end of its response. That time is at least what
   the model needs to generate those tokens alone: queueing in Triton, sharing a batch and the
   prefill only add to it. So the least seconds per generated token over the model's recent
   responses is the fastest pace it has shown, and a lower bound of the pace of a request
   alone on an idle model. Nothing is assumed about the model: a slower GPU, a bigger model
   or a busier node all show in the responses. The window (`WINDOW` responses) lets a model
   that became slower be seen as slower; a pace is read only from `MIN_SEEN` responses on.
2. A request whose max tokens at that pace take longer than its class's latency objective
   cannot meet it even alone (`infeasibility`): `core.admission.on_size` refuses it (422
   `infeasible`, with the most max tokens the class can take), relegates it or serves it, as
   the model's `tokens.infeasible` says, before any quota is taken or any hold. Refusing it at
   once spares the client a wait that cannot end well, and spares every request that would
   have waited behind it in Triton's batches.
3. The bound is a lower bound (rule 1), so a request that could meet its objective is never
   judged infeasible by the pace; it is judged on the max tokens it asks for, which a client
   may set far above what it generates.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

WINDOW = 256  # responses a model's pace is the least of
MIN_SEEN = 8  # responses before a pace is read (one fast outlier cannot decide alone)


class GenerationPace:
    """One model's fastest pace over its last `window` settled responses (rule 1)."""

    def __init__(self, window: int = WINDOW, min_seen: int = MIN_SEEN) -> None:
        self._seen: deque[float] = deque(maxlen=window)
        self._min_seen = min_seen
        self._fastest: float | None = None

    def observe(self, generated: int, elapsed_s: float) -> None:
        """A response that generated `generated` tokens in `elapsed_s` since its admission."""
        if generated < 1 or not elapsed_s > 0 or not math.isfinite(elapsed_s):
            return
        self._seen.append(elapsed_s / generated)
        self._fastest = min(self._seen) if len(self._seen) >= self._min_seen else None

    def seconds_per_token(self) -> float | None:
        """The least seconds per generated token seen (None: too few responses yet)."""
        return self._fastest


@dataclass(frozen=True, slots=True)
class Infeasibility:
    """Why a request cannot meet its class's objective: what it asked, what that takes."""

    max_tokens: int
    alone_s: float
    objective_s: float
    seconds_per_token: float

    @property
    def most_tokens(self) -> int:
        """The most max tokens a request of this class can ask for at this pace."""
        most = max(0, math.floor(self.objective_s / self.seconds_per_token))
        while most > 0 and most * self.seconds_per_token > self.objective_s:  # float rounding
            most -= 1
        return most

    @property
    def why(self) -> str:
        return (
            f"{self.max_tokens} max tokens take at least {self.alone_s * 1000:.0f} ms at the "
            f"model's fastest pace ({self.seconds_per_token * 1000:.3g} ms/token), over the "
            f"class's {self.objective_s * 1000:.0f} ms objective"
        )


def infeasibility(
    max_tokens: int, seconds_per_token: float | None, objective_ms: int
) -> Infeasibility | None:
    """Rule 2: the request's infeasibility, or None when it may meet its objective (or no
    pace is known yet)."""
    if seconds_per_token is None or max_tokens < 1:
        return None
    needed_s = max_tokens * seconds_per_token
    objective_s = objective_ms / 1000.0
    if needed_s <= objective_s:
        return None
    return Infeasibility(max_tokens, needed_s, objective_s, seconds_per_token)
