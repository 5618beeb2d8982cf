"""`qos-sidecar top` (sidecar/top/): frames rendered from recorded /metrics texts."""

from __future__ import annotations

import pytest

from sidecar.top.view import Scrape, merge, parse, render, rows
from tests.core_fixtures import make_policy

D = "qos_decisions_total"


def text(decisions: dict[tuple[str, str, str, str], float], **gauges: float) -> str:
    """A /metrics text: decisions by (tenant, class, outcome, reason), and the gauges the
    test names (held, in_flight, queue, model_in_flight, done, demand, drain)."""
    lines = [f"# TYPE {D.removesuffix('_total')} counter"]
    for (tenant, klass, outcome, reason), value in decisions.items():
        labels = f'tenant="{tenant}",class="{klass}",outcome="{outcome}",reason="{reason}"'
        lines.append(f"{D}{{{labels}}} {value}")
    series = {
        "held": ("qos_held_requests", 'class="standard"'),
        "in_flight": ("qos_in_flight_requests", 'tenant="search",class="standard"'),
        "queue": ("qos_backend_queue_depth", 'endpoint="t1:8002",model="simgpu"'),
        "model_in_flight": ("qos_model_in_flight_requests", 'model="simgpu"'),
        "done": ("qos_backend_completions_per_second", 'endpoint="t1:8002",model="simgpu"'),
        "demand": ("qos_model_demand_rate", 'model="simgpu"'),
        "drain": ("qos_model_drain_rate", 'model="simgpu"'),
    }
    for key, value in gauges.items():
        name, labels = series[key]
        lines += [f"# TYPE {name} gauge", f"{name}{{{labels}}} {value}"]
    return "\n".join(lines) + "\n"


ADMIT = ("search", "standard", "admit", "admitted")
DEFERRED = ("search", "standard", "admit", "admitted_deferred")
OVERLOADED = ("search", "standard", "shed", "overloaded")
OVER_RATE = ("search", "standard", "shed", "over_rate")
GAUGES = {"queue": 7, "model_in_flight": 12, "done": 9.5}


def scrapes() -> tuple[list[Scrape], list[Scrape]]:
    """Two sidecars, scraped 2 s apart; B restarted in between (its counters went down)."""
    a0 = text({ADMIT: 10, DEFERRED: 0, OVER_RATE: 0}, held=0, in_flight=1, **GAUGES)
    a1 = text(
        {ADMIT: 30, DEFERRED: 6, OVER_RATE: 2}, held=2, in_flight=3, demand=4, drain=2, **GAUGES
    )
    b0 = text({ADMIT: 50, OVERLOADED: 0}, held=0, in_flight=1, **GAUGES)
    b1 = text({ADMIT: 10, OVERLOADED: 4}, held=1, in_flight=3, demand=6, drain=3, **GAUGES)
    before = [Scrape("http://a", 100.0, parse(a0)), Scrape("http://b", 100.0, parse(b0))]
    after = [Scrape("http://a", 102.0, parse(a1)), Scrape("http://b", 102.0, parse(b1))]
    return before, after


def columns(frame: str, first: str, nth: int = 0) -> list[str]:
    """The cells of the `nth` line whose first cell is `first`."""
    return [line.split() for line in frame.splitlines() if line.split()[:1] == [first]][nth]


def test_counters_become_rates_summed_over_sidecars_and_a_restart_counts_from_zero() -> None:
    table = rows(merge(*scrapes()))
    search = table[("search", "")]
    # A: (30 - 10) / 2 = 10/s admitted, 3/s of them after a hold (and 10 + 3 = 13 admits);
    # B restarted: 10 since, over 2 s = 5/s.
    assert search.admitted == 10 + 3 + 5
    assert search.deferred == 3
    assert search.shed_load == 2  # B: 4 overloaded in 2 s
    assert search.refused == 1  # A: 2 over_rate in 2 s
    assert search.in_flight == 3  # the store's count, read by both: the max, not 6
    assert table[("search", "standard")] == search  # one class only


def test_the_frame_shows_tenants_classes_and_models() -> None:
    frame = render(*scrapes())
    assert frame.splitlines()[0] == "qos-sidecar top: 2 of 2 sidecars, rates over 2.0 s"
    assert columns(frame, "search")[1:6] == ["18.00", "3.00", "2.00", "1.00", "3"]
    assert columns(frame, "standard")[1] == "18.00"  # search's one class
    assert columns(frame, "standard", 1) == ["standard", "3"]  # held now: 2 on A + 1 on B
    # Triton's queue and completions and the store's in-flight count: one source, the max;
    # demand and drain: each sidecar's own, summed (10 / 5).
    assert columns(frame, "simgpu")[1:] == ["7", "12", "9.50", "10.00", "5.00", "2.00"]
    assert columns(frame, "search")[6:] == ["-"]  # no policy: no headroom


def test_headroom_comes_from_the_policy() -> None:
    frame = render(*scrapes(), policy=make_policy())
    # search: max_concurrency 8, 3 in flight; `requests` bucket 10/s, 18/s admitted.
    assert columns(frame, "search")[6:] == ["conc", "5/8", "rate", "-8.0/10/s"]


def test_a_sidecar_that_did_not_answer_is_named_and_left_out() -> None:
    before, after = scrapes()
    after[1] = Scrape("http://b", 102.0, None, "connection refused")
    frame = render(before, after)
    assert frame.splitlines()[:2] == [
        "qos-sidecar top: 1 of 2 sidecars, rates over 2.0 s",
        "  no answer: http://b (connection refused)",
    ]
    assert columns(frame, "search")[1] == "13.00"  # A's alone


def test_top_once_against_nobody_names_it_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    from sidecar.cli import main

    assert main(["top", "--once", "--url", "http://127.0.0.1:1", "--interval", "0"]) == 1
    frame = capsys.readouterr().out
    assert frame.startswith("qos-sidecar top: 0 of 1 sidecars")
    assert "no answer: http://127.0.0.1:1 (" in frame
