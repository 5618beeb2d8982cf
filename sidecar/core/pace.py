"""How fast a model has been seen to generate, and the requests that no schedule could serve
within their class's objective (a token model's `tokens.infeasible`).

Rules:
1. A settled response (ext_proc, a model with `tokens`) says how many tokens it generated and
   how long it took from its admission to the end of its response: its model's fixed costs
   (the prefill, the round trip), any wait (Triton's queue, a shared batch) and one decode
   step per token. Nothing is assumed about the model: a slower GPU, a bigger model or a
   busier node all show in the responses. The window (`WINDOW` responses) lets a model that
   became slower be seen as slower; nothing is read before `MIN_SEEN` responses.
2. The pace a request of `n` max tokens and a prompt of `p` tokens is judged by is the least
   seconds per generated token among the window's responses that generated at least `n`
   tokens from a prompt of at most `p` (`seconds_per_token(n, p)`). Scaled down to `n`
   tokens, such a response is no slower than the request alone would be when it waited for
   nothing: its fixed costs are no larger (a prompt no longer) and are spread over at least
   as many tokens. Other responses are not used: a shorter one spreads its fixed costs over
   fewer tokens, and one with a longer prompt carries a longer prefill, so either would
   overstate the request's time.
   A request longer than every response of the window (from prompts no longer) is judged by
   the `MIN_SEEN` longest of them instead: the least seconds per token among those. A long
   request's run is what holds a static batch, and every request queued behind it, so it is
   the one that most needs judging; it is also the one no response as long may have preceded
   (one 469-token request in a run of thousands). Their fixed costs are spread over fewer
   tokens than the request's, so this pace errs slow by those costs over their length (a
   5 ms prefill over 200 tokens adds 0.025 ms a token, where a decode step under load takes
   0.6). Under load it is the pace at the batch size the model runs now: a request that
   would fit its objective alone but not in the full batches it would join is judged by those.
   With fewer than `MIN_SEEN` responses from prompts no longer, it is not judged.
3. A request whose `n` max tokens at that pace take longer than its class's latency objective
   cannot meet it even alone (`infeasibility`): `core.admission.on_size` refuses it (422
   `infeasible`, with the most max tokens the class can take at that pace), relegates it or
   serves it, as the model's `tokens.infeasible` says, before any quota is taken or any hold.
   Refusing it at once spares the client a wait that cannot end well, and spares every
   request that would have waited behind it in Triton's batches. It is judged on the max
   tokens it asks for, which a client may set far above what it generates.
"""

from __future__ import annotations

import heapq
import math
import sys
from collections import deque
from dataclasses import dataclass

WINDOW = 256  # responses a model's pace is the least of
MIN_SEEN = 8  # responses before a pace is read (one fast outlier cannot decide alone)


class GenerationPace:
    """One model's responses over its last `window` settled ones (rules 1 and 2)."""

    def __init__(self, window: int = WINDOW, min_seen: int = MIN_SEEN) -> None:
        # (tokens generated, prompt tokens, seconds per generated token)
        self._seen: deque[tuple[int, int, float]] = deque(maxlen=window)
        self._min_seen = min_seen

    def observe(self, generated: int, elapsed_s: float, prompt_tokens: int = 0) -> None:
        """A response that generated `generated` tokens from a prompt of `prompt_tokens` in
        `elapsed_s` since its admission."""
        if generated < 1 or not elapsed_s > 0 or not math.isfinite(elapsed_s):
            return
        self._seen.append((generated, max(0, prompt_tokens), elapsed_s / generated))

    def seconds_per_token(self, tokens: int, prompt_tokens: int) -> float | None:
        """Rule 2: the least seconds per token among responses of at least `tokens` tokens
        from a prompt of at most `prompt_tokens`, or with none that long among the
        `min_seen` longest from such prompts (None: fewer than `min_seen` responses, or
        fewer such). One pass over the window: a token model's decisions come tens or
        hundreds a second, not thousands."""
        if len(self._seen) < self._min_seen:
            return None
        paces = [pace for n, p, pace in self._seen if n >= tokens and p <= prompt_tokens]
        if paces:
            return min(paces)
        shorter = [(n, pace) for n, p, pace in self._seen if p <= prompt_tokens]
        if len(shorter) < self._min_seen:
            return None
        longest = heapq.nlargest(self._min_seen, shorter)  # longer than `tokens`: none is
        return min(pace for _, pace in longest)

    def fastest(self) -> float | None:
        """The least seconds per token of any response in the window (for /metrics)."""
        return self.seconds_per_token(1, sys.maxsize)


@dataclass(frozen=True, slots=True)
class Infeasibility:
    """Why a request cannot meet its class's objective: what it asked, what that takes."""

    max_tokens: int
    alone_s: float
    objective_s: float
    seconds_per_token: float

    @property
    def most_tokens(self) -> int:
        """The most max tokens a request of this class can ask for: at this pace (a shorter
        request's pace is no slower, rule 2), they fit its objective."""
        most = max(0, math.floor(self.objective_s / self.seconds_per_token))
        while most > 0 and most * self.seconds_per_token > self.objective_s:  # float rounding
            most -= 1
        return most

    @property
    def why(self) -> str:
        return (
            f"{self.max_tokens} max tokens take {self.alone_s * 1000:.0f} ms at the model's "
            f"fastest recent pace on responses as long, or its longest "
            f"({self.seconds_per_token * 1000:.3g} ms/token), over the class's "
            f"{self.objective_s * 1000:.0f} ms objective"
        )


def infeasibility(
    max_tokens: int, seconds_per_token: float | None, objective_ms: int
) -> Infeasibility | None:
    """Rule 3: the request's infeasibility, or None when it may meet its objective (or no
    pace judges it)."""
    if seconds_per_token is None or max_tokens < 1:
        return None
    needed_s = max_tokens * seconds_per_token
    objective_s = objective_ms / 1000.0
    if needed_s <= objective_s:
        return None
    return Infeasibility(max_tokens, needed_s, objective_s, seconds_per_token)
