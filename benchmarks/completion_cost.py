"""What one access-log completion costs the sidecar, in process: ``python -m
benchmarks.completion_cost [--entries N] [--per-message K] [--repeats R]``.

Every admitted request ends with an entry on Envoy's access-log stream, and the sidecar
verifies its lease, records the tenant's experience and usage, and releases the lease. The
overhead benchmark sees that cost only mixed with the decision's, Envoy's and the load
generator's on two shared cores. Here the servicer is fed entries straight from memory: the
overhead benchmark's policy (one tenant with a concurrency limit, so every entry releases a
lease), the memory store (no network), `N` leases signed with the process's key, `K` entries
per stream message as Envoy batches them. The leases were never taken, so each release finds
its lease gone (`already_released`): the same store call and bookkeeping as a real one, less
the removal from the tenant's set. Printed: CPU microseconds per entry (process time,
so a busy neighbour shows less than in wall time) for each of `R` runs, and their median.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvloop
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf import struct_pb2
from prometheus_client import CollectorRegistry

from benchmarks.overhead_stack import TENANT, write_policy
from sidecar.core.lease import format_lease, sign_lease
from sidecar.core.types import LeaseRef
from sidecar.envoy.access_log import AccessLogServicer
from sidecar.envoy.common import LEASE_KEY
from sidecar.metrics import Metrics
from sidecar.policy.loader import load_policy
from sidecar.service import AdmissionService
from sidecar.state import MemoryQuotaStore

KEY = b"completion-cost-benchmark-key-32b"
PATH = "/v2/models/bench/infer"


def _entry(signed: str) -> Any:
    fields = struct_pb2.Struct()
    fields.update({LEASE_KEY: signed})
    metadata = base_pb2.Metadata()
    metadata.filter_metadata["envoy.filters.http.ext_authz"].CopyFrom(fields)
    return accesslog_pb2.HTTPAccessLogEntry(
        common_properties=accesslog_pb2.AccessLogCommon(metadata=metadata),
        request=accesslog_pb2.HTTPRequestProperties(path=PATH),
    )


async def _one_run(policy_path: Path, entries: int, per_message: int) -> float:
    """CPU microseconds per entry of one stream of `entries` completions."""
    service = AdmissionService(
        load_policy([policy_path]), MemoryQuotaStore(), Metrics(CollectorRegistry())
    )
    servicer = AccessLogServicer(service, lease_key=KEY)
    signed = [
        sign_lease(format_lease(LeaseRef(TENANT, "standard", f"lease-{i}")), KEY)
        for i in range(entries)
    ]
    messages = [
        als_pb2.StreamAccessLogsMessage(
            http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(
                log_entry=[_entry(s) for s in signed[i : i + per_message]]
            )
        )
        for i in range(0, entries, per_message)
    ]

    async def stream() -> AsyncIterator[Any]:
        for message in messages:
            yield message
            await asyncio.sleep(0)  # as from the wire: the loop turns between messages

    started = time.process_time()
    await servicer.StreamAccessLogs(stream(), None)
    spent = time.process_time() - started
    released = service.metrics.registry.get_sample_value(
        "qos_completions_total", {"result": "already_released"}
    )
    if released != entries:  # each lease was never taken: released "already", once each
        raise RuntimeError(f"{released} of {entries} entries completed")
    return spent / entries * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--per-message", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        policy = write_policy(Path(directory))
        runs = [
            uvloop.run(_one_run(policy, args.entries, args.per_message))
            for _ in range(args.repeats)
        ]
    print(
        f"access-log completion: {statistics.median(runs):.1f} us of CPU per entry (median of"
        f" {len(runs)}; runs {', '.join(f'{r:.1f}' for r in runs)}), {args.entries} entries,"
        f" {args.per_message} per message, memory store"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
