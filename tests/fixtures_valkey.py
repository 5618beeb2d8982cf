"""A real Valkey server for the state tests: the harness's ValkeyProcess, plus pause/resume.

`pause()`/`resume()` stop and continue the process (SIGSTOP/SIGCONT): a server that accepts
connections but never answers, the failure the store's timeout exists for.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from pathlib import Path

from devstack.procs import ValkeyProcess, free_port

__all__ = ["ValkeyServer", "free_port"]


class ValkeyServer(ValkeyProcess):
    """`with ValkeyServer() as server:` runs a throwaway Valkey at `server.url`."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="qos-valkey-")
        super().__init__(Path(self._tmp.name))

    def pause(self) -> None:
        assert self.pid is not None
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.pid is not None
        os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> int | None:
        """Stop and reap; safe twice and on a paused server (SIGCONT first: a stopped
        process cannot act on SIGTERM)."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
        code = super().stop()
        self._tmp.cleanup()
        return code
