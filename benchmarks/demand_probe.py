"""The autoscaling signal during the QoS benchmark's step run (issue 13 section 4).

`DemandSampler` polls the sidecar's admin /metrics in a thread while the step load runs, keeping
(monotonic time, qos_model_demand_ratio, demand rate, drain rate) for the model, and each
protected class's adaptive cap as it stood (`qos_adaptive_cap`, None while it does not bind)
with the model's requests held and in flight: what explains how fast lower classes come back
after the step. `step_signal`
turns the samples into what the report states: how long after the 1x -> 3x step the ratio rose
above a threshold (and stayed there until the step back), and how long after the 3x -> 1x step
it fell below it (and stayed there until the run ended); None when it never did. Pure, so it
is tested on recorded samples.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

THRESHOLDS = (1.0, 1.1)  # 1: demand over drain; 1.1: the KEDA example's threshold
Sample = tuple[float, float, float, float]  # (t, ratio, demand per s, drain per s)
NAMES = ("qos_model_demand_ratio", "qos_model_demand_rate", "qos_model_drain_rate")
CAP, BINDING = "qos_adaptive_cap", "qos_adaptive_cap_binding"
COUNTS = {"qos_model_held_requests": "held", "qos_model_in_flight_requests": "in_flight"}
# "cap:<class>" -> its adaptive cap (None while it does not bind), "held", "in_flight"
Caps = dict[str, int | None]


def read_signal(admin_url: str, model: str) -> tuple[tuple[float, float, float] | None, Caps]:
    """The model's (ratio, demand, drain) on the sidecar now (None when it has no series), and
    its protected classes' caps with its requests held and in flight (`Caps`)."""
    with urllib.request.urlopen(admin_url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    learnt: dict[str, float] = {}
    binding: dict[str, float] = {}
    caps: Caps = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name in NAMES:
                found[sample.name] = sample.value
            elif sample.name in COUNTS:
                caps[COUNTS[sample.name]] = int(sample.value)
            elif sample.name in (CAP, BINDING):
                into = learnt if sample.name == CAP else binding
                into[sample.labels.get("class", "")] = sample.value
    for klass, cap in sorted(learnt.items()):
        caps[f"cap:{klass}"] = int(cap) if binding.get(klass) else None
    if len(found) < len(NAMES):
        return None, caps
    return (found[NAMES[0]], found[NAMES[1]], found[NAMES[2]]), caps


class DemandSampler:
    """Samples the signal every `interval_s` from entering to leaving the `with` block."""

    def __init__(self, admin_url: str, model: str, interval_s: float = 0.5) -> None:
        self.admin_url, self.model, self.interval_s = admin_url, model, interval_s
        self.samples: list[Sample] = []
        self.caps: list[tuple[float, Caps]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> DemandSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                signal, caps = read_signal(self.admin_url, self.model)
            except OSError:
                self.errors += 1
                signal, caps = None, {}
            if signal is not None:
                self.samples.append((now, *signal))
            if caps:
                self.caps.append((now, caps))
            self._stop.wait(self.interval_s)


def _settled(
    samples: Sequence[Sample], start: float, end: float, threshold: float, above: bool
) -> float | None:
    """Seconds from `start` to the first sample in [start, end] after which every sample up to
    `end` is above (or below) `threshold`; None if the last one is not."""
    window = [s for s in samples if start <= s[0] <= end]
    settled_at = None
    for t, ratio, _, _ in window:
        on_side = ratio > threshold if above else ratio < threshold
        if not on_side:
            settled_at = None
        elif settled_at is None:
            settled_at = t
    return None if settled_at is None else round(settled_at - start, 2)


def step_signal(
    samples: Sequence[Sample],
    t0: float,
    phases: Sequence[tuple[float, float]],
    thresholds: Sequence[float] = THRESHOLDS,
) -> dict[str, Any]:
    """What the report says of the signal in a 1x/3x/1x step run started at `t0` (monotonic)."""
    up = t0 + phases[0][0]
    down = up + phases[1][0]
    end = down + phases[2][0]
    before = [s[1] for s in samples if t0 + phases[0][0] / 2 <= s[0] < up]
    during = [s[1] for s in samples if up <= s[0] < down]
    crossings = [
        {
            "threshold": threshold,
            "rose_after_s": _settled(samples, up, down, threshold, above=True),
            "fell_after_s": _settled(samples, down, end, threshold, above=False),
        }
        for threshold in thresholds
    ]
    last = [s for s in samples if s[0] <= end]
    return {
        "samples": len(samples),
        "ratio_before_step": round(sum(before) / len(before), 3) if before else None,
        "ratio_peak": round(max(during), 3) if during else None,
        "ratio_at_end": round(last[-1][1], 3) if last else None,
        "crossings": crossings,
    }


def describe(signal: dict[str, Any], phases: Sequence[tuple[float, float]]) -> str:
    """ "signal rose above 1 after X s from the 1x->3x step, fell below 1 Y s after the 3x->1x
    step", per threshold."""
    lines = []
    for c in signal["crossings"]:
        level, rose, fell = f"{c['threshold']:g}", c["rose_after_s"], c["fell_after_s"]
        up = (
            f"rose above {level} after {rose:g} s from the 1x->3x step"
            if rose is not None
            else f"did not stay above {level} in the 3x phase"
        )
        down = (
            f"fell below {level} {fell:g} s after the 3x->1x step"
            if fell is not None
            else f"not below {level} within the {phases[2][0]:g} s after the 3x->1x step"
        )
        lines.append(f"signal {up}, {down}")
    shape = (
        f"(ratio {signal['ratio_before_step']} before the step, peak {signal['ratio_peak']},"
        f" {signal['ratio_at_end']} at the end)"
    )
    return "; ".join(lines) + " " + shape


def caps_text(series: Sequence[tuple[float, Caps]], phases: Sequence[tuple[float, float]]) -> str:
    """The sampled caps and counts (`Caps`, at seconds since the run started) in words: each
    one's median before the step, in the 3x phase, in the first 10 s after it and later
    (a cap that did not bind is left out of its median); '' without samples."""
    up = phases[0][0]
    down = up + phases[1][0]
    spans = {
        "before the step": (up / 2, up),
        "in the 3x phase": (up, down),
        "0-10 s after it": (down, down + 10.0),
        "later": (down + 10.0, down + phases[2][0]),
    }
    names = sorted({name for _, caps in series for name in caps})
    parts = []
    for span, (start, end) in spans.items():
        medians = []
        for name in names:
            seen = sorted(
                v for t, caps in series if start <= t < end and (v := caps.get(name)) is not None
            )
            if seen:
                medians.append(f"{name.removeprefix('cap:')} {seen[len(seen) // 2]}")
        if medians:
            parts.append(f"{span}: " + ", ".join(medians))
    return "; ".join(parts)


def sampling(admin_url: str | None, model: str) -> AbstractContextManager[DemandSampler | None]:
    """A sampler of the system's sidecar, or nothing for a system without one."""
    return DemandSampler(admin_url, model) if admin_url is not None else nullcontext(None)


def report_md(results: Mapping[str, Any]) -> str:
    """The report's section: each system's signal in its step run (empty without any)."""
    steps = [
        (name, system["step"])
        for name, system in results["systems"].items()
        if "demand_signal_text" in system.get("step", {})
    ]
    if not steps:
        return ""
    lines = [f"- `{name}`: {step['demand_signal_text']}" for name, step in steps]
    caps = [
        f"- `{name}`: {text}"
        for name, step in steps
        if step.get("caps") and (text := caps_text(step["caps"], step["phases"]))
    ]
    return (
        "\n## Autoscaling signal in the step run\n\n"
        "The sidecar's `qos_model_demand_ratio` for the model (demand: admitted, held or shed "
        "for load, over drain: completions; each smoothed with a 15 s time constant), sampled "
        "every 0.5 s; a crossing counts from when the ratio stayed on its new side.\n\n"
        + "\n".join(lines)
        + "\n"
        + (
            "\nSampled with it: the adaptive caps of the protected classes (while they bind), "
            "the requests the sidecar held and those in flight for the model, as medians:\n\n"
            + "\n".join(caps)
            + "\n"
            if caps
            else ""
        )
    )
