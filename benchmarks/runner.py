"""Systems under test and how to run one load point against one of them.

A system is one entry of ``SYSTEMS``: which Envoy config it runs, whether a sidecar (and in
which ext_authz mode, with which extra ``QOS_*`` settings) sits beside it, and how the load
generator must call it (``GenOptions``). Adding a variant, e.g. the sidecar with one feature
switched off, is one more entry::

    SystemSpec("sidecar-http-nofair", "sidecar fairness off", envoy="sidecar-http",
               sidecar_mode="http", sidecar_env={"QOS_FAIRNESS": "off"})

Triton (and Valkey) are started once per benchmark (``Backend``); each system starts its own
Envoy (and sidecar) for its points and stops them afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import re
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks import loadgen
from benchmarks.loadgen import GenOptions, RunResult
from benchmarks.models import ModelKind
from benchmarks.policy import DEFAULT as DEFAULT_POLICY
from benchmarks.policy import PRESETS, SHARE_ROW, Quota, share_of
from benchmarks.workload import ClassSpec, Request, TenantSpec
from devstack.envoy import EnvoyProcess, render_bootstrap
from devstack.procs import ValkeyProcess, free_port
from devstack.sidecar_proc import SidecarProcess
from devstack.stack import BOOTSTRAPS, ROOT
from devstack.triton import TritonProcess

BASELINES = ROOT / "envoy" / "baselines"
ENVOY_CONFIGS: dict[str, Path] = {
    "passthrough": BASELINES / "passthrough.yaml",
    "local-ratelimit": BASELINES / "local-ratelimit.yaml",
    "adaptive-concurrency": BASELINES / "adaptive-concurrency.yaml",
    "sidecar-http": BOOTSTRAPS["http"],
    "sidecar-grpc": BOOTSTRAPS["grpc"],
    "sidecar-extproc": BOOTSTRAPS["extproc"],
}


@dataclass(frozen=True)
class SystemSpec:
    name: str
    description: str
    envoy: str  # key of ENVOY_CONFIGS
    sidecar_mode: str | None = None  # "http" | "grpc" | "extproc": start a sidecar (and Valkey)
    sidecar_env: Mapping[str, str] = field(default_factory=dict)
    gen: GenOptions = field(default_factory=GenOptions)
    # Which generated policy the sidecar runs (benchmarks/policy.py POLICY_VARIANTS); a
    # user's --policy replaces them all.
    policy_variant: str = DEFAULT_POLICY
    quick: bool = True  # part of the quick mode's default set of systems


SYSTEMS: tuple[SystemSpec, ...] = (
    SystemSpec("passthrough", "Envoy -> Triton, FCFS", "passthrough"),
    SystemSpec(
        "triton-priority",
        "passthrough; client sets Triton parameters.priority by class",
        "passthrough",
        gen=GenOptions(priority_in_body=True),
    ),
    SystemSpec(
        "local-ratelimit", "Envoy local_ratelimit per tenant (policy quotas)", "local-ratelimit"
    ),
    SystemSpec(
        "adaptive-concurrency", "Envoy adaptive_concurrency (gradient)", "adaptive-concurrency"
    ),
    SystemSpec(
        "siloed",
        "one model per class sharing the shared model's devices (--instances; 1: each 1/3 of"
        " its speed, 3: one full-speed device each); the client targets /v2/models/<m>_<class>",
        "passthrough",
        gen=GenOptions(siloed=True),
    ),
    SystemSpec(
        "sidecar-http",
        f"qos-sidecar, ext_authz HTTP mode ({DEFAULT_POLICY} preset)",
        "sidecar-http",
        "http",
    ),
    SystemSpec(
        "sidecar-grpc", "qos-sidecar, ext_authz gRPC mode", "sidecar-grpc", "grpc", quick=False
    ),
    SystemSpec(
        "sidecar-extproc",
        f"qos-sidecar, ext_proc mode ({DEFAULT_POLICY} preset; also puts the class's priority"
        " into Triton's request)",
        "sidecar-extproc",
        "extproc",
    ),
    SystemSpec(
        "sidecar-http-quota-only",
        "qos-sidecar (HTTP), quotas only: no backend-aware admission",
        "sidecar-http",
        "http",
        policy_variant="quota",
        quick=False,
    ),
    SystemSpec(
        "sidecar-http-no-defer",
        "qos-sidecar (HTTP), backend-aware but nothing is held",
        "sidecar-http",
        "http",
        policy_variant="nodefer",
        quick=False,
    ),
    SystemSpec(
        "sidecar-http-no-relegate",
        "qos-sidecar (HTTP), backend-aware without relegation",
        "sidecar-http",
        "http",
        policy_variant="norelegate",
        quick=False,
    ),
)
SYSTEMS = (
    *SYSTEMS,
    SystemSpec(
        "sidecar-http-retry",
        "qos-sidecar (HTTP); batch clients honour Retry-After within their deadline",
        "sidecar-http",
        "http",
        gen=GenOptions(retry_after_classes=("batch",)),
        quick=False,
    ),
    SystemSpec(
        "sidecar-http-static",
        "qos-sidecar (HTTP), standard and batch capped at --max-in-flight batches (a number"
        " measured on the default workload) instead of adaptive caps",
        "sidecar-http",
        "http",
        policy_variant="static",
        quick=False,
    ),
    *(
        SystemSpec(
            f"sidecar-http-{preset}",
            f"qos-sidecar (HTTP), adaptive caps with the {preset} preset (overload.protect)",
            "sidecar-http",
            "http",
            policy_variant=preset,
            # latency in the quick set too: with balanced (sidecar-http) the presets' frontier
            # (qos_targets.PRESET_ROWS) is drawn by default.
            quick=preset == "latency",
        )
        for preset in PRESETS
        if preset != DEFAULT_POLICY  # that one is sidecar-http
    ),
)
SYSTEMS_BY_NAME = {s.name: s for s in SYSTEMS}


def system_named(name: str) -> SystemSpec:
    """A system of SYSTEMS, or `sidecar-http-share-X`: sidecar-http with overload.protect_share
    X on its protected classes (a point of the knob's sweep on the frontier)."""
    if name.startswith(SHARE_ROW):
        variant = name.removeprefix("sidecar-http-")
        share = share_of(variant)  # a bad share stops the run before anything starts
        return SystemSpec(
            name,
            f"qos-sidecar (HTTP), the {DEFAULT_POLICY} preset with protect_share {share}",
            "sidecar-http",
            "http",
            policy_variant=variant,
            quick=False,
        )
    if name not in SYSTEMS_BY_NAME:
        known = ", ".join(SYSTEMS_BY_NAME)
        raise ValueError(f"unknown system {name!r}: one of {known}, or {SHARE_ROW}X (0 < X <= 1)")
    return SYSTEMS_BY_NAME[name]


@dataclass
class Backend:
    """What every system shares: Triton on the benchmark's model repository, Valkey, the
    policy, and where the processes keep their logs."""

    workdir: Path
    triton: TritonProcess
    valkey: ValkeyProcess | None
    model: ModelKind
    policy_dir: Path | None = None  # a user's policy: every sidecar system runs it
    policy_dirs: dict[str, Path] = field(default_factory=dict)  # generated, per variant
    quotas: Mapping[str, Quota] = field(default_factory=dict)
    tenants: Sequence[TenantSpec] = ()
    sidecar_admin_url: str | None = None  # the running system's sidecar, if it has one
    stream_classes: tuple[str, ...] = ()  # streamed by every system, where the model streams
    sidecar_env: Mapping[str, str] = field(default_factory=dict)  # every sidecar's (run-wide)
    client_wait: bool = True  # clients state their timeout (x-qos-timeout-ms)


def local_ratelimit_descriptors(
    tenants: Sequence[TenantSpec], quotas: Mapping[str, Quota]
) -> list[dict[str, Any]]:
    """One descriptor per tenant with a request quota. Envoy refills ``tokens_per_fill`` every
    ``fill_interval``; a 10 s interval keeps a tenth of a request per second of precision."""
    out = []
    for t in tenants:
        q = quotas.get(t.name)
        if q is None or q.rate_per_s is None:
            continue
        burst = max(1, round(q.burst if q.burst is not None else q.rate_per_s))
        out.append(
            {
                "entries": [{"key": "tenant", "value": t.api_key}],
                "token_bucket": {
                    "max_tokens": burst,
                    "tokens_per_fill": max(1, round(q.rate_per_s * 10)),
                    "fill_interval": "10s",
                },
            }
        )
    return out


def envoy_config(
    spec: SystemSpec, backend: Backend, sidecar: SidecarProcess | None
) -> dict[str, Any]:
    config = render_bootstrap(
        ENVOY_CONFIGS[spec.envoy],
        listen_port=free_port(),
        triton_http_port=backend.triton.http_port,
        admin_port=0,
        **(sidecar.envoy_endpoints() if sidecar else {}),
    )
    if spec.envoy == "local-ratelimit":
        config = copy.deepcopy(config)
        hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        for f in hcm["typed_config"]["http_filters"]:
            if f["name"] == "envoy.filters.http.local_ratelimit":
                f["typed_config"]["descriptors"] = local_ratelimit_descriptors(
                    backend.tenants, backend.quotas
                )
    return config


def listen_url(config: Mapping[str, Any]) -> str:
    for listener in config["static_resources"]["listeners"]:
        if listener["name"] == "ingress":
            return f"http://127.0.0.1:{listener['address']['socket_address']['port_value']}"
    raise ValueError("no ingress listener")


@contextlib.contextmanager
def start_system(spec: SystemSpec, backend: Backend) -> Iterator[str]:
    """Start the system's Envoy (and sidecar); yield the URL clients send requests to."""
    with contextlib.ExitStack() as stack:
        sidecar = None
        if spec.sidecar_mode is not None:
            policy_dir = backend.policy_dir or backend.policy_dirs.get(spec.policy_variant)
            if policy_dir is None:
                raise ValueError(f"{spec.name} needs a policy")
            if backend.valkey is not None:
                _flush(backend.valkey)
            env = {
                # The sidecar watches the same Triton the load goes to, every 100 ms.
                "QOS_TRITON_URLS": backend.triton.http_url,
                "QOS_TRITON_METRICS_URLS": backend.triton.metrics_url,
                "QOS_TRITON_SCRAPE_MS": "100",
                **backend.sidecar_env,
                **spec.sidecar_env,
            }
            sidecar = stack.enter_context(
                SidecarProcess(
                    backend.workdir,
                    policy_dir,
                    redis_url=backend.valkey.url if backend.valkey else "",
                    extra_env=env,
                )
            )
        config = envoy_config(spec, backend, sidecar)
        stack.enter_context(EnvoyProcess(config, backend.workdir))
        backend.sidecar_admin_url = sidecar.admin_url if sidecar is not None else None
        try:
            yield listen_url(config)
        finally:
            backend.sidecar_admin_url = None


def sidecar_decisions(backend: Backend) -> dict[str, float] | None:
    """The running sidecar's `qos_decisions_total`, summed by reason (None: no sidecar)."""
    if backend.sidecar_admin_url is None:
        return None
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(backend.sidecar_admin_url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    totals: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "qos_decisions_total":
                totals[sample.labels["reason"]] += sample.value
    return dict(totals)


def _flush(valkey: ValkeyProcess) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", valkey.port), timeout=2) as sock:
        sock.sendall(b"*1\r\n$8\r\nFLUSHALL\r\n")
        sock.recv(64)


_PENDING = re.compile(r'^nv_inference_pending_request_count\{model="([^"]+)"[^}]*\}\s+(\S+)', re.M)


def pending_requests(triton: TritonProcess) -> int:
    """Requests waiting in Triton's queues, all models. When its metrics cannot be read and
    Triton has exited, raises its exit status and the end of its log (`check_alive`) rather
    than the refused connection, which says nothing of why."""
    try:
        with urllib.request.urlopen(triton.metrics_url, timeout=5) as response:
            text = response.read().decode()
    except OSError:  # urllib's URLError included
        triton.check_alive()
        raise
    return sum(int(float(v)) for _, v in _PENDING.findall(text))


def wait_idle(triton: TritonProcess, timeout_s: float = 300.0) -> float:
    """Wait until no request waits in Triton's queues (all models); return seconds waited."""
    t0 = time.monotonic()
    while pending_requests(triton) > 0:
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"Triton queue not empty after {timeout_s:.0f}s")
        time.sleep(0.2)
    # The batch in execution is not "pending": give it time to finish.
    time.sleep(0.3)
    return time.monotonic() - t0


def run_point(
    url: str,
    spec: SystemSpec,
    backend: Backend,
    schedule: Sequence[Request],
    classes: Mapping[str, ClassSpec],
    patience: float,
) -> RunResult:
    gen = replace(spec.gen, stream_classes=backend.stream_classes)
    timeouts = {name: c.deadline_s * patience for name, c in classes.items()}
    stated = timeouts if backend.client_wait else None
    prepared = loadgen.prepare(schedule, backend.model, backend.tenants, classes, gen, stated)
    return loadgen.run(url, prepared, timeouts, retry_classes=spec.gen.retry_after_classes)
