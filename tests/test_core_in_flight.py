"""The in-flight count between two reads of the store (`core.in_flight`): a read that runs
while admissions go on never loses an admit, so the cap is not overshot (the race that let
a third request through a cap of two)."""

from __future__ import annotations

from sidecar.core.in_flight import InFlightCounts


def test_unknown_until_read_or_admitted() -> None:
    counts = InFlightCounts()
    assert counts.of("m") is None
    counts.admitted("m", written=True)
    assert counts.of("m") == 1  # before any read: its own admits count


def test_an_admit_written_before_the_read_was_sent_is_in_the_read() -> None:
    counts = InFlightCounts()
    counts.admitted("m", written=True)
    started = counts.read_starts()
    counts.read({"m": 1}, started)
    assert counts.of("m") == 1


def test_an_admit_confirmed_while_the_read_runs_is_kept() -> None:
    counts = InFlightCounts()
    counts.admitted("m", written=True)
    started = counts.read_starts()
    counts.admitted("m", written=True)  # acquire finished while the read was out
    counts.read({"m": 1}, started)  # the read did not see the second
    assert counts.of("m") == 2
    counts.read({"m": 2}, counts.read_starts())  # the next read sees both: counted once
    assert counts.of("m") == 2


def test_a_pending_write_stays_counted_until_a_read_after_it() -> None:
    counts = InFlightCounts()
    counts.admitted("m", written=False)
    counts.read({"m": 0}, counts.read_starts())
    assert counts.of("m") == 1  # let go, its entry not written yet
    started = counts.read_starts()
    counts.written("m")  # written while that read was out: kept once more
    counts.read({"m": 1}, started)
    assert counts.of("m") == 2
    counts.read({"m": 1}, counts.read_starts())
    assert counts.of("m") == 1


def test_ends_lower_the_count_until_the_next_read() -> None:
    counts = InFlightCounts()
    counts.read({"m": 3}, counts.read_starts())
    counts.ended("m")
    assert counts.of("m") == 2
    counts.read({"m": 2}, counts.read_starts())
    assert counts.of("m") == 2  # not subtracted twice
    counts.ended("m")
    counts.ended("m")
    counts.ended("m")
    assert counts.of("m") == 0  # never negative


def test_a_written_call_without_a_pending_admit_changes_nothing() -> None:
    counts = InFlightCounts()
    counts.read({"m": 1}, counts.read_starts())
    counts.written("m")
    assert counts.of("m") == 1
    assert counts.models() == set()


def test_an_end_confirmed_after_a_read_that_may_show_it_is_not_subtracted() -> None:
    counts = InFlightCounts()
    counts.read({"m": 3}, counts.read_starts())
    sent = counts.release_starts()  # the release goes out
    counts.read({"m": 2}, counts.read_starts())  # ran after it on the server: shows it
    counts.ended("m", sent)  # its answer arrives last
    assert counts.of("m") == 2  # not 1: that would let one request over the cap


def test_an_end_confirmed_before_the_next_read_is_subtracted() -> None:
    counts = InFlightCounts()
    counts.read({"m": 3}, counts.read_starts())
    counts.ended("m", counts.release_starts())
    assert counts.of("m") == 2
    counts.read({"m": 3}, counts.read_starts())  # the read ran before the release: over, safe
    assert counts.of("m") == 3
