"""`qos-sidecar top`: a live terminal view of one or more sidecars (the frame: `view.py`).

The loop is thin: scrape every sidecar's /metrics, wait the interval, scrape again, print the
frame of the two (rates need two), and go on from the second. `--once` prints one frame.
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from sidecar.policy.model import Policy
from sidecar.top.view import Scrape, parse, render

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen (ANSI)


def scrape(url: str, clock: Callable[[], float] = time.monotonic) -> Scrape:
    """One sidecar's /metrics now; a sidecar that does not answer is a Scrape without samples."""
    base = url.rstrip("/")
    target = base if base.endswith("/metrics") else base + "/metrics"
    try:
        with urllib.request.urlopen(target, timeout=5) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return Scrape(url, clock(), None, str(getattr(exc, "reason", exc)))
    return Scrape(url, clock(), parse(text))


def run(
    urls: Sequence[str],
    interval_s: float,
    *,
    once: bool = False,
    policy_paths: Sequence[Path] = (),
    out: TextIO | None = None,
) -> int:
    """Print frames until interrupted (or one with `once`). Raises PolicyError for a bad
    `policy_paths`."""
    out = sys.stdout if out is None else out
    policy: Policy | None = None
    if policy_paths:
        from sidecar.policy.loader import load_policy

        policy = load_policy(policy_paths)
    before = [scrape(url) for url in urls]
    try:
        while True:
            time.sleep(interval_s)
            after = [scrape(url) for url in urls]
            frame = render(before, after, policy)
            out.write(frame if once else CLEAR + frame)
            out.flush()
            if once:
                return 0 if any(s.samples is not None for s in after) else 1
            before = after
    except KeyboardInterrupt:
        return 0
