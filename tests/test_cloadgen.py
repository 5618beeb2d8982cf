"""The compiled load generator counts what it gets and times from the schedule.

Against a tiny threaded HTTP/1.1 server in this process (no stack): closed loop, every
response the server sent is counted, no more; open loop, a server stall shows in the
latencies of the requests it delayed (coordinated omission corrected), which a generator that
timed from the actual send would hide; and a generator behind its schedule waits for an
answer instead of spinning, so it does not take the CPU of the target it measures.
"""

from __future__ import annotations

import resource
import shutil
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from benchmarks import cloadgen

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


class TinyServer:
    """HTTP/1.1 keep-alive; answers each request with 200 ``{}``; the first request waits
    ``stall_s`` before its answer, every request ``delay_s``."""

    def __init__(self, stall_s: float = 0.0, delay_s: float = 0.0) -> None:
        self.stall_s = stall_s
        self.delay_s = delay_s
        self.answered = 0
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while data := conn.recv(65536):
                buf += data
                while b"\r\n\r\n" in buf:
                    head, _, rest = buf.partition(b"\r\n\r\n")
                    length = next(
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    )
                    if len(rest) < length:
                        break
                    buf = rest[length:]
                    with self.lock:
                        first = self.answered == 0
                        self.answered += 1
                    if first and self.stall_s:
                        time.sleep(self.stall_s)
                    time.sleep(self.delay_s)
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")


@pytest.fixture
def server() -> Iterator[TinyServer]:
    tiny = TinyServer()
    yield tiny
    tiny.sock.close()


def target(port: int) -> cloadgen.Target:
    return cloadgen.Target(port, "/v2/models/m/infer", {"x-api-key": "k"}, b'{"inputs":[]}')


def test_closed_loop_counts_every_answer_and_only_those(server: TinyServer) -> None:
    result = cloadgen.run(target(server.port), duration_s=0.5, connections=4)
    assert result["errors"] == 0
    assert result["completed"] > 100
    assert result["completed"] == server.answered
    assert result["status"] == {"200": server.answered}
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]


def test_open_loop_times_delayed_requests_from_their_scheduled_send() -> None:
    stalled = TinyServer(stall_s=0.3)
    try:
        result = cloadgen.run(target(stalled.port), duration_s=1.0, rate=200, connections=1)
    finally:
        stalled.sock.close()
    # About 200 requests were scheduled and all were answered.
    assert 180 <= result["completed"] <= 201, result
    # The 300 ms stall held back about 60 of them: their latency counts the wait. Timed from
    # the actual send, p90 would be a fraction of a millisecond.
    assert result["sent_late"] >= 40, result
    assert result["latency_ms"]["p90"] >= 50, result
    assert result["latency_ms"]["max"] >= 250, result


def test_open_loop_behind_its_schedule_waits_for_answers_without_spinning() -> None:
    # Two connections to a server that takes 20 ms an answer carry at most 100 req/s: at 400
    # req/s every request is due before a connection is free. A generator that then re-armed
    # its timer in the past woke at once, again and again, and spun a whole core away from
    # the target (measured: a sidecar at half its maximum went from 4 ms to 460 ms at p50).
    slow = TinyServer(delay_s=0.02)
    cloadgen.build()  # the compiler's CPU is not the generator's
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        result = cloadgen.run(target(slow.port), duration_s=1.0, rate=400, connections=2)
    finally:
        slow.sock.close()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert 60 <= result["completed"] <= 110, result
    assert result["sent_late"] >= 50, result
    # Waiting on its sockets, the generator needs well under a tenth of a core for 100 answers;
    # spinning, it takes the whole second and more.
    assert cpu_s < 0.25, f"the generator used {cpu_s:.2f} s of CPU in a 1 s run"
