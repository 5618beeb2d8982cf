"""The Triton load monitor: against a scripted fake for failures, and a real Triton."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar.backends.triton import TritonEndpoint, TritonLoadMonitor
from sidecar.core.load import SignalState
from sidecar.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]


class FakeTriton:
    """A scripted Triton: pages to serve, a readiness status, or a stall."""

    def __init__(self) -> None:
        self.page: str | bytes = 'nv_inference_pending_request_count{model="m",version="1"} 4\n'
        self.ready_status = 200
        self.stall = False

    def app(self) -> web.Application:
        async def metrics(_: web.Request) -> web.Response:
            if self.stall:
                await asyncio.sleep(5)
            if isinstance(self.page, bytes):
                return web.Response(body=self.page, content_type="text/plain", charset="utf-8")
            return web.Response(text=self.page)

        async def ready(_: web.Request) -> web.Response:
            return web.Response(status=self.ready_status)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/v2/health/ready", ready)
        return app


def test_monitor_reads_fake_triton_and_ages_into_stale_on_failure() -> None:
    fake = FakeTriton()
    metrics = Metrics(CollectorRegistry())
    now = [100.0]

    def age() -> float | None:
        labels = {"endpoint": "t0", "model": "m"}
        return metrics.registry.get_sample_value("qos_backend_signal_age_seconds", labels)

    async def body() -> None:
        runner = web.AppRunner(fake.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        base = f"http://127.0.0.1:{port}"
        monitor = TritonLoadMonitor(
            [TritonEndpoint("t0", base, base + "/metrics")],
            metrics,
            timeout_s=0.2,
            clock=lambda: now[0],
        )
        try:
            view = await monitor.scrape_once()
            assert view.queue_depth("m") == 4
            assert view.ready == {"t0": True}
            assert view.state_of("m", now[0], 1.0) is SignalState.FRESH
            assert view.served_models(now[0], 1.0) == {"m"}  # ready and scraped: known
            assert age() == 0.0

            fake.ready_status = 400  # restarting: the page alone is no list of what it serves
            assert (await monitor.scrape_once()).served_models(now[0], 1.0) is None
            fake.stall, fake.ready_status = True, 400
            now[0] += 2.0
            view = await monitor.scrape_once()  # bounded by timeout_s, does not hang
            assert view.ready == {"t0": False}
            assert view.queue_depth("m") == 4  # last known value kept ...
            assert view.state_of("m", now[0], 1.0) is SignalState.STALE  # ... but aged
            assert age() == 2.0  # and its age exported, for the stale-signal alert
            assert view.served is None and view.not_ready(now[0], 1.0) == ["triton t0: not ready"]
        finally:
            await monitor.close()
            await runner.cleanup()

    asyncio.run(body())
    registry = metrics.registry
    assert registry.get_sample_value("qos_backend_scrape_errors_total", {"endpoint": "t0"}) == 1
    assert registry.get_sample_value("qos_backend_ready", {"endpoint": "t0"}) == 0
    assert (
        registry.get_sample_value("qos_backend_queue_depth", {"endpoint": "t0", "model": "m"}) == 4
    )


@pytest.mark.stack
def test_monitor_sees_real_triton_queue_depth_and_completions(tmp_path: Path) -> None:
    from devstack.triton import TritonProcess

    repo = tmp_path / "models"
    shutil.copytree(ROOT / "examples" / "triton" / "simgpu", repo / "simgpu")
    body = json.dumps(
        {"inputs": [{"name": "DELAY_MS", "shape": [1, 1], "datatype": "FP32", "data": [300]}]}
    ).encode()

    with TritonProcess(repo, tmp_path) as triton:

        def infer() -> None:
            request = urllib.request.Request(
                triton.http_url + "/v2/models/simgpu/infer",
                data=body,
                headers={"content-type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                response.read()

        async def observe() -> tuple[int, float]:
            monitor = TritonLoadMonitor(
                [TritonEndpoint("t0", triton.http_url, triton.metrics_url)],
                Metrics(CollectorRegistry()),
            )
            try:
                await monitor.scrape_once()
                threads = [threading.Thread(target=infer) for _ in range(24)]
                for t in threads:
                    t.start()
                deepest, fastest = 0, 0.0
                while any(t.is_alive() for t in threads):  # ~1 s: 3 batches of 300 ms
                    view = await monitor.scrape_once()
                    deepest = max(deepest, view.queue_depth("simgpu"))
                    fastest = max(fastest, view.completions_per_s("simgpu"))
                    await asyncio.sleep(0.1)
                for t in threads:
                    t.join(30)
                return deepest, fastest
            finally:
                await monitor.close()

        deepest, fastest = asyncio.run(observe())
        # 24 requests at once against batches of 8: at least a batch's worth must wait, and
        # completions between two scrapes must show up as a rate.
        assert deepest >= 8
        assert fastest > 0


def test_monitor_survives_undecodable_metrics_pages() -> None:
    fake = FakeTriton()
    # Not UTF-8: response.text() would raise UnicodeDecodeError, which no scrape may die of.
    fake.page = b'nv_inference_pending_request_count{model="m",version="1"} 3\n\xff\xfe junk\n'
    metrics = Metrics(CollectorRegistry())

    async def body() -> int:
        runner = web.AppRunner(fake.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        monitor = TritonLoadMonitor([TritonEndpoint("t0", base, base + "/metrics")], metrics)
        try:
            return (await monitor.scrape_once()).queue_depth("m")
        finally:
            await monitor.close()
            await runner.cleanup()

    assert asyncio.run(body()) == 3
