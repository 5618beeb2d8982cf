"""`record`: how the values built on every request are declared.

A request's attributes, its quota check, its admission, its decision and the wire's answer are
built anew for each request and dropped when it ends. They are frozen dataclasses to the type
checker (mypy strict rejects any assignment to a field, as for `frozen=True`) and plain slotted
dataclasses at run time, with the same fields, equality and hash. The run-time guard of
`frozen=True` sets each field through `object.__setattr__`; on a leased decision, which builds
about a dozen such values, that guard was 15-20% of the sidecar's own CPU
(`python -m benchmarks.request_cost --leased`: 43.5-44.4 us against 33.5-36.9 us a decision).

What is built once and shared (policy snapshots, settings, compiled tables) stays
`@dataclass(frozen=True, slots=True)`: there the guard costs nothing that counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar, dataclass_transform

_T = TypeVar("_T")


@dataclass_transform(frozen_default=True)
def record(cls: type[_T]) -> type[_T]:
    """`cls` as a slotted dataclass, frozen to the type checker (see the module's doc)."""
    return dataclass(slots=True, unsafe_hash=True)(cls)
