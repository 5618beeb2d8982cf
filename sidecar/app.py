"""Wiring: one event loop (uvloop) serving ext_authz HTTP, the gRPC services (ext_authz,
ext_proc, access-log completion) and the admin listener.

Start-up order: settings → policy (refuse to start if invalid) → quota store → service →
listeners. Reloads come from SIGHUP and from a poll of the policy files; a bad policy keeps
the last good one and is reported by metrics and /v1/policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import secrets
import signal
import socket
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from prometheus_client import CollectorRegistry

from sidecar.admin.http import build_admin_app
from sidecar.admin.staleness import InFlightRefresher
from sidecar.backends.nudge import TritonNudger
from sidecar.backends.triton import TritonEndpoint, TritonLoadMonitor
from sidecar.core.holds import HoldBounds
from sidecar.envoy import authz_grpc, authz_http, ext_proc
from sidecar.envoy.access_log import AccessLogServicer
from sidecar.envoy.authz_grpc import AuthorizationServicer
from sidecar.envoy.authz_http import AuthzHttp
from sidecar.envoy.common import UNAUTHENTICATED_REASON, TokenCheck, grpc_health_handler
from sidecar.envoy.ext_proc import ExternalProcessorServicer
from sidecar.envoy.grpc_methods import envoy_methods
from sidecar.envoy.grpc_wire import GrpcWireServer
from sidecar.envoy.http_wire import WireListener
from sidecar.envoy.listening import SocketListener
from sidecar.gc_pauses import PauseWatcher, freeze_start_up
from sidecar.metrics import Metrics
from sidecar.policy.reload import PolicyHolder
from sidecar.service import AdmissionService
from sidecar.settings import ListenAddr, Settings
from sidecar.state.base import QuotaStore
from sidecar.state.breaker import CircuitBreaker, GuardedStore
from sidecar.state.memory import MemoryQuotaStore
from sidecar.state.redis_store import RedisQuotaStore

log = logging.getLogger("sidecar")
IN_FLIGHT_REFRESH_S = 1.0
OPEN_FILES_CEILING = 1 << 20  # what `raise_open_files_limit` asks for at most
# In ext_proc mode a request body arrives as one gRPC message, as large as Envoy's buffer limit
# (per_connection_buffer_limit_bytes, 1 MiB by default). gRPC's default cap of 4 MiB would make
# a raised Envoy limit fail with 503; this leaves room for it.
GRPC_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Envoy usually runs as another user (uid 101 in its image) that shares a group with the
# sidecar (a pod's fsGroup, compose's group_add): connecting needs write permission on the
# socket, which the default umask withholds from the group.
SOCKET_MODE = 0o660
# Every replica says it is alive this often; one silent for HEARTBEAT_TTL_S no longer counts
# (three missed beats: a slow loop is not a dead replica).
HEARTBEAT_S = 2.0
HEARTBEAT_TTL_S = 3 * HEARTBEAT_S
# Gateway topology: how often replicas read the model counts and exchange their holds while
# any of them holds a request (one small script call each, per replica).
FLEET_BUSY_S = 0.025
# Leased mode: how often expired slices give back what they did not spend (core/slices.py).
SLICE_SWEEP_S = 0.05


def make_store(settings: Settings, metrics: Metrics) -> QuotaStore:
    if settings.redis_url:
        redis = RedisQuotaStore(
            settings.redis_url,
            mode=settings.redis_mode,
            sentinel_master=settings.redis_sentinel_master,
            timeout_s=settings.redis_timeout_ms / 1000,
            # A model step that failed without failing its call (see sidecar.state.base).
            on_model_set_failure=metrics.state_errors.labels("model_lease").inc,
        )
        # Fail fast while Redis is down (sidecar/state/breaker.py).
        breaker = CircuitBreaker(
            on_change=lambda degraded: metrics.degraded.set(1 if degraded else 0),
            on_degraded_s=metrics.degraded_seconds.inc,
        )
        return GuardedStore(redis, breaker)
    return MemoryQuotaStore()


def lease_key_of(settings: Settings) -> bytes:
    """The key that signs lease tokens: the configured one, else a random one (see
    Settings.lease_key for what that means with several replicas or a restart)."""
    if settings.lease_key:
        return settings.lease_key.encode()
    log.warning(
        "QOS_LEASE_KEY is not set: lease tokens are signed with a random key of this process;"
        " set one key on every replica, or leases completed elsewhere wait for their TTL"
    )
    return secrets.token_bytes(32)


def make_policy_holder(paths: Sequence[Path | str], metrics: Metrics) -> PolicyHolder:
    """The policy's one home, loaded from `paths` (raises PolicyError if invalid), with each
    reload counted once in `metrics` and the version in use exported."""

    def count_reload(ok: bool) -> None:
        # The one place a reload is counted: the holder calls this once per reload, after
        # the first load (so `holder` is bound by then).
        metrics.policy_reloads.labels("ok" if ok else "error").inc()
        metrics.policy_last_reload_ok.set(1 if ok else 0)
        if ok:
            metrics.set_policy_version(holder.current.version)

    holder = PolicyHolder(paths, on_result=count_reload)
    metrics.policy_last_reload_ok.set(1)  # the first load succeeded, or we would not be here
    metrics.set_policy_version(holder.current.version)
    return holder


@dataclass
class Sidecar:
    """A running sidecar: its parts, for the CLI and for tests that run it in-process."""

    settings: Settings
    holder: PolicyHolder
    service: AdmissionService
    metrics: Metrics
    authz_listener: WireListener
    runners: list[web.AppRunner]
    grpc_server: Any
    tasks: list[asyncio.Task[None]]
    monitor: TritonLoadMonitor | None = None
    gc_watcher: PauseWatcher | None = None

    def reload_policy(self) -> bool:
        """Reload the policy files (SIGHUP, or a change seen by the poll). Never raises: the
        holder keeps the last good policy, logs and reports the result to the metrics."""
        return self.holder.reload()

    async def stop(self) -> None:
        if self.gc_watcher is not None:
            self.gc_watcher.stop()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.grpc_server.stop(grace=1.0)
        await self.authz_listener.close()
        for runner in self.runners:
            await runner.cleanup()
        # One last try at the releases still owed; what fails now lives one lease TTL. And
        # leased mode's unspent units go back, for the other replicas.
        with contextlib.suppress(Exception):
            await self.service.leases.drain()
        with contextlib.suppress(Exception):
            await self.service.return_slices(everything=True)
        for listen in (self.settings.authz_http_listen, self.settings.grpc_listen):
            if listen.unix_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(listen.unix_path)
        await self.service.store.close()


def max_hold_ms(settings: Settings) -> dict[str, int]:
    """Each transport's longest hold (core/holds.py), by the name its adapter decides as."""
    check = settings.check_max_hold_ms
    return {
        authz_http.API: check,
        authz_grpc.API: check,
        ext_proc.API: settings.ext_proc_max_hold_ms,
    }


def make_monitor(settings: Settings, metrics: Metrics) -> TritonLoadMonitor | None:
    """The Triton load monitor, when the sidecar is told where Triton is."""
    if not settings.triton_urls:
        return None
    return TritonLoadMonitor(
        [TritonEndpoint(*e) for e in settings.triton_endpoints()],
        metrics,
        interval_s=settings.triton_scrape_ms / 1000,
        timeout_s=max(0.05, min(1.0, settings.triton_scrape_ms / 1000)),
    )


def _beside_triton(
    settings: Settings, monitor: TritonLoadMonitor, service: AdmissionService, replica: str
) -> list[Coroutine[Any, Any, None]]:
    """What runs beside the Triton endpoints, with the monitor's hooks set: the monitor, the
    model in-flight refresh, and the nudger if nudges are on."""
    if service.deferrer is not None:
        monitor.on_update = service.deferrer.on_scrape
    monitor.on_page = service.usage.scraped  # GPU-seconds per tenant (sidecar/usage.py)
    interval_s = settings.triton_scrape_ms / 1000
    works = [monitor.run(), _refresh_model_in_flight(service, monitor, interval_s, replica)]
    nudger = make_nudger(settings, monitor, service)
    if nudger is not None:
        works.append(nudger.run())
    return works


def make_nudger(
    settings: Settings, monitor: TritonLoadMonitor | None, service: AdmissionService
) -> TritonNudger | None:
    """The nudger of Triton's stalling batchers (core/nudge.py), if nudges are on: in one
    process, the first worker or the only one."""
    if monitor is None or not settings.triton_nudge_ms or settings.worker_index > 0:
        return None
    deferrer = service.deferrer
    if deferrer is None:  # it is told of request ends: without it nothing says when to nudge
        return None
    nudger = TritonNudger.beside(monitor, deferrer.in_flight, settings.triton_nudge_ms / 1000)
    deferrer.on_ended = nudger.ended
    return nudger


async def start(settings: Settings, registry: CollectorRegistry | None = None) -> Sidecar:
    """Start every listener; raises PolicyError if the policy is invalid at start."""
    metrics = Metrics(registry or CollectorRegistry())
    holder = make_policy_holder(settings.policy_path, metrics)
    monitor = make_monitor(settings, metrics)
    service = AdmissionService(
        holder,
        make_store(settings, metrics),
        metrics,
        load=monitor.view if monitor is not None else None,
        stale_after_s=settings.triton_stale_ms / 1000,
        queue_alpha_s_per_unit=settings.queue_alpha_ms_per_unit / 1000,
        release_grace_s=settings.release_grace_ms / 1000,
        model_pod=settings.model_pod,
    )
    service.hold_bounds = HoldBounds(max_hold_ms(settings))
    service.explain_refusals = settings.explain_refusals

    lease_key = lease_key_of(settings)
    auth = TokenCheck(settings.auth_token, metrics.unauthenticated_calls.labels)
    authz, runners = await _start_http(settings, service, holder, monitor, lease_key, auth)
    server = await _start_grpc(settings, service, lease_key, auth)
    # The admin listener last: once /readyz answers, every Envoy-facing listener is bound
    # (a supervisor or test waiting on it may send traffic to this worker at once).
    admin_host, admin_port = settings.admin_host_port
    await web.TCPSite(runners[0], admin_host, admin_port, reuse_address=True).start()
    sidecar = Sidecar(settings, holder, service, metrics, authz, runners, server, [], monitor)
    sidecar.gc_watcher = PauseWatcher(metrics.gc_pause_seconds)
    replica = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"  # in the store
    if monitor is not None:
        for work in _beside_triton(settings, monitor, service, replica):
            sidecar.tasks.append(asyncio.create_task(work))
    sidecar.tasks.append(asyncio.create_task(_watch_policy(sidecar)))
    sidecar.tasks.append(asyncio.create_task(_refresh_in_flight(service)))
    sidecar.tasks.append(asyncio.create_task(_heartbeat(service, replica)))
    sidecar.tasks.append(asyncio.create_task(_return_slices(service)))
    if isinstance(service.store, GuardedStore):  # the only probe while Redis is down
        sidecar.tasks.append(asyncio.create_task(_probe_store(service.store)))
    # Renews the leases of running requests and retries owed releases (sidecar/leases.py).
    sidecar.tasks.append(asyncio.create_task(service.leases.run()))
    log.info(
        "qos-sidecar up: authz http %s, grpc (ext_authz, ext_proc, access log) %s, admin %s,"
        " policy %s, store %s, auth token %s, model counts %s",
        settings.authz_http_addr,
        settings.grpc_addr,
        settings.admin_addr,
        holder.current.version,
        "redis" if settings.redis_url else "memory",
        "required" if settings.auth_token else "off",
        f"of pod {settings.model_pod!r}" if settings.model_pod else "fleet-wide (gateway)",
    )
    return sidecar


async def _start_http(
    settings: Settings,
    service: AdmissionService,
    holder: PolicyHolder,
    monitor: TritonLoadMonitor | None,
    lease_key: bytes,
    auth: TokenCheck,
) -> tuple[WireListener, list[web.AppRunner]]:
    """ext_authz over HTTP (a Unix socket or TCP) and the admin app (TCP, aiohttp), set up
    here and served last by `start`."""

    async def triton_readiness() -> tuple[list[str], dict[str, Any]]:
        if monitor is None:
            return [], {}
        view = monitor.view()
        # A check older than the staleness bound is no evidence that Triton is up now.
        problems = view.not_ready(monitor.clock(), settings.triton_stale_ms / 1000)
        return problems, {"triton": dict(view.ready)}

    authz = AuthzHttp(service, lease_key=lease_key, auth=auth).listener()
    await _listen(authz, settings.authz_http_listen, settings)
    # handler_cancellation: when a caller gives up, stop answering it.
    runner = web.AppRunner(
        build_admin_app(service, holder, triton_readiness),
        handler_cancellation=True,
        access_log=None,
    )
    await runner.setup()
    return authz, [runner]


def _prepare_socket_dir(path: str) -> None:
    """The socket's directory, created if missing (a shared volume usually provides it)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)


async def _listen(listener: SocketListener, listen: ListenAddr, settings: Settings) -> None:
    """An Envoy-facing listener on its Unix socket (Envoy's group may connect) or TCP port."""
    if listen.unix_path is not None:
        _prepare_socket_dir(listen.unix_path)
        await listener.start_unix(listen.unix_path)
        os.chmod(listen.unix_path, SOCKET_MODE)
    else:
        # Workers share the Envoy-facing ports (sidecar/workers.py rule 1), never the admin one.
        await listener.start_tcp(listen.host, listen.port, reuse_port=settings.workers > 1)


async def _start_grpc(
    settings: Settings, service: AdmissionService, lease_key: bytes, auth: TokenCheck
) -> Any:
    """ext_authz over gRPC, ext_proc and the access-log completion stream, on one server
    (a Unix socket or TCP); every call passes the token check first."""
    if settings.grpc_server == "grpcio":
        return await _start_grpcio(settings, service, lease_key, auth)
    server = GrpcWireServer(
        envoy_methods(service, lease_key),
        auth,
        max_message_bytes=GRPC_MAX_MESSAGE_BYTES,
        unauthenticated_reason=UNAUTHENTICATED_REASON,
    )
    await _listen(server, settings.grpc_listen, settings)
    return server


async def _start_grpcio(
    settings: Settings, service: AdmissionService, lease_key: bytes, auth: TokenCheck
) -> Any:
    """`_start_grpc` on grpc.aio."""
    server = grpc.aio.server(
        interceptors=[auth.grpc_interceptor()],
        options=[
            ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
            # gRPC sets SO_REUSEPORT by default: a second sidecar on the same port would then
            # silently take half of Envoy's connections. Only workers share it.
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        ],
    )
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
        AuthorizationServicer(service, lease_key=lease_key), server
    )
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(
        ExternalProcessorServicer(service, lease_key=lease_key), server
    )
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(
        AccessLogServicer(service, lease_key=lease_key), server
    )
    server.add_generic_rpc_handlers((grpc_health_handler(),))
    listen = settings.grpc_listen
    if listen.unix_path is not None:
        _prepare_socket_dir(listen.unix_path)
    # grpc unlinks a stale socket file before binding, as asyncio does.
    if server.add_insecure_port(settings.grpc_addr) == 0:
        raise OSError(f"cannot listen on {settings.grpc_addr}")
    await server.start()
    if listen.unix_path is not None:
        os.chmod(listen.unix_path, SOCKET_MODE)
    return server


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT; SIGHUP reloads the policy."""
    sidecar = await start(settings)
    freeze_start_up()  # the process's own start-up only: tests start sidecars in one process
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, sidecar.reload_policy)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
    finally:
        await sidecar.stop()


def raise_open_files_limit() -> int:
    """The soft limit on open files raised to the hard one (at most 2**20, Linux's usual
    ceiling); the soft limit after. Each held ext_authz HTTP request keeps one Envoy
    connection open (a class holds up to its `max_queued`, 1024 by default), and a soft limit
    of 1024, common on hosts, would refuse connections before the queues fill."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = OPEN_FILES_CEILING if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_CEILING)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("open files: soft limit %d, cannot raise it to %d: %s", soft, target, exc)
            return soft
        log.info("open files: soft limit raised from %d to %d", soft, target)
        return target
    return soft


def run(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    raise_open_files_limit()
    try:
        import uvloop
    except ImportError:  # uvloop is a dependency; this only guards odd platforms
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))


async def _watch_policy(sidecar: Sidecar) -> None:
    interval_s = sidecar.settings.policy_poll_ms / 1000
    while True:
        await asyncio.sleep(interval_s)
        if sidecar.holder.changed():
            sidecar.reload_policy()


async def _refresh_model_in_flight(
    service: AdmissionService, monitor: TritonLoadMonitor, interval_s: float, replica: str
) -> None:
    """Each model's global in-flight count, as often as Triton is scraped: the models Triton
    reports and those the policy names (never names taken from requests: labels stay
    bounded). In the gateway topology, the fleet's holds and fairness counters too, and
    every FLEET_BUSY_S while any replica holds a request: room that frees on one replica is
    seen by the others (and a hold let go stops being reserved for) within that, not a
    scrape interval later, which would idle the pool's room for as long."""
    fleet_ttl_s = max(1.0, 4 * interval_s)  # a replica silent for 4 intervals drops out
    deferrer = service.deferrer
    while True:
        models = set(monitor.view().models) | set(service.policy.models)
        if service.deferrer is not None:  # those it admitted (named by a served model)
            models |= service.deferrer.in_flight_counts.models()
        try:
            await service.refresh_model_in_flight(sorted(models))
            await service.exchange_fleet(replica, fleet_ttl_s)
        except Exception:  # a bug here must not end the loop (admission would lose the cap)
            log.exception("model in-flight refresh failed")
        busy = deferrer is not None and deferrer.shared and deferrer.fleet_busy()
        await asyncio.sleep(min(interval_s, FLEET_BUSY_S) if busy else interval_s)


async def _probe_store(store: GuardedStore) -> None:
    """While the store's circuit is open, probe it (one PING per probe interval) so that it
    closes as soon as the store answers; requests never wait for a probe."""
    interval_s = store.breaker.probe_interval_s / 4
    while True:
        await asyncio.sleep(interval_s)
        try:
            await store.probe()
        except Exception:  # a bug here must not end the loop (the circuit would stay open)
            log.exception("store probe failed")


async def _heartbeat(service: AdmissionService, replica: str) -> None:
    """Keep this replica counted among the live ones (the share of each limit in degraded
    mode), and the degraded time counted while the store's circuit is open."""
    while True:
        try:
            await service.heartbeat(replica, HEARTBEAT_TTL_S)
            if isinstance(service.store, GuardedStore):
                service.store.breaker.accrue()
        except Exception:  # a bug here must not end the loop
            log.exception("heartbeat failed")
        await asyncio.sleep(HEARTBEAT_S)


async def _return_slices(service: AdmissionService) -> None:
    """Leased mode: give back what expired slices did not spend, every SLICE_SWEEP_S (the
    most a slice's rest waits beyond its lease_ms)."""
    while True:
        await asyncio.sleep(SLICE_SWEEP_S)
        try:
            await service.return_slices()
        except Exception:  # a bug here must not end the loop (units would stay held)
            log.exception("returning slices failed")


async def _refresh_in_flight(service: AdmissionService) -> None:
    refresher = InFlightRefresher(service)
    while True:
        await refresher.once()
        await asyncio.sleep(IN_FLIGHT_REFRESH_S)
