"""The QoS benchmark's capacity search (`benchmarks.qos.search_capacity`) on scripted probes."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from benchmarks.qos import search_capacity


def scripted(results: dict[float, list[float]]) -> tuple[Callable[[float, int], float], list]:
    """A probe that answers each rate's listed results in turn (then its last one)."""
    seen: list[tuple[float, int]] = []

    def probe(rate: float, i: int) -> float:
        seen.append((rate, i))
        answers = results[round(rate, 2)]
        return answers[min(len(answers) - 1, sum(1 for r, _ in seen if r == rate) - 1)]

    return probe, seen


def test_a_host_hiccup_does_not_end_the_search() -> None:
    """One quick run's first probe failed (30 req/s: 3.70%) on a host where 24 req/s had
    no violation at all, and its search ended at C = 7.87. Here that probe's repeat passes,
    so the search goes on up to a rate that fails twice."""
    probe, seen = scripted(
        {
            30.0: [3.70, 0.0],
            37.5: [0.5],
            46.88: [2.5, 3.0],
        }
    )
    capacity = search_capacity(probe, 30.0)
    assert capacity == pytest.approx(37.5 + (1.0 - 0.5) / (2.5 - 0.5) * (46.875 - 37.5))
    assert [i for _, i in seen] == list(range(len(seen)))  # a fresh seed every probe


def test_a_failure_that_reproduces_ends_the_search_as_before() -> None:
    probe, _ = scripted({30.0: [3.0, 2.0], 15.0: [0.0], 18.75: [0.4], 23.44: [6.0, 4.0]})
    # 30 fails twice (2.0), halve to 15 (pass), up: 18.75 passes, 23.44 fails twice (4.0).
    assert search_capacity(probe, 30.0) == pytest.approx(18.75 + 0.6 / 3.6 * (23.4375 - 18.75))


def test_nothing_passes_gives_the_lowest_rate_probed() -> None:
    probe, seen = scripted({r: [50.0] for r in (8.0, 4.0, 2.0, 1.0, 0.5)})
    assert search_capacity(probe, 8.0) == 0.5
    assert len(seen) == 10  # five rates, each failure repeated
