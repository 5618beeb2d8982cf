"""`qos-sidecar serve --workers N`: N sidecar processes behind the same Envoy-facing ports.

One process runs one event loop on one core. On a host with more cores, `--workers N` starts
N worker processes (each a whole sidecar, `python -m sidecar.cli serve` with its
`worker_index` set) and supervises them. Rules:
1. The Envoy-facing listeners are TCP ports opened with SO_REUSEPORT by every worker; the
   kernel spreads new connections over them (Envoy's connections to the sidecar, hashed by
   source port). Unix sockets cannot be shared this way, so N > 1 needs TCP listeners
   (loopback needs nothing more; see settings.py for other addresses).
2. Workers share what lives in Redis: tenant buckets, concurrency, leases, model counts, the
   gateway topology's fleet exchange. So N > 1 needs `redis_url`: an in-memory store per
   worker would multiply every limit by N. Each worker is a replica in the store's sense
   (its own heartbeat), so degraded mode divides a limit among all workers of all pods.
3. Workers do not share memory: each has its own hold queues, Triton scrapes, policy copy
   (each reloads it), slices in leased mode and metrics. Worker i serves its admin listener
   on the admin port + i; scrape them all (their counters add up).
4. They share one lease key (the configured one, or one drawn here for all of them): a lease
   granted by one worker is released through whichever worker receives its access-log entry.
5. A worker that exits while the supervisor is not stopping is started again after
   RESTART_DELAY_S. SIGTERM/SIGINT stop every worker (each drains as a lone sidecar does);
   SIGHUP is passed on (reload). A worker whose supervisor dies gets SIGTERM (Linux).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import fields, replace
from types import FrameType

from sidecar.settings import Settings, env_of

log = logging.getLogger("sidecar.workers")
RESTART_DELAY_S = 1.0
STOP_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1


def worker_settings(settings: Settings, index: int, lease_key: str) -> Settings:
    """Rules 3 and 4: what worker `index` runs with."""
    host, port = settings.admin_host_port
    admin = f"[{host}]:{port + index}" if ":" in host else f"{host}:{port + index}"
    return replace(settings, worker_index=index, admin_addr=admin, lease_key=lease_key)


def worker_environment(settings: Settings) -> dict[str, str]:
    """Every setting as the QOS_* variable a worker reads back (flags are not passed on)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QOS_")}
    for f in fields(Settings):
        env["QOS_" + f.name.upper()] = env_of(getattr(settings, f.name))
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    """Starts the workers, restarts one that exits, and stops them all on request."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.lease_key = settings.lease_key or secrets.token_hex(32)
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.stopping_since: float | None = None

    def spawn(self, index: int) -> None:
        env = worker_environment(worker_settings(self.settings, index, self.lease_key))
        child = subprocess.Popen(
            [sys.executable, "-m", "sidecar.cli", "serve"], env=env, preexec_fn=_die_with_parent
        )
        self.children[index] = child
        log.info("worker %d started (pid %d)", index, child.pid)

    def signal_all(self, sig: int) -> None:
        for child in self.children.values():
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(sig)

    def on_stop(self, signum: int, _frame: FrameType | None) -> None:
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()
        self.signal_all(signal.SIGTERM)

    def on_reload(self, signum: int, _frame: FrameType | None) -> None:
        self.signal_all(signal.SIGHUP)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_stop)
        signal.signal(signal.SIGINT, self.on_stop)
        signal.signal(signal.SIGHUP, self.on_reload)
        for index in range(self.settings.workers):
            self.spawn(index)
        while self.children:
            time.sleep(0.2)
            since = self.stopping_since
            if since is not None and time.monotonic() - since > STOP_TIMEOUT_S:
                self.signal_all(signal.SIGKILL)
            for index, child in list(self.children.items()):
                code = child.poll()
                if code is None:
                    continue
                del self.children[index]
                if self.stopping_since is None:
                    log.error("worker %d exited with %s; starting it again", index, code)
                    time.sleep(RESTART_DELAY_S)
                    if self.stopping_since is None:
                        self.spawn(index)
        return 0


def run_workers(settings: Settings) -> int:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return Supervisor(settings).run()
