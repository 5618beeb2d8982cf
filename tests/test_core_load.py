"""Triton load signals: parsing, rates from counters, staleness. Pure, no event loop."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.load import (
    CounterWindow,
    LoadView,
    SignalState,
    TritonCounters,
    derive_load,
    parse_triton_metrics,
)

PAGE = """# HELP nv_inference_pending_request_count Instantaneous number of pending requests
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="simgpu",version="1"} 7
nv_inference_pending_request_count{model="simgpu",version="2"} 2
nv_inference_pending_request_count{model="llm",version="1"} 0
nv_inference_request_success{model="simgpu",version="1"} 100
nv_inference_request_failure{model="simgpu",reason="REJECTED",version="1"} 3
nv_inference_request_failure{model="simgpu",reason="BACKEND",version="1"} 1
nv_inference_queue_duration_us{model="simgpu",version="1"} 52000
nv_inference_request_duration_us{model="simgpu",version="1"} 208000
nv_inference_exec_count{model="simgpu",version="1"} 20
nv_inference_count{model="simgpu",version="1"} 104
nv_gpu_utilization{gpu_uuid="x"} 0.5
nv_inference_request_success{model="bad",version="1"} not-a-number
nv_inference_request_success{model="inf",version="1"} +Inf
"""


def test_parse_sums_versions_and_failure_reasons_but_rejections() -> None:
    parsed = parse_triton_metrics(PAGE)
    # REJECTED failures did no work (and hold every replica's nudges): not completions.
    assert parsed["simgpu"] == TritonCounters(
        pending=9, success=100, failure=1, queue_us=52000, request_us=208000, exec_count=20
    )
    assert parsed["llm"] == TritonCounters(pending=0)
    assert "bad" not in parsed and "inf" not in parsed  # bad values skip their line only


def test_an_in_flight_batchers_waiting_requests_are_its_queue() -> None:
    """TensorRT-LLM's in-flight batcher (and the simulated llm_ifb) takes every request off
    Triton's queue at once; its own waiting requests are the depth that matters."""
    page = """nv_inference_pending_request_count{model="llm_ifb",version="1"} 0
nv_trt_llm_request_metrics{model="llm_ifb",request_type="waiting",version="1"} 12
nv_trt_llm_request_metrics{model="llm_ifb",request_type="active",version="1"} 16
nv_trt_llm_request_metrics{model="llm_ifb",request_type="max",version="1"} 16
nv_inference_request_success{model="llm_ifb",version="1"} 40
"""
    assert parse_triton_metrics(page)["llm_ifb"] == TritonCounters(pending=12, success=40)


@pytest.mark.parametrize("text", ["", "garbage\n{}\n", "nv_inference_pending_request_count 3"])
def test_parse_tolerates_junk(text: str) -> None:
    assert parse_triton_metrics(text) == {}


def test_rates_come_from_the_difference_between_scrapes() -> None:
    before = TritonCounters(success=100, failure=4, queue_us=52_000, request_us=208_000)
    after = TritonCounters(pending=5, success=150, failure=4, queue_us=152_000, request_us=708_000)
    first = derive_load("t0", "simgpu", before, 10.0, None)
    assert (first.completions_per_s, first.mean_queue_ms) == (0.0, 0.0)  # nothing to diff yet
    load = derive_load("t0", "simgpu", after, 10.5, (before, 10.0))
    assert load.queue_depth == 5
    assert load.completions_per_s == pytest.approx(100.0)  # 50 in 0.5 s
    assert load.mean_queue_ms == pytest.approx(2.0)  # 100 ms of queueing over 50 requests
    assert load.mean_request_ms == pytest.approx(10.0)


def test_a_restarted_triton_resets_rates_instead_of_going_negative() -> None:
    before = TritonCounters(success=1000, queue_us=9_000_000)
    after = TritonCounters(success=3, queue_us=1000)
    load = derive_load("t0", "simgpu", after, 11.0, (before, 10.0))
    assert load.completions_per_s == 0.0 and load.mean_queue_ms == 0.0


def test_staleness_and_missing_are_states_not_errors() -> None:
    load = derive_load("t0", "simgpu", TritonCounters(pending=3), 100.0, None)
    other = derive_load("t1", "simgpu", TritonCounters(pending=4), 99.0, None)
    view = LoadView(models={"simgpu": (load, other)}, ready={"t0": True, "t1": True})
    assert view.state_of("simgpu", now=100.5, stale_after_s=1.0) is SignalState.FRESH
    assert view.state_of("simgpu", now=101.5, stale_after_s=1.0) is SignalState.STALE
    assert view.state_of("llm", now=100.0, stale_after_s=1.0) is SignalState.MISSING
    assert view.queue_depth("simgpu") == 7  # summed over the endpoints serving it
    assert view.queue_depth("llm") == 0


def test_an_idle_interval_keeps_the_last_measured_drain_rate() -> None:
    idle = TritonCounters(success=500, queue_us=1_000_000)
    kept = derive_load("t0", "simgpu", idle, 11.0, (idle, 10.0), last_rate=42.0)
    assert kept.completions_per_s == 42.0  # nothing ran: no news about the drain rate
    stalled = TritonCounters(pending=9, success=500, queue_us=1_000_000)
    assert (
        derive_load("t0", "simgpu", stalled, 11.0, (idle, 10.0), last_rate=42.0).completions_per_s
        == 0
    )


@pytest.mark.parametrize(
    ("line", "model"),
    [
        ('nv_inference_pending_request_count{model="a,b",version="1"} 3', "a,b"),
        ('nv_inference_pending_request_count{version="1",model="a,b"} 3', "a,b"),
        ('nv_inference_pending_request_count{model="say \\"hi\\"",version="1"} 3', 'say "hi"'),
        ('nv_inference_pending_request_count{model="two\\nlines"} 3', "two\nlines"),
        ('nv_inference_pending_request_count{model="back\\\\slash"} 3', "back\\slash"),
        ('nv_inference_pending_request_count{model="}{=,"} 3', "}{=,"),
        ('nv_inference_pending_request_count{model="é"} 3', "é"),
        ('nv_inference_pending_request_count{ model = "spaced" } 3', "spaced"),
        ('nv_inference_pending_request_count{model="a",} 3', "a"),  # a trailing comma is allowed
        ('nv_inference_pending_request_count{model="a"} 3 1700000000000', "a"),  # a timestamp
        # a label named like the key, or the key inside another label's value, is not the key
        ('nv_inference_pending_request_count{xmodel="a",version="1"} 3', None),
        ('nv_inference_pending_request_count{version="model=\\"a\\""} 3', None),
    ],
)
def test_label_values_are_read_as_the_format_says(line: str, model: str | None) -> None:
    expected = {} if model is None else {model: TritonCounters(pending=3)}
    assert parse_triton_metrics(line + "\n") == expected


@pytest.mark.parametrize(
    "bad",
    [
        "nv_inference_pending_request_count{model=a} 5",  # an unquoted value
        'nv_inference_pending_request_count{model="a} 5',  # an unterminated value
        'nv_inference_pending_request_count{model="a"',  # cut off
        'nv_inference_pending_request_count{model="a"} five',
        'nv_inference_pending_request_count{model="a"}',  # no value
        "nv_inference_pending_request_count{{}} 5",
        'nv_inference_pending_request_count{model="a"} NaN',
        'nv_inference_pending_request_count{model="a"} -Inf',
    ],
)
def test_a_malformed_line_skips_only_itself(bad: str) -> None:
    good = 'nv_inference_pending_request_count{model="ok"} 2'
    page = f"{good}\n{bad}\n{good}\n"
    assert parse_triton_metrics(page) == {"ok": TritonCounters(pending=4)}


def test_other_families_are_not_parsed() -> None:
    # Lines of other families are skipped before parsing, so their errors cost nothing.
    page = 'nv_gpu_utilization{gpu_uuid="x} broken\nnv_inference_exec_count{model="m"} 5\n'
    assert parse_triton_metrics(page) == {"m": TritonCounters(exec_count=5)}


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["nv_inference_pending_request_count", "nv_inference_exec_count", ""]),
            st.text(max_size=40),
        ),
        max_size=8,
    )
)
def test_no_page_raises(lines: list[tuple[str, str]]) -> None:
    parse_triton_metrics("\n".join(name + rest for name, rest in lines))


def test_served_models_are_known_only_from_a_fresh_complete_round() -> None:
    served = frozenset({"simgpu"})
    view = LoadView(models={}, ready={"t0": True}, served=served, checked_at=100.0)
    assert view.served_models(100.5, 1.0) == served
    assert view.served_models(101.5, 1.0) is None  # an old list says nothing
    assert LoadView(models={}, ready={"t0": False}, checked_at=100.0).served_models(100, 1) is None
    assert LoadView(models={}, ready={}).served_models(0.0, 1.0) is None


@pytest.mark.parametrize(
    ("ready", "checked_at", "now", "problems"),
    [
        ({}, None, 0.0, ["triton: not checked yet"]),
        ({"t0": True, "t1": True}, 10.0, 10.5, []),
        ({"t0": True, "t1": False}, 10.0, 10.5, ["triton t1: not ready"]),
        ({"t0": True}, 10.0, 12.0, ["triton: last checked 2.0s ago"]),
    ],
)
def test_why_triton_is_not_ready(
    ready: dict[str, bool], checked_at: float | None, now: float, problems: list[str]
) -> None:
    view = LoadView(models={}, ready=ready, checked_at=checked_at)
    assert view.not_ready(now, 1.0) == problems


def test_rates_span_the_drain_window_not_one_scrape_interval() -> None:
    """Batches complete in steps: per interval the count reads 0, 8, 0, 8... The window
    measures the drain rate from the scrape about DRAIN_WINDOW_S old."""
    window = CounterWindow(window_s=1.0)
    done, rates = 0, []
    for step in range(20):  # a scrape every 0.1 s; a batch of 8 every 0.2 s: 40/s
        now = step * 0.1
        done += 8 if step % 2 else 0
        counters = TritonCounters(pending=5, success=done)
        rates.append(derive_load("t0", "m", counters, now, window.base(now)).completions_per_s)
        window.add(counters, now)
    steady = rates[10:]
    assert all(36.0 <= r <= 44.0 for r in steady), steady  # between scrapes: 0 or 80


def test_the_window_starts_over_after_a_restart() -> None:
    window = CounterWindow(window_s=1.0)
    window.add(TritonCounters(success=500), 0.0)
    window.add(TritonCounters(success=10), 0.5)  # Triton restarted
    base = window.base(0.6)
    assert base is not None and base[0].success == 10


def test_the_window_never_reaches_back_into_idle_time() -> None:
    """Idle for a second, then a burst draining at 40/s: the rate read is the burst's, not
    the burst's completions spread over the idle second too."""
    window = CounterWindow(window_s=1.0)
    for step in range(11):  # idle: nothing waits, nothing completes
        window.add(TritonCounters(success=100), step * 0.1)
    busy = TritonCounters(pending=20, success=104)  # 0.1 s later: 4 done
    load = derive_load("t0", "m", busy, 1.1, window.base(1.1), last_rate=40.0)
    assert load.completions_per_s == pytest.approx(40.0)


def _parse_with_prometheus_client(text: str) -> dict[str, TritonCounters]:
    """The reference: the same rules, with prometheus_client's own text parser reading each
    wanted line (what parse_triton_metrics did before it read lines itself)."""
    import math

    from prometheus_client.parser import text_string_to_metric_families

    from sidecar.core.load import _FIELDS, _IN_FLIGHT_BATCHER, _WANTED

    fields: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if not line.startswith(_WANTED):
            continue
        try:
            samples = [s for family in text_string_to_metric_families(line) for s in family.samples]
        except (ValueError, IndexError):  # IndexError: `{model="a", = "b"}`, for one
            continue
        for sample in samples:
            field = _FIELDS.get(sample.name)
            if sample.name == _IN_FLIGHT_BATCHER and sample.labels.get("request_type") == "waiting":
                field = "pending"
            model = sample.labels.get("model")
            if field is None or model is None or not math.isfinite(sample.value):
                continue
            per_model = fields.setdefault(model, {})
            per_model[field] = per_model.get(field, 0.0) + sample.value
    return {model: TritonCounters(**values) for model, values in fields.items()}


_NAMES = [
    "nv_inference_pending_request_count",
    "nv_inference_request_success",
    "nv_inference_exec_count",
    "nv_trt_llm_request_metrics",
    "nv_inference_exec_count_x",
]
_TEXT = st.text(alphabet='ab,{}=" \\né"n1', max_size=8)


@st.composite
def _lines(draw: st.DrawFn, *, well_formed: bool = False) -> str:
    """One sample line of a wanted (or a near) family; `well_formed`: as the format says."""
    keys = ["model", "version", "request_type"] + ([] if well_formed else ["xmodel", "a.b", ""])
    pairs = draw(
        st.lists(
            st.tuples(
                st.sampled_from(keys),
                _TEXT,
                st.booleans() if not well_formed else st.just(True),  # escaped, or raw
                st.sampled_from(["", " "]),
            ),
            max_size=3,
            unique_by=(lambda pair: pair[0]) if well_formed else (lambda pair: id(pair)),
        )
    )
    labels = []
    for key, value, escape, pad in pairs:
        if escape:
            value = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        labels.append(f'{pad}{key}{pad}={pad}"{value}"{pad}')
    block = draw(st.sampled_from(["", "{" + ",".join(labels) + "}", "{" + ",".join(labels) + ",}"]))
    numbers = ["3", "1e3", "-2.5", "NaN", "+Inf", "0"]
    value = draw(st.sampled_from(numbers + ([] if well_formed else ["five", "", "0x10", "1_0"])))
    stamps = ["", " 1700000000000"] + ([] if well_formed else [" 1.5", " x", " 1 2", " 1_0"])
    stamp = draw(st.sampled_from(stamps))
    gap = draw(st.sampled_from([" ", "  "] + ([] if well_formed else [""])))
    name = draw(st.sampled_from(_NAMES))
    return f"{name}{block}{gap}{value}{stamp}".replace("\n", "\\n")


@settings(max_examples=2000, deadline=None)
@given(st.lists(_lines(well_formed=True), min_size=1, max_size=4))
def test_well_formed_lines_read_as_prometheus_clients_parser_reads_them(lines: list[str]) -> None:
    page = "\n".join(lines) + "\n"
    assert parse_triton_metrics(page) == _parse_with_prometheus_client(page)


@settings(max_examples=3000, deadline=None)
@given(_lines())
def test_any_line_is_read_as_prometheus_client_reads_it_or_skipped(line: str) -> None:
    """On malformed lines the reader may be stricter than prometheus_client's parser (which
    calls itself laxer than the format), never laxer, and it never raises where that parser
    raises something other than ValueError (the old reader then lost the whole page)."""
    ours = parse_triton_metrics(line + "\n")
    assert ours in ({}, _parse_with_prometheus_client(line + "\n"))
