"""Adaptive caps through the service (core/protect.py rule 2, "held back"): a request the
cap holds back counts as pushing against it however it came to be held.

CI once saw the real-stack test (test_e2e_protect.py) wait in vain for the cap to grow: a
burst of batch requests arrived together while nothing was in flight, so each read a count
under the cap on arrival, and all but one were then held by the cap once their quota was
taken. Only the arrival's reading was noted, so the period ended with the cap "never pushed
against" and it did not grow. The clock is the test's; the Triton view is scripted."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from types import MappingProxyType

from prometheus_client import CollectorRegistry

from sidecar.core.experience import CompletionTimings
from sidecar.core.protect import MIN_SAMPLES
from sidecar.core.types import QuotaCheck, QuotaResult, Reason, RequestAttributes
from sidecar.metrics import Metrics
from sidecar.policy.model import OverloadPolicy, Policy, Protect
from sidecar.service import AdmissionService
from sidecar.state.memory import MemoryQuotaStore
from tests.core_fixtures import make_policy
from tests.test_service_overload import INFER, Backend, queued

MODEL = "simgpu"
BURST = 4


class YieldingStore(MemoryQuotaStore):
    """Taking quota is a round trip (as with Redis): concurrent arrivals are all judged on
    arrival before the first of them is let go."""

    async def acquire(self, check: QuotaCheck) -> QuotaResult:
        await asyncio.sleep(0.001)
        return await super().acquire(check)


def protected_policy(interactive_overload: bool = True) -> Policy:
    policy = make_policy()
    classes = dict(policy.classes)
    if interactive_overload:
        classes["interactive"] = replace(
            classes["interactive"], overload=OverloadPolicy(admit_below=16, shed_above=64)
        )
    classes["batch"] = replace(
        classes["batch"],
        overload=OverloadPolicy(admit_below=100, max_in_flight=1, protect=Protect.THROUGHPUT),
    )
    return replace(policy, classes=MappingProxyType(classes))


def call(key: str, klass: str) -> RequestAttributes:
    return RequestAttributes("POST", INFER, {"x-api-key": key, "x-qos-class": klass})


def test_a_burst_held_by_the_cap_after_its_quota_and_while_it_waits_grows_the_cap() -> None:
    policy = protected_policy()
    now = [0.0]
    service = AdmissionService(
        policy,
        YieldingStore(),
        Metrics(CollectorRegistry()),
        load=Backend(depth=0).view,
        clock=lambda: now[0],
    )
    deferrer = service.deferrer
    assert deferrer is not None
    period_s = policy.classes["interactive"].latency_objective_ms / 1000

    def learnt() -> int:
        return deferrer.adaptive_caps(MODEL)["batch"][0]

    def fast_interactive_period() -> None:
        """MIN_SAMPLES interactive completions far inside their objective, then the period
        ends (read at its end, as a scrape of the metric would)."""
        for _ in range(MIN_SAMPLES):
            deferrer.completed(MODEL, "interactive", CompletionTimings(duration_s=0.01))
        now[0] += 1.01 * period_s

    async def interactive() -> None:
        """Better work for the model (present: the cap binds), served and ended."""
        web = await service.check(call("k-search", "interactive"), "test")
        assert web.reason is Reason.ADMITTED
        await service.complete(dict(web.headers)["x-qos-lease"])

    async def body() -> None:
        await service.refresh_model_in_flight([MODEL])
        await interactive()  # and nothing in flight now
        assert learnt() == 1  # at its floor
        burst = [
            asyncio.create_task(service.check(call("k-analytics", "batch"), "test"))
            for _ in range(BURST)
        ]
        await queued(service, BURST - 1)  # one went; the cap held the others after quota
        fast_interactive_period()
        assert learnt() == 2  # held back in the period, and interactive was fine: grows

        # A new period with no new batch arrival: the held ones still push against the cap
        # (the next one goes at 2 in flight, the one after it waits at the head).
        await interactive()
        deferrer.on_scrape()
        assert len(deferrer.queue) == BURST - 2
        fast_interactive_period()
        assert learnt() == 3
        for task in burst:
            task.cancel()
        await asyncio.gather(*burst, return_exceptions=True)

    asyncio.run(body())


def test_a_better_class_with_no_overload_block_is_protected_too() -> None:
    """Presence (rule 1) is any better-ranked arrival: interactive that is never held or shed
    for load (no `overload`) still makes batch's cap bind."""
    service = AdmissionService(
        protected_policy(interactive_overload=False),
        MemoryQuotaStore(),
        Metrics(CollectorRegistry()),
        load=Backend(depth=0).view,
    )
    assert service.deferrer is not None

    async def body() -> None:
        assert service.deferrer is not None
        batch = await service.check(call("k-analytics", "batch"), "test")
        assert batch.reason is Reason.ADMITTED
        assert service.deferrer.adaptive_caps(MODEL)["batch"] == (1, False)  # nobody to protect
        web = await service.check(call("k-search", "interactive"), "test")
        assert web.reason is Reason.ADMITTED
        assert service.deferrer.adaptive_caps(MODEL)["batch"] == (1, True)

    asyncio.run(body())
