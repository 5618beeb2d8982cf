"""`@record`: frozen to the type checker, a plain slotted dataclass at run time."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
from mypy import api as mypy_api

from sidecar.core.decide import Admission
from sidecar.core.record import record
from sidecar.core.types import Decision, LeaseRef, QuotaCheck, QuotaResult, RequestAttributes


@record
class _Point:
    x: int
    y: int = 0


def test_a_record_compares_and_hashes_by_its_fields() -> None:
    assert _Point(1, 2) == _Point(1, 2)
    assert _Point(1, 2) != _Point(1, 3)
    assert hash(_Point(1, 2)) == hash(_Point(1, 2))
    assert {_Point(1, 2): "a"}[_Point(1, 2)] == "a"
    assert dataclasses.is_dataclass(_Point)


def test_a_record_takes_no_attribute_it_does_not_declare() -> None:
    point = _Point(1)
    with pytest.raises(AttributeError):
        point.z = 3  # type: ignore[attr-defined]
    assert not hasattr(point, "__dict__")


def test_replace_makes_a_new_record_and_leaves_the_old_one() -> None:
    point = _Point(1, 2)
    moved = dataclasses.replace(point, y=5)
    assert (point.y, moved.y) == (2, 5)


@pytest.mark.parametrize(
    "cls", [RequestAttributes, QuotaCheck, QuotaResult, LeaseRef, Decision, Admission]
)
def test_the_values_built_on_every_request_skip_the_run_time_guard(cls: type) -> None:
    # What `frozen=True` adds, a `__setattr__` that raises, is what a decision paid for.
    assert cls.__setattr__ is object.__setattr__
    assert "__slots__" in vars(cls)


def test_the_type_checker_rejects_an_assignment_to_a_field(tmp_path: Path) -> None:
    source = tmp_path / "assign.py"
    source.write_text(
        textwrap.dedent(
            """
            from sidecar.core.record import record

            @record
            class P:
                x: int

            p = P(1)
            p.x = 2
            """
        )
    )
    out, _, status = mypy_api.run(
        ["--strict", "--no-incremental", "--follow-imports=silent", str(source)]
    )
    assert status == 1
    assert 'Property "x" defined in "P" is read-only' in out
