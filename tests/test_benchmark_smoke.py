"""The QoS benchmark runs end to end on a tiny configuration and writes a sane report.

Checks the shape and consistency of what it writes, and that it measured what it claims:
requests really went through the sidecar (its own decision counts), a run where everything
failed does not pass, and the sidecar rows differ from pass-through where they must.
"""

from __future__ import annotations

import csv
import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.binaries import require_binaries

pytestmark = pytest.mark.stack

SYSTEMS = ("passthrough", "sidecar-http")
LOADS = (0.5, 2.0)


def run_quick(
    tmp_path: Path, *args: str
) -> tuple[subprocess.CompletedProcess[str], Path, dict[str, Any]]:
    """`benchmarks.qos --quick` on 3 s points at C = 20 with `args`: the finished process,
    its results folder and its results.json."""
    done = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.qos", "--quick", "--duration", "3",
            "--warmup", "0.5", "--capacity", "20", "--out", str(tmp_path), *args,
        ],
        capture_output=True, text=True, timeout=150, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (out,) = list(tmp_path.iterdir())
    results: dict[str, Any] = json.loads((out / "results.json").read_text())
    return done, out, results


def test_benchmark_tiny_run_writes_a_sane_report(tmp_path: Path) -> None:
    require_binaries("envoy", "triton", "valkey")
    pytest.importorskip("matplotlib")
    done, out, results = run_quick(
        tmp_path,
        "--systems", ",".join(SYSTEMS),
        "--loads", ",".join(str(m) for m in LOADS),
        "--seeds", "2",
        "--step-systems", "sidecar-http", "--step", "1,2,2", "--explain-refusals",
        "--device-log",
    )  # fmt: skip
    meta = results["meta"]
    assert meta["capacity_rps"] == 20
    assert set(results["systems"]) == set(SYSTEMS)
    for name, system in results["systems"].items():
        assert sorted(p["m"] for p in system["points"]) == list(LOADS), name
        assert system["goodput_over_c"] >= 0
        for point in system["points"]:
            assert len(point["seeds"]) == 2, name  # each seed's headline, for the spread
            overall = point["overall"]
            assert overall["sent"] > 0
            assert overall["admitted"] > 0, (name, point["m"])  # not a run of errors
            check_sidecar_counts(name, point)
            assert (
                overall["admitted"] + overall["shed_429"] + overall["shed_503"] + overall["errors"]
                == overall["sent"]
            )
            assert set(point["classes"]) == set(meta["classes"])
            for klass, stats in point["classes"].items():
                assert 0.0 <= stats["violation_pct"] <= 100.0, (name, klass)
                assert (
                    stats["admitted"] + stats["shed_429"] + stats["shed_503"] + stats["errors"]
                    == stats["sent"]
                )
                assert stats["slo_met"] <= stats["admitted"]
            assert sum(c["sent"] for c in point["classes"].values()) == overall["sent"]
            for jain in point["jain"].values():
                assert jain is None or 0.0 < jain <= 1.0 + 1e-9
            assert set(point["tenants"]) == {t["name"] for t in meta["tenants"]}
            # A tenant's refusals are among its violations, and they add up to the point's.
            for tenant in point["tenants"].values():
                refused = tenant["shed_503"] + tenant["shed_429"]
                assert refused <= tenant["violations"] <= tenant["sent"]
            for code in ("503", "429"):
                total = sum(t[f"shed_{code}"] for t in point["tenants"].values())
                assert total == overall[f"shed_{code}"], (name, code)
            check_device(name, point)
    # The noisy point: the noisy tenant at 3x its rate (1.2 C), the others at 1x (0.6 C).
    for name, system in results["systems"].items():
        noisy = system["noisy"]
        assert (noisy["burst"], noisy["m"]) == (3.0, 1.8), name
        share = noisy["tenants"][meta["noisy_tenant"]]["sent"] / noisy["overall"]["sent"]
        assert 0.55 < share < 0.8, (name, share)  # 2/3 expected
    step = results["systems"]["sidecar-http"]["step"]
    assert len(step["seeds"]) == 2  # the step ran once per seed; recovery from both pooled
    assert all(s is None or 0.0 <= s <= 2.0 for s in step["seeds"])
    # The autoscaling signal was sampled from the sidecar during the step (demand_probe.py).
    signal = results["systems"]["sidecar-http"]["step"]["demand_signal"]
    assert signal["samples"] > 0 and signal["ratio_peak"] is not None
    assert [c["threshold"] for c in signal["crossings"]] == [1.0, 1.1]
    # So were the adaptive caps and the model's held and in-flight counts.
    caps = results["systems"]["sidecar-http"]["step"]["caps"]
    assert any({"held", "in_flight", "cap:batch"} <= set(c) for _, c in caps)
    assert "the adaptive caps of the protected classes" in (out / "report.md").read_text()
    # At 2x capacity the sidecar must refuse or hold something; pass-through has no limiter.
    at_2x = {
        n: next(p for p in s["points"] if p["m"] == 2.0) for n, s in results["systems"].items()
    }
    plain, sidecar = at_2x["passthrough"]["overall"], at_2x["sidecar-http"]["overall"]
    assert plain["shed_429"] == 0
    assert sidecar["shed_429"] + sidecar["shed_503"] + sidecar["deferred_rps"] > 0, sidecar
    table = (out / "report.md").read_text()
    for name in SYSTEMS:
        assert f"| {name} |" in table
    # Issue 12's targets, last, for the sidecar system only; the frontier in the report.
    tail = done.stdout.strip().splitlines()
    targets = [line for line in tail if line.startswith("TARGET ")]
    assert targets and tail[-len(targets) :] == targets
    assert all("[sidecar-http]" in line for line in targets)
    assert any(line.startswith("TARGET slo_met_2x[sidecar-http]") for line in targets)
    # Issue 13 §5: the GPU-seconds the sidecar attributed add up to Triton's compute time.
    gpu = results["systems"]["sidecar-http"]["gpu_seconds"]
    assert gpu["triton_compute_s"] > 0, gpu
    assert abs(gpu["attributed_over_triton"] - 1.0) <= 0.05, gpu
    assert "gpu_seconds" not in results["systems"]["passthrough"]
    # The sidecar's own collector in each point (a pause is time no decision is made).
    for point in results["systems"]["sidecar-http"]["points"]:
        gc = point["sidecar_gc"]
        assert gc["collections"] >= gc["gen2_collections"] >= 0 and gc["pause_ms"] >= 0, gc
    assert not any("sidecar_gc" in p for p in results["systems"]["passthrough"]["points"])
    assert any(line.startswith("TARGET gpu_seconds_attributed[sidecar-http]") for line in targets)
    assert "## Frontier" in table
    for png in ("violations_vs_load.png", "latency_cdf_2x.png", "frontier.png"):
        assert (out / png).stat().st_size > 1000
    with gzip.open(out / "records.csv.gz", "rt") as handle:
        assert handle.readline().startswith("system,run,tenant,class")
    with gzip.open(out / "records.csv.gz", "rt") as handle:
        rows = list(csv.DictReader(handle))
    # --explain-refusals: each of the sidecar's refusals came with its decision's steps.
    refused = [r for r in rows if r["system"] == "sidecar-http" and r["status"] in ("429", "503")]
    assert refused
    for r in refused:
        assert r["trace"].endswith(f"shed {r['status']} {r['reason']}"), r
    assert not any(r["trace"] for r in rows if r["status"] == "200")
    # Each request's id, as the device log names it: one per request sent.
    assert all(r["request_id"] for r in rows) and len({r["request_id"] for r in rows}) == len(rows)
    # The sidecar rows run the balanced preset: caps learnt, none fixed by this workload.
    shipped = yaml.safe_load((out / "policy" / "balanced" / "bench.yaml").read_text())
    for klass in ("standard", "batch"):
        assert shipped["classes"][klass]["overload"]["protect"] == "balanced"
        assert "max_in_flight" not in shipped["classes"][klass]["overload"]


def check_device(name: str, point: dict[str, Any]) -> None:
    """--device-log: every answered request was found, by its id, in a batch the model logged,
    the waits and batch lengths read from them are in order, and the misses put down to a long
    request are misses."""
    device = point["device"]
    assert device["answered"] > 0, name
    assert device["matched"] == device["answered"], (name, device)
    share = device["idle_while_waiting_share"]
    assert share is not None and 0.0 <= share < 1.0, (name, device)
    assert set(device["classes"]) <= {"interactive", "standard", "batch"}
    for klass, c in device["classes"].items():
        assert c["wait_ms_p50"] >= -1.0, (name, klass, c)  # a send just before its batch
        assert c["wait_ms_p50"] <= c["wait_ms_p99"] and c["batch_ms_p50"] <= c["batch_ms_p95"]
        assert c["batch_ms_p50"] > 0, (name, klass, c)
    # Each miss that was not a refusal is put down to one class (or to none found), once.
    for klass, who in device["missed_behind"].items():
        assert set(who) <= {"interactive", "standard", "batch", "unknown", "no batch"}
        stats = point["classes"][klass]
        assert 0 < sum(who.values()) <= stats["admitted"] - stats["slo_met"] + stats["errors"]


def check_sidecar_counts(name: str, point: dict[str, object]) -> None:
    """A sidecar system's row carries the sidecar's own decision counts, which must cover
    every request sent (warm-up included) and admit some; pass-through has none."""
    overall = point["overall"]
    assert isinstance(overall, dict)
    if name == "passthrough":
        assert overall["sidecar_decisions"] is None and overall["deferred_rps"] is None
        return
    decisions = overall["sidecar_decisions"]
    assert isinstance(decisions, dict), name
    assert sum(decisions.values()) >= overall["sent"], (name, decisions)
    admitted = sum(v for k, v in decisions.items() if k.startswith("admitted"))
    assert admitted > 0, (name, decisions)
    assert overall["deferred_rps"] >= 0 and overall["relegated_rps"] >= 0


def test_a_streamed_class_on_the_in_flight_batcher_reports_ttft_and_tpot(tmp_path: Path) -> None:
    """Issue 12 §3: on `llm_ifb` interactive is streamed (generate_stream, through the
    sidecar's ext_proc, which counts the tokens as they pass), and the report gives its time to
    first token, before its last, and its time per output token; other classes are not."""
    require_binaries("envoy", "triton", "valkey")
    pytest.importorskip("matplotlib")
    _, out, results = run_quick(
        tmp_path,
        "--model", "llm_ifb", "--systems", "passthrough,sidecar-extproc",
        "--loads", "0.5", "--seeds", "1", "--step-systems", "none", "--noisy-burst", "0",
    )  # fmt: skip
    assert results["meta"]["streamed_classes"] == ["interactive"]
    for name, system in results["systems"].items():
        (point,) = system["points"]
        interactive = point["classes"]["interactive"]
        assert interactive["slo_met"] > 0, (name, interactive)
        ttft, latency = interactive["ttft_ms"], interactive["latency_ms"]
        assert 0 < ttft["p50"] < latency["p50"], (name, interactive)
        assert 0 < interactive["tpot_ms"]["p50"] < ttft["p99"], (name, interactive)
        assert "tpot_ms" not in point["classes"]["standard"], name
    assert "TTFT p50/p99, TPOT p50/p99 ms" in (out / "report.md").read_text()
    with gzip.open(out / "records.csv.gz", "rt") as handle:
        rows = list(csv.DictReader(handle))
    streamed = [r for r in rows if r["class"] == "interactive" and r["status"] == "200"]
    assert streamed and all(r["tpot_s"] for r in streamed)
    assert not any(r["tpot_s"] for r in rows if r["class"] != "interactive")
