"""The nudger against a real Triton: what it sends waits out a batch, is rejected unrun, and
stays out of the queue depth the sidecar reads; a model whose nudge could run gets none."""

from __future__ import annotations

import asyncio
import shutil
import threading
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from sidecar.backends.nudge import TritonNudger
from sidecar.backends.triton import TritonEndpoint, TritonLoadMonitor
from sidecar.core.load import parse_triton_metrics
from sidecar.core.nudge import NudgePlan
from sidecar.metrics import Metrics
from tests.binaries import require_binaries

ROOT = Path(__file__).resolve().parents[1]
BATCH = b'{"inputs":[{"name":"DELAY_MS","shape":[1,1],"datatype":"FP32","data":[1500]}]}'


def model_repo(target: Path) -> Path:
    """simgpu as shipped, and a copy whose queue policy lets no request shorten its timeout:
    a nudge sent there would run."""
    shutil.copytree(ROOT / "examples" / "triton" / "simgpu", target / "simgpu")
    plain = target / "plain"
    shutil.copytree(ROOT / "examples" / "triton" / "simgpu", plain)
    config = (plain / "config.pbtxt").read_text()
    config = config.replace('name: "simgpu"', 'name: "plain"')
    config = config.replace("allow_timeout_override: true", "allow_timeout_override: false")
    assert "allow_timeout_override: false" in config
    (plain / "config.pbtxt").write_text(config)
    return target


def count(metrics: Metrics, model: str, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "qos_triton_nudges_total", {"endpoint": "t0", "model": model, "outcome": outcome}
    )
    return value or 0.0


@pytest.mark.stack
def test_nudges_wait_out_a_batch_are_rejected_unrun_and_stay_out_of_the_depth(
    tmp_path: Path,
) -> None:
    require_binaries("triton")
    from devstack.triton import TritonProcess

    with TritonProcess(model_repo(tmp_path / "models"), tmp_path / "triton") as triton:

        def infer() -> None:
            request = urllib.request.Request(triton.http_url + "/v2/models/simgpu/infer", BATCH)
            with urllib.request.urlopen(request, timeout=30) as response:
                response.read()

        def page() -> dict[str, float]:
            with urllib.request.urlopen(triton.metrics_url, timeout=5) as response:
                text = response.read().decode()
            rejected = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("nv_inference_request_failure{")
                and 'model="simgpu"' in line
                and 'reason="REJECTED"' in line
            )
            counters = parse_triton_metrics(text)["simgpu"]
            return {
                "exec": counters.exec_count,
                "success": counters.success,
                "rej": rejected,
                "pending": counters.pending,
            }

        endpoint = TritonEndpoint("t0", triton.http_url, triton.metrics_url)
        metrics = Metrics(CollectorRegistry())
        busy = [("t0", "simgpu"), ("t0", "plain")]
        nudger = TritonNudger([endpoint], metrics, busy=lambda: busy, interval_s=0.02)
        monitor = TritonLoadMonitor([endpoint], metrics)
        monitor.discount = nudger.ledger.discount

        async def scenario() -> tuple[int, float, int]:
            nudging = asyncio.create_task(nudger.run())
            worker = threading.Thread(target=infer)
            try:
                nudger.ledger.ended("simgpu")
                nudger.ledger.ended("plain")
                for _ in range(500):  # both configs read
                    if None not in (nudger.plan_of("t0", "simgpu"), nudger.plan_of("t0", "plain")):
                        break
                    await asyncio.sleep(0.01)
                worker.start()
                for _ in range(1000):  # a few nudges sent since the batch began
                    if nudger.ledger.waiting("t0", "simgpu") >= 5 or not worker.is_alive():
                        break
                    nudger.ledger.ended("simgpu")  # as if requests kept ending: one is due
                    await asyncio.sleep(0.01)
                waiting = nudger.ledger.waiting("t0", "simgpu")
                raw = (await asyncio.to_thread(page))["pending"]
                view = await monitor.scrape_once()
                depth = view.queue_depth("simgpu")
                await asyncio.to_thread(worker.join, 30)
                busy.clear()
                for _ in range(500):  # every nudge answered
                    if nudger.ledger.waiting("t0", "simgpu") == 0:
                        break
                    await asyncio.sleep(0.01)
                return waiting, raw, depth
            finally:
                nudging.cancel()
                await asyncio.gather(nudging, return_exceptions=True)
                await monitor.close()

        waiting, raw, depth = asyncio.run(scenario())
        # Nudges sent during the batch waited in Triton's queue (the batcher looks at it only
        # between batches), and the depth the sidecar reads leaves them out.
        assert waiting >= 5 and raw >= 3
        assert depth == 0
        # Then every one was rejected unrun: Triton ran the one real batch and nothing else.
        rejected = count(metrics, "simgpu", "rejected")
        assert rejected >= waiting
        assert count(metrics, "simgpu", "ran") == count(metrics, "simgpu", "failed") == 0
        assert page() == {"exec": 1, "success": 1, "rej": rejected, "pending": 0}
        assert nudger.ledger.waiting("t0", "simgpu") == 0
        # The model whose nudge could run got none, and says why.
        plan = nudger.plan_of("t0", "plain")
        assert isinstance(plan, str) and "does not allow" in plan
        assert isinstance(nudger.plan_of("t0", "simgpu"), NudgePlan)
        assert sum(count(metrics, "plain", o) for o in ("rejected", "ran", "failed")) == 0
        assert (
            metrics.registry.get_sample_value(
                "qos_triton_nudge_enabled", {"endpoint": "t0", "model": "plain"}
            )
            == 0
        )


def test_only_ends_of_a_model_busy_at_the_last_round_count() -> None:
    """The model of an end comes from a request's path: names Triton's load view does not
    show busy never enter the ledger, so a client cannot grow it."""
    busy = [("t0", "llm")]
    nudger = TritonNudger(
        [TritonEndpoint("t0", "http://127.0.0.1:9", "http://127.0.0.1:9/metrics")],
        Metrics(CollectorRegistry()),
        busy=lambda: busy,
    )
    nudger.ended("llm")
    assert not nudger.ledger.due("t0", "llm")  # no round yet: nothing known busy
    nudger._busy_models = frozenset({"llm"})  # what a round over `busy` leaves
    nudger.ended("llm")
    nudger.ended("made-up")
    assert nudger.ledger.due("t0", "llm") and not nudger.ledger.due("t0", "made-up")
