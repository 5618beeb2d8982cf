"""The look at the quota of a request shed for load (sidecar/quota_peek.py): bounded, and
never a reason for the circuit to open. A scripted store: only `peek` is called."""

from __future__ import annotations

import asyncio
from typing import Any

from sidecar.core.types import BucketCheck, LimitKind, QuotaCheck, QuotaResult
from sidecar.errors import StateUnavailable
from sidecar.quota_peek import PEEK_TTL_S, QuotaPeeks
from sidecar.state.breaker import CircuitBreaker, GuardedStore

CHECK = QuotaCheck("t", "batch", (BucketCheck("rps", 1.0, 5.0, 1.0),), None, None, 30.0)
OVER = QuotaResult(False, denied_by=LimitKind.BUCKET, denied_bucket="rps", retry_after_s=0.5)


class Scripted:
    def __init__(self, *answers: QuotaResult | Exception) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def peek(self, check: QuotaCheck) -> QuotaResult:
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def look(peeks: QuotaPeeks) -> QuotaResult | None:
    return asyncio.run(peeks.look(CHECK))


def test_one_store_call_per_tenant_and_class_while_its_answer_is_fresh() -> None:
    store, clock = Scripted(OVER, QuotaResult(True)), Clock()
    peeks = QuotaPeeks(store, clock)  # type: ignore[arg-type]
    assert look(peeks) == OVER
    clock.now += 0.2 * PEEK_TTL_S
    again = look(peeks)
    assert store.calls == 1 and again is not None and not again.allowed
    assert abs(again.retry_after_s - (OVER.retry_after_s - 0.2 * PEEK_TTL_S)) < 1e-9  # time since
    clock.now += PEEK_TTL_S
    fresh = look(peeks)
    assert store.calls == 2 and fresh is not None and fresh.allowed


def test_a_failed_look_is_no_answer_and_never_opens_the_circuit() -> None:
    breaker = CircuitBreaker(failures_to_open=1)
    store = Scripted(StateUnavailable("slow"), StateUnavailable("slow"))
    guarded: Any = GuardedStore(store, breaker)  # type: ignore[arg-type]
    clock = Clock()
    peeks = QuotaPeeks(guarded, clock)
    assert look(peeks) is None
    clock.now += 2 * PEEK_TTL_S
    assert look(peeks) is None
    assert not breaker.is_open and store.calls == 2


def test_nothing_is_asked_while_the_circuit_is_open() -> None:
    breaker = CircuitBreaker(failures_to_open=1)
    breaker.failed(StateUnavailable("down"))
    assert breaker.is_open
    store = Scripted()
    peeks = QuotaPeeks(GuardedStore(store, breaker), Clock())  # type: ignore[arg-type]
    assert look(peeks) is None and store.calls == 0
