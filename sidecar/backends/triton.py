"""Scrape Triton's metrics and readiness endpoints into a `LoadView`.

One task per sidecar polls every endpoint every `interval_s`, concurrently, each request bounded
by `timeout_s`. A failed or slow scrape keeps that endpoint's previous values, which age into
the STALE state (see `sidecar.core.load`); it never raises into the decision path. Parsing and
rate arithmetic are pure and live in the core.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp

from sidecar.core.load import (
    EMPTY_VIEW,
    CounterWindow,
    LoadView,
    ModelLoad,
    TritonCounters,
    derive_load,
    parse_triton_metrics,
)
from sidecar.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TritonEndpoint:
    name: str  # a short label for metrics, e.g. "triton-0"
    http_url: str  # e.g. http://127.0.0.1:8000 (readiness)
    metrics_url: str  # e.g. http://127.0.0.1:8002/metrics


class TritonLoadMonitor:
    def __init__(
        self,
        endpoints: list[TritonEndpoint],
        metrics: Metrics,
        *,
        interval_s: float = 0.25,
        timeout_s: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoints = endpoints
        self.metrics = metrics
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.clock = clock
        self._history: dict[tuple[str, str], CounterWindow] = {}
        self._loads: dict[tuple[str, str], ModelLoad] = {}
        self._ready: dict[str, bool] = {}
        self._view = EMPTY_VIEW
        self._session: aiohttp.ClientSession | None = None
        # Called after each round with the new view (the deferral queue's chance to move).
        self.on_update: Callable[[], None] | None = None
        # Called with each endpoint's parsed page (per-tenant usage reads its compute time).
        self.on_page: Callable[[str, Mapping[str, TritonCounters]], None] | None = None
        # Takes what is not the model's work out of a model's counters before they become its
        # load (the sidecar's own nudges: core/nudge.py, rule 4).
        self.discount: Callable[[str, str, TritonCounters], TritonCounters] | None = None

    def view(self) -> LoadView:
        """The latest view; replaced whole after each round, never mutated."""
        return self._view

    async def run(self) -> None:
        """Scrape forever; cancel to stop."""
        try:
            while True:
                started = self.clock()
                try:
                    await self.scrape_once()
                except Exception:  # a bug here must not freeze the load view for good
                    log.exception("Triton scrape round failed; the view ages into stale")
                await asyncio.sleep(max(0.0, self.interval_s - (self.clock() - started)))
        finally:
            await self.close()

    async def scrape_once(self) -> LoadView:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            )
        pages = await asyncio.gather(*(self._scrape(self._session, e) for e in self.endpoints))
        models: dict[str, list[ModelLoad]] = {}
        now = self.clock()
        for (endpoint, model), load in self._loads.items():
            models.setdefault(model, []).append(load)
            # Kept loads age while their endpoint's scrapes fail: the stale-signal alert's gauge.
            self.metrics.backend_signal_age.labels(endpoint, model).set(now - load.observed_at)
        # What Triton serves is known only when every endpoint was ready and gave its page in
        # this round (core/load.py's rules). A page with no model at all says nothing.
        known = all(page is not None for page in pages) and all(self._ready.values())
        served = frozenset().union(*(p for p in pages if p is not None)) if known else None
        served = served or None
        self._view = LoadView(
            models={m: tuple(loads) for m, loads in models.items()},
            ready=dict(self._ready),
            served=served,
            checked_at=now,
        )
        if self.on_update is not None:
            self.on_update()
        return self._view

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _scrape(
        self, session: aiohttp.ClientSession, endpoint: TritonEndpoint
    ) -> frozenset[str] | None:
        """Read one endpoint's readiness and page; the models on the page (None: no page)."""
        ready = await self._get_status(session, endpoint.http_url + "/v2/health/ready") == 200
        self._ready[endpoint.name] = ready
        self.metrics.backend_ready.labels(endpoint.name).set(1 if ready else 0)
        try:
            async with session.get(endpoint.metrics_url) as response:
                if response.status != 200:
                    raise aiohttp.ClientResponseError(
                        response.request_info, (), status=response.status
                    )
                # Prometheus text is UTF-8; bytes that are not must not stop the scrape.
                text = (await response.read()).decode("utf-8", "replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.metrics.backend_scrape_errors.labels(endpoint.name).inc()
            log.debug("scrape of %s failed: %s", endpoint.metrics_url, exc)
            return None
        now = self.clock()
        page = parse_triton_metrics(text)
        if self.on_page is not None:
            self.on_page(endpoint.name, page)
        for model, counters in page.items():
            key = (endpoint.name, model)
            if self.discount is not None:
                counters = self.discount(endpoint.name, model, counters)
            last = self._loads.get(key)
            history = self._history.setdefault(key, CounterWindow())
            load = derive_load(
                endpoint.name,
                model,
                counters,
                now,
                history.base(now),
                last_rate=last.completions_per_s if last else 0.0,
            )
            history.add(counters, now)
            self._loads[key] = load
            self.metrics.backend_queue_depth.labels(endpoint.name, model).set(load.queue_depth)
            self.metrics.backend_completions.labels(endpoint.name, model).set(
                load.completions_per_s
            )
        return frozenset(page)

    async def _get_status(self, session: aiohttp.ClientSession, url: str) -> int | None:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(url) as response:
                return response.status
        return None
