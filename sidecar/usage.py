"""Per-tenant usage bookkeeping (`service.usage`): requests, demand and work per tenant and
model as they happen, and Triton's compute time split over the tenants at every scrape. The
arithmetic is `core.usage`'s; this bounds the labels, keeps the clock and counts.

Fed by: the access-log adapter (`completed`: a request that reached Triton ended), the service
(`asked`: a decision), and the Triton monitor (`scraped`: a metrics page, via its `on_page`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

from sidecar.core.kserve import model_of
from sidecar.core.load import TritonCounters
from sidecar.core.types import RequestAttributes
from sidecar.core.usage import HOLD_S, UNATTRIBUTED, ComputeLedger
from sidecar.metrics import UNKNOWN, Metrics

MAX_TRITON_MODELS = 1024  # models learnt from Triton's pages, for labels: a bound, not a limit
MAX_CACHED = 4096  # (tenant, model) label pairs whose children are kept


class UsageLedger:
    def __init__(
        self,
        metrics: Metrics,
        tenants: Callable[[], Collection[str]],
        models: Callable[[], Collection[str]],
        *,
        hold_s: float = HOLD_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.series = metrics.usage
        self._tenants = tenants  # the policy's tenants
        self._models = models  # the policy's models
        self._served: set[str] = set()  # models seen on Triton's pages
        self._cached: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        self._raw: dict[tuple[str | None, str | None], tuple[Any, Any, Any]] = {}
        self._tenants_seen: Collection[str] | None = None
        self._models_seen: Collection[str] | None = None
        self.compute = ComputeLedger(hold_s)
        self.clock = clock

    def _tenant(self, tenant: str | None) -> str:
        return tenant if tenant is not None and tenant in self._tenants() else UNKNOWN

    def _model(self, model: str | None) -> str:
        if model is None:
            return UNKNOWN
        return model if model in self._served or model in self._models() else UNKNOWN

    def _children(self, tenant: str | None, model: str | None) -> tuple[Any, Any, Any]:
        """The (demand, requests, work seconds) children of a raw (tenant, model) pair, kept
        per label pair: a client naming models at will only ever reaches `__unknown__`, so
        the cache is bounded by the policy's tenants and the models Triton serves. The raw
        pairs seen are kept too (at most MAX_CACHED), so that a pair seen before costs one
        lookup, not the labels' membership tests."""
        tenants = self._tenants()
        if tenants is not self._tenants_seen:  # a policy reload: labels may have changed
            self._tenants_seen = tenants
            self._cached.clear()
            self._raw.clear()
        models = self._models()
        if models is not self._models_seen:  # the raw pairs' labels read the models too
            self._models_seen = models
            self._raw.clear()
        raw = (tenant, model)
        found = self._raw.get(raw)
        if found is not None:
            return found
        labels = (self._tenant(tenant), self._model(model))
        found = self._cached.get(labels)
        if found is None:
            found = self._made(labels)
        if len(self._raw) < MAX_CACHED:
            self._raw[raw] = found
        return found

    def _made(self, labels: tuple[str, str]) -> tuple[Any, Any, Any]:
        series = self.series
        made = (
            series.demand.labels(*labels),
            series.requests.labels(*labels),
            series.work.labels(*labels),
        )
        if len(self._cached) < MAX_CACHED:
            self._cached[labels] = made
        return made

    def asked(self, tenant: str | None, attrs: RequestAttributes) -> None:
        """A decision was made for `tenant` (None: no tenant, not counted). On every
        decision: the labelled children are looked up once per pair (`labels` costs
        microseconds)."""
        if tenant is None:
            return
        model = attrs.model if attrs.model is not None else model_of(attrs.path)  # memoized
        self._children(tenant, model)[0].inc()

    def completed(self, tenant: str | None, model: str | None, upstream_s: float) -> None:
        """A request that reached Triton ended after `upstream_s` upstream."""
        _, requests, work = self._children(tenant, model)
        requests.inc()
        if upstream_s > 0:
            work.inc(upstream_s)
            labels = (self._tenant(tenant), self._model(model))
            self.compute.note_work(labels[1], labels[0], upstream_s, self.clock())

    def scraped(self, endpoint: str, page: Mapping[str, TritonCounters]) -> None:
        """A Triton endpoint's metrics page was read: its compute counters, then the split."""
        now = self.clock()
        for model, counters in page.items():
            if model not in self._served and len(self._served) < MAX_TRITON_MODELS:
                self._served.add(model)
                self._raw.clear()  # a pair that read `__unknown__` may now read the model
            if self._model(model) == model:  # past the bound: uncounted, never mixed up
                self.compute.note_counter(endpoint, model, counters.compute_us, now)
        self.settle(now)

    def settle(self, now: float | None = None) -> None:
        """Count what the core gave to each tenant."""
        for given in self.compute.settle(self.clock() if now is None else now):
            for tenant, seconds in given.seconds.items():
                label = tenant if tenant == UNATTRIBUTED else self._tenant(tenant)
                self.series.gpu_seconds.labels(label, given.model).inc(seconds)
