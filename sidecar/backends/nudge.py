"""Send nudges to Triton's busy models (the rules are in `sidecar.core.nudge`).

One task per sidecar. Every `interval_s` it sends one nudge to each model that is busy and
due (`core.nudge`, rule 5: a request of it ended since its last nudge) on each endpoint that
serves it and whose configuration allows one. It does not wait for the answer: a nudge that
lands during a batch waits in Triton's queue until that batch ends, and the next one must be
free to go out after the next end. A model's configuration is read once from
`/v2/models/<m>/config` (again after CONFIG_RETRY_S if that read failed). Failures never
reach a decision; a nudge answered 200 or 400 stops that model's nudges for good and is
logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp

from sidecar.backends.triton import TritonEndpoint, TritonLoadMonitor
from sidecar.core.nudge import NudgeLedger, NudgePlan, busy_pairs, classify, plan_nudge
from sidecar.metrics import Metrics

log = logging.getLogger(__name__)

CONFIG_RETRY_S = 10.0  # a config that could not be read is asked for again after this
MAX_WAITING = 1000  # per endpoint and model: nudges not answered beyond this are not sent
# A nudge that lands during a batch is answered when that batch ends: its answer is awaited
# longer than any batch runs, or it would be counted answered (and off the depth discount)
# while it still waits in Triton's queue.
NUDGE_TIMEOUT_S = 120.0


class TritonNudger:
    def __init__(
        self,
        endpoints: list[TritonEndpoint],
        metrics: Metrics,
        *,
        busy: Callable[[], Iterable[tuple[str, str]]],
        interval_s: float = 0.01,
        timeout_s: float = NUDGE_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`busy()` names the (endpoint, model) pairs that may stall now."""
        self.endpoints = {e.name: e for e in endpoints}
        self.metrics = metrics
        self.busy = busy
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.clock = clock
        self.ledger = NudgeLedger()
        # Per (endpoint, model): the plan, why there is none, or when its read failed.
        self._plans: dict[tuple[str, str], NudgePlan | str | float] = {}
        self._reading: set[tuple[str, str]] = set()
        self._busy_models: frozenset[str] = frozenset()  # of the last round
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def beside(
        cls,
        monitor: TritonLoadMonitor,
        in_flight: Callable[[str], int | None],
        interval_s: float,
    ) -> TritonNudger:
        """A nudger of the monitor's endpoints, busy by its view and `in_flight` (requests of
        a model in flight, None: not known); its ledger then discounts the monitor's depths.
        Tell it each request's end (`ended`)."""
        nudger = cls(
            monitor.endpoints,
            monitor.metrics,
            busy=lambda: busy_pairs(monitor.view().models, in_flight),
            interval_s=interval_s,
        )
        monitor.discount = nudger.ledger.discount
        return nudger

    def ended(self, model: str) -> None:
        """A request of `model` ended. Counted only for a model busy at the last round: the
        name comes from a request's path, and a client must not grow the ledger."""
        if model in self._busy_models:
            self.ledger.ended(model)

    def plan_of(self, endpoint: str, model: str) -> NudgePlan | str | None:
        """The model's plan, why it gets none, or None while not known."""
        plan = self._plans.get((endpoint, model))
        return None if plan is None or isinstance(plan, float) else plan

    async def run(self) -> None:
        """Nudge forever; cancel to stop."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            connector=aiohttp.TCPConnector(limit=0),  # every nudge waits on its own
        )
        try:
            while True:
                try:
                    self.nudge_once()
                except Exception:  # a bug here must not end the loop
                    log.exception("nudging Triton failed")
                await asyncio.sleep(self.interval_s)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._session.close()

    def nudge_once(self) -> int:
        """Send this round's nudges (and read configs not known yet); how many were sent."""
        sent = 0
        now = self.clock()
        pairs = list(self.busy())
        self._busy_models = frozenset(model for _, model in pairs)
        for key in pairs:
            endpoint = self.endpoints.get(key[0])
            if endpoint is None:
                continue
            plan = self._plans.get(key)
            if plan is None or (isinstance(plan, float) and now - plan >= CONFIG_RETRY_S):
                if key not in self._reading:
                    self._reading.add(key)
                    self._spawn(self._read_config(endpoint, key[1]))
            elif (
                isinstance(plan, NudgePlan)
                and self.ledger.due(*key)
                and self.ledger.waiting(*key) < MAX_WAITING
            ):
                self.ledger.sent(*key)
                self._spawn(self._nudge(endpoint, plan))
                sent += 1
        return sent

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read_config(self, endpoint: TritonEndpoint, model: str) -> None:
        key = (endpoint.name, model)
        assert self._session is not None
        try:
            url = f"{endpoint.http_url}/v2/models/{model}/config"
            async with self._session.get(url) as response:
                if response.status != 200:
                    raise aiohttp.ClientResponseError(
                        response.request_info, (), status=response.status
                    )
                config = await response.json(content_type=None)
            plan = plan_nudge(model, config) if isinstance(config, dict) else "not a config"
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("config of %s on %s not read: %s", model, endpoint.name, exc)
            self._plans[key] = self.clock()
        else:
            self._plans[key] = plan
            if isinstance(plan, str):
                log.info("Triton %s model %s is not nudged: %s", endpoint.name, model, plan)
            self.metrics.nudge_enabled.labels(endpoint.name, model).set(
                0 if isinstance(plan, str) else 1
            )
        finally:
            self._reading.discard(key)

    async def _nudge(self, endpoint: TritonEndpoint, plan: NudgePlan) -> None:
        status: int | None = None
        body = b""
        assert self._session is not None
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            url = f"{endpoint.http_url}/v2/models/{plan.model}/infer"
            async with self._session.post(url, data=plan.body) as response:
                status = response.status
                body = await response.read()
        outcome = classify(status, body)
        self.ledger.answered(endpoint.name, plan.model)
        self.metrics.nudges.labels(endpoint.name, plan.model, outcome.value).inc()
        if outcome.stops and isinstance(self._plans.get((endpoint.name, plan.model)), NudgePlan):
            self._plans[(endpoint.name, plan.model)] = f"a nudge was answered {status}"
            self.metrics.nudge_enabled.labels(endpoint.name, plan.model).set(0)
            log.error(
                "Triton %s model %s answered a nudge %s (%s); no more nudges to it",
                endpoint.name,
                plan.model,
                status,
                body[:200].decode("utf-8", "replace"),
            )
