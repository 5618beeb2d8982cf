"""A small fake of Prometheus's HTTP query API serving recorded samples, for `qos-sidecar
usage` (tests/test_usage_report.py).

It answers the PromQL shapes the report sends, computed from the samples it holds, and a 400
(`bad_data`, as Prometheus does) for anything else, so a query the report gets wrong fails:
- `/api/v1/query`: `sum by (L, ...) (increase(NAME[Ns]))` at `time`: per series, the growth
  over the samples in [time - N, time], a drop counted as a reset. Prometheus extrapolates to
  the window's edges instead; including the sample on the start makes back-to-back windows
  add up to the whole, as its extrapolation does on evenly scraped series.
- `/api/v1/query_range`: `sum|max by (model) (NAME)` from `start` to `end` every `step`: at
  each step the newest sample at or before it within 5 minutes (Prometheus's lookback); and
  the `increase` shape above, at each step.

Runs aiohttp on a free 127.0.0.1 port in a thread of its own; every query is recorded.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

_INCREASE = re.compile(r"^sum by \(([\w, ]+)\) \(increase\((\w+)\[(\d+)s\]\)\)$")
_GAUGE = re.compile(r"^(sum|max) by \(([\w, ]+)\) \((\w+)\)$")
LOOKBACK_S = 300.0


@dataclass
class Series:
    labels: dict[str, str]
    samples: list[tuple[float, float]]  # (unix seconds, value), oldest first


@dataclass
class FakePrometheus:
    series: dict[str, list[Series]] = field(default_factory=dict)
    queries: list[str] = field(default_factory=list)
    url: str = ""

    def add(self, name: str, labels: dict[str, str], samples: list[tuple[float, float]]) -> None:
        self.series.setdefault(name, []).append(Series(labels, samples))

    def increase(self, by: list[str], name: str, range_s: float, at: float) -> list[Any]:
        groups: dict[tuple[str, ...], float] = {}
        for series in self.series.get(name, []):
            inside = [v for t, v in series.samples if at - range_s <= t <= at]
            grown = sum(b - a if b >= a else b for a, b in itertools.pairwise(inside))
            key = tuple(series.labels.get(label, "") for label in by)
            groups[key] = groups.get(key, 0.0) + grown
        return [
            {"metric": dict(zip(by, key, strict=True)), "value": [at, repr(total)]}
            for key, total in groups.items()
        ]

    def increases(self, by: list[str], name: str, range_s: float, steps: list[float]) -> Any:
        """`increase` at every step, as a matrix."""
        matrix: dict[tuple[str, ...], list[list[Any]]] = {}
        for at in steps:
            for found in self.increase(by, name, range_s, at):
                key = tuple(found["metric"].get(label, "") for label in by)
                matrix.setdefault(key, []).append(found["value"])
        return [
            {"metric": dict(zip(by, key, strict=True)), "values": values}
            for key, values in matrix.items()
        ]

    def over_time(self, how: str, by: list[str], name: str, steps: list[float]) -> list[Any]:
        groups: dict[tuple[str, ...], dict[float, list[float]]] = {}
        for series in self.series.get(name, []):
            key = tuple(series.labels.get(label, "") for label in by)
            for at in steps:
                seen = [v for t, v in series.samples if at - LOOKBACK_S < t <= at]
                if seen:
                    groups.setdefault(key, {}).setdefault(at, []).append(seen[-1])
        pick = sum if how == "sum" else max
        return [
            {
                "metric": dict(zip(by, key, strict=True)),
                "values": [[at, repr(pick(values))] for at, values in sorted(points.items())],
            }
            for key, points in groups.items()
        ]


def _labels(text: str) -> list[str]:
    return [label.strip() for label in text.split(",")]


def _bad(message: str) -> web.Response:
    return web.json_response(
        {"status": "error", "errorType": "bad_data", "error": message}, status=400
    )


def _app(fake: FakePrometheus) -> web.Application:
    async def query(request: web.Request) -> web.Response:
        expr = request.query.get("query", "")
        fake.queries.append(expr)
        found = _INCREASE.match(expr)
        if found is None:
            return _bad(f"fake: unsupported query {expr!r}")
        by, name, range_s = _labels(found.group(1)), found.group(2), float(found.group(3))
        result = fake.increase(by, name, range_s, float(request.query["time"]))
        return web.json_response(
            {"status": "success", "data": {"resultType": "vector", "result": result}}
        )

    async def query_range(request: web.Request) -> web.Response:
        expr = request.query.get("query", "")
        fake.queries.append(expr)
        start, end = float(request.query["start"]), float(request.query["end"])
        step = float(request.query["step"])
        steps = [start + i * step for i in range(int((end - start) / step) + 1)]
        gauge, grown = _GAUGE.match(expr), _INCREASE.match(expr)
        if gauge is not None:
            result = fake.over_time(gauge.group(1), _labels(gauge.group(2)), gauge.group(3), steps)
        elif grown is not None:
            result = fake.increases(
                _labels(grown.group(1)), grown.group(2), float(grown.group(3)), steps
            )
        else:
            return _bad(f"fake: unsupported query {expr!r}")
        return web.json_response(
            {"status": "success", "data": {"resultType": "matrix", "result": result}}
        )

    app = web.Application()
    app.router.add_get("/api/v1/query", query)
    app.router.add_get("/api/v1/query_range", query_range)
    return app


@contextmanager
def serving(fake: FakePrometheus) -> Iterator[FakePrometheus]:
    """Serve `fake` on 127.0.0.1 (a free port) until the block ends."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(_app(fake))
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fake.url = f"http://127.0.0.1:{port}"
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.run_until_complete(runner.cleanup())
        loop.close()
