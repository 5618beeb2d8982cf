"""The fleet benchmark's processes and probes: four Envoy + sidecar replicas on one store, and
the threads that watch them (the store's lease sets every 10 ms, each sidecar's decisions
asked directly, each sidecar's `qos_degraded`).

Rules:
- A replica is one Envoy (the shipped ext_authz HTTP bootstrap) and one sidecar process on
  loopback TCP, all watching the one Triton. Every sidecar gets the same `QOS_LEASE_KEY`, as a
  fleet must (settings.py: a lease granted by one replica must verify on another).
- `pod_ids` makes the fleet the pod topology (each sidecar counts and caps its own pod's
  model set); without it, the gateway topology (one set per model for the fleet).
- Probes ask a sidecar's ext_authz HTTP listener directly, as Envoy does, over one kept-alive
  connection per sidecar: the latency is the sidecar's decision plus one loopback HTTP round
  trip (about 0.3 ms here). No request follows and no completion is sent, so each admitted
  probe keeps its lease until the lease TTL. The leak check tells them apart and reports them
  on their own: they are the probe tenant's sets (`{probe}`), and in a model's set the members
  named by the probes' `x-request-id` (the lease id, `PROBE_ID_PREFIX`).
"""

from __future__ import annotations

import contextlib
import http.client
import secrets
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from redis.cluster import RedisCluster

from devstack.envoy import EnvoyProcess, render_bootstrap
from devstack.procs import free_port
from devstack.sidecar_proc import SidecarProcess
from devstack.stack import BOOTSTRAPS

INFER_PATH = "/v2/models/simgpu/infer"
PROBE_PATH = "/authz" + INFER_PATH
PROBE_TAG = "{probe}"  # the probe tenant's keys
PROBE_ID_PREFIX = "fleetprobe-"  # the probes' request ids, hence their lease ids
Store = redis.Redis | RedisCluster


@dataclass
class Replica:
    sidecar: SidecarProcess
    envoy_url: str  # where clients send inference requests


class Fleet:
    """`with Fleet(...) as fleet:` starts `count` replicas; everything stops on exit."""

    def __init__(
        self,
        workdir: Path,
        policy_dir: Path,
        *,
        triton_http_port: int,
        sidecar_env: dict[str, str],
        redis_url: str,
        count: int = 4,
        pod_ids: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.policy_dir = policy_dir
        self.triton_http_port = triton_http_port
        self.sidecar_env = {"QOS_LEASE_KEY": secrets.token_hex(16), **sidecar_env}
        self.redis_url = redis_url
        self.count = count
        self.pod_ids = list(pod_ids) or [""] * count
        self.replicas: list[Replica] = []
        self._exit = contextlib.ExitStack()

    def __enter__(self) -> Fleet:
        try:
            for pod in self.pod_ids:
                sidecar = self._exit.enter_context(
                    SidecarProcess(
                        self.workdir,
                        self.policy_dir,
                        redis_url=self.redis_url,
                        extra_env=self.sidecar_env,
                        transport="tcp",
                        pod_id=pod,
                    )
                )
                port = free_port()
                config = render_bootstrap(
                    BOOTSTRAPS["http"],
                    listen_port=port,
                    triton_http_port=self.triton_http_port,
                    admin_port=0,
                    **sidecar.envoy_endpoints(),
                )
                self._exit.enter_context(EnvoyProcess(config, self.workdir))
                self.replicas.append(Replica(sidecar, f"http://127.0.0.1:{port}"))
        except BaseException:
            self._exit.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exit.close()

    @property
    def admin_urls(self) -> list[str]:
        return [r.sidecar.admin_url for r in self.replicas]


# -- the store -------------------------------------------------------------------------------


def lease_counts(store: Store) -> tuple[dict[str, int], int]:
    """Every non-empty lease set in the store (tenant, class and model sets) and how many of
    its leases are not the probes'; and how many are (module rules). A cluster client scans
    every primary."""
    counts, probes = {}, 0
    for raw in store.scan_iter(match="qos:*leases*", count=1000):
        key = raw.decode() if isinstance(raw, bytes) else str(raw)
        if store.type(key) not in (b"zset", "zset"):
            continue
        members = [m.decode() if isinstance(m, bytes) else str(m) for m in store.zrange(key, 0, -1)]
        ours = 0 if PROBE_TAG in key else sum(not m.startswith(PROBE_ID_PREFIX) for m in members)
        probes += len(members) - ours
        if ours:
            counts[key] = ours
    return counts, probes


def wait_no_leases(store: Store, timeout_s: float) -> tuple[dict[str, int], int, float]:
    """Poll until every lease set holds only probes' leases: (the load's leases left at the
    end, per set; the probes' leases; seconds waited)."""
    start = time.monotonic()
    while True:
        left, probes = lease_counts(store)
        waited = time.monotonic() - start
        if not left or waited >= timeout_s:
            return left, probes, waited
        time.sleep(0.1)


class Sampler(threading.Thread):
    """Calls `read` every `period_s` and keeps (monotonic time, value) pairs."""

    def __init__(self, read: Callable[[], Any], period_s: float) -> None:
        super().__init__(daemon=True)
        self.read = read
        self.period_s = period_s
        self.samples: list[tuple[float, Any]] = []
        self.errors = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic()
        while not self._stop_event.is_set():
            try:
                self.samples.append((time.monotonic(), self.read()))
            except Exception:  # a store that is down or failing over: count and go on
                self.errors += 1
            next_at += self.period_s
            self._stop_event.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> Sampler:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop_event.set()
        self.join(10)


def zcard_sampler(store: Store, keys: Sequence[str], period_s: float = 0.01) -> Sampler:
    """ZCARD of each key every `period_s` (one pipeline per tick where the store allows)."""

    def read() -> list[int]:
        return [int(store.zcard(key)) for key in keys]

    return Sampler(read, period_s)


# -- the sidecars ----------------------------------------------------------------------------


@dataclass
class Probe:
    t: float  # monotonic, when the ask was sent
    replica: int
    latency_s: float
    status: int  # 0: no answer


@dataclass
class Prober:
    """Asks each sidecar's ext_authz listener directly, in turn, every `period_s`."""

    sidecars: Sequence[SidecarProcess]
    api_key: str
    period_s: float = 0.005
    probes: list[Probe] = field(default_factory=list)
    run: str = field(default_factory=lambda: secrets.token_hex(4))  # keeps request ids unique

    def _ask(self, conn: http.client.HTTPConnection, n: int) -> int:
        headers = {"x-api-key": self.api_key, "x-request-id": f"{PROBE_ID_PREFIX}{self.run}-{n}"}
        conn.request("POST", PROBE_PATH, body=b"{}", headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status

    def _run(self, stop: threading.Event) -> None:
        conns = [
            http.client.HTTPConnection("127.0.0.1", s.http_port or 0, timeout=5)
            for s in self.sidecars
        ]
        i = 0
        while not stop.is_set():
            replica = i % len(conns)
            sent = time.monotonic()
            try:
                status = self._ask(conns[replica], i)
            except (OSError, http.client.HTTPException):
                status = 0
                conns[replica].close()  # reconnects on the next request
            self.probes.append(Probe(sent, replica, time.monotonic() - sent, status))
            i += 1
            stop.wait(self.period_s)
        for conn in conns:
            conn.close()

    @contextlib.contextmanager
    def running(self) -> Iterator[Prober]:
        stop = threading.Event()
        thread = threading.Thread(target=self._run, args=(stop,), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(10)


def metrics_text(admin_url: str) -> str:
    with urllib.request.urlopen(admin_url + "/metrics", timeout=5) as response:
        return str(response.read().decode())


def metric_sum(admin_url: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(metrics_text(admin_url)):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def decision_reasons(
    admin_urls: Sequence[str], tenants: Sequence[str]
) -> dict[str, dict[str, int]]:
    """Per tenant, `qos_decisions_total` by reason, summed over the sidecars."""
    from prometheus_client.parser import text_string_to_metric_families

    reasons: dict[str, dict[str, int]] = {t: defaultdict(int) for t in tenants}
    for url in admin_urls:
        for family in text_string_to_metric_families(metrics_text(url)):
            for sample in family.samples:
                tenant = sample.labels.get("tenant", "")
                if sample.name == "qos_decisions_total" and tenant in reasons:
                    reasons[tenant][sample.labels["reason"]] += int(sample.value)
    return {t: dict(r) for t, r in reasons.items()}


def decision_histogram(admin_urls: Sequence[str]) -> dict[float, float]:
    """`qos_decision_duration_seconds` buckets (upper bound -> cumulative count), summed over
    the sidecars and every label."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[float, float] = defaultdict(float)
    for url in admin_urls:
        for family in text_string_to_metric_families(metrics_text(url)):
            for sample in family.samples:
                if sample.name == "qos_decision_duration_seconds_bucket":
                    buckets[float(sample.labels["le"])] += sample.value
    return dict(buckets)


def histogram_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The upper bound of the bucket that holds quantile `q` of the decisions made between two
    readings (inf when it is in the last bucket; nan when there were none)."""
    total = after[float("inf")] - before.get(float("inf"), 0.0)
    if total <= 0:
        return float("nan")
    for bound in sorted(after):
        if after[bound] - before.get(bound, 0.0) >= q * total:
            return bound
    return float("inf")


def histogram_share_within(
    before: dict[float, float], after: dict[float, float], bound: float
) -> float:
    """The share of the decisions between two readings that took at most `bound` seconds
    (`bound` must be a bucket bound); nan when there were none."""
    total = after[float("inf")] - before.get(float("inf"), 0.0)
    if total <= 0:
        return float("nan")
    return (after[bound] - before.get(bound, 0.0)) / total


def degraded_sampler(admin_urls: Sequence[str], period_s: float = 0.05) -> Sampler:
    """Each sidecar's `qos_degraded` (0 or 1) every `period_s`."""
    return Sampler(lambda: [metric_sum(u, "qos_degraded") for u in admin_urls], period_s)


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll `check` until it holds; the monotonic time it did. Raises TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(Exception):
            if check():
                return time.monotonic()
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f}s")
        time.sleep(0.05)
