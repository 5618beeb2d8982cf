"""What one request costs the sidecar's CPU, in process, without the wire: ``python -m
benchmarks.request_cost [--requests N] [--per-message K] [--repeats R] [--store
memory|valkey] [--leased] [--body-bytes B]``.

The overhead benchmark sees the sidecar's cost only mixed with Envoy's, Valkey's and the load
generator's on two shared cores, where a change of a few microseconds is lost in the host's
drift. Here each part of an ext_authz HTTP request's life is fed from memory, with the overhead
benchmark's policy (one tenant with a concurrency limit, so every admit takes a lease) and the
memory store (no network):
- decision: the head Envoy sends (`POST /authz/...` with the client's allowed headers) parsed
  by the HTTP wire, answered by the ext_authz adapter (identity, plan, quota, lease, signed
  answer) and encoded, one request after the other;
  With `--store valkey`, a Valkey server on loopback holds the state, as in production, and
  what is measured is the sidecar's side of each store call (its client, not the server's
  CPU, and one call per decision: nothing here is batched);
- with `--leased`, configuration DL's policy: the bucket in leased mode and no concurrency
  limit, so each decision spends from a slice and its access-log entry carries no lease;
- completion: each admitted request's access-log entry (its signed lease in the dynamic
  metadata, `K` entries per stream message as Envoy batches them) through the access-log
  servicer: lease checked, experience and usage recorded, lease released.
- with `--body-bytes B`, also an ext_proc request body of B bytes (configuration H's JSON
  body): its `ProcessingRequest` read as the sidecar's own gRPC server reads it (the
  method table's parse), the priority written into it (`core.priority.rewrite_body`), and the
  answer put in the parts the server sends (`SplitBody`), all but the HTTP/2 framing.
Printed: CPU microseconds per request of each part (process time, so a busy neighbour shows
less than in wall time) for each of `R` runs, and their medians.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import redis
import uvloop
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2
from prometheus_client import CollectorRegistry

from benchmarks.overhead_stack import API_KEY, BIG_BODY_BYTES, MODEL, request_body, write_policy
from devstack.procs import ValkeyProcess
from sidecar.app import make_store
from sidecar.core.decide import HEADER_LEASE
from sidecar.core.priority import RewriteResult, rewrite_body
from sidecar.envoy.access_log import AccessLogServicer
from sidecar.envoy.authz_http import AuthzHttp
from sidecar.envoy.common import LEASE_KEY
from sidecar.envoy.ext_proc_answers import body_response_for
from sidecar.envoy.grpc_methods import envoy_methods
from sidecar.envoy.http_wire import encode_response, parse_head
from sidecar.metrics import Metrics
from sidecar.policy.loader import load_policy
from sidecar.service import AdmissionService
from sidecar.settings import load_settings

KEY = b"request-cost-benchmark-key-of-32b"
PATH = f"/v2/models/{MODEL}/infer"
EXT_PROC_PATH = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


class _OpenTransport:
    """The one thing the adapter asks of its transport: whether Envoy hung up."""

    def is_closing(self) -> bool:
        return False


def _head(request_id: str) -> bytes:
    """An ext_authz HTTP check as Envoy writes it (shipped allowed_headers, path_prefix)."""
    return (
        f"POST /authz{PATH} HTTP/1.1\r\nhost: qos-sidecar\r\ncontent-length: 0\r\n"
        f"x-api-key: {API_KEY}\r\ncontent-type: application/json\r\n"
        f"x-request-id: {request_id}\r\nx-envoy-expected-rq-timeout-ms: 30000\r\n"
        f"x-forwarded-proto: http\r\nx-envoy-internal: true"
    ).encode()


def _entry(signed: str) -> Any:
    fields = struct_pb2.Struct()
    fields.update({LEASE_KEY: signed})
    metadata = base_pb2.Metadata()
    metadata.filter_metadata["envoy.filters.http.ext_authz"].CopyFrom(fields)
    return accesslog_pb2.HTTPAccessLogEntry(
        common_properties=accesslog_pb2.AccessLogCommon(metadata=metadata),
        request=accesslog_pb2.HTTPRequestProperties(path=PATH),
    )


async def _one_run(
    policy_path: Path, requests: int, per_message: int, redis_url: str | None, leased: bool = False
) -> tuple[float, float]:
    """CPU microseconds per request of `requests` decisions, then of their completions."""
    metrics = Metrics(CollectorRegistry())
    settings = load_settings(environ={"QOS_REDIS_URL": redis_url} if redis_url else {})
    store = make_store(settings, metrics)  # as the sidecar builds it
    service = AdmissionService(load_policy([policy_path]), store, metrics)
    adapter = AuthzHttp(service, lease_key=KEY)
    transport: Any = _OpenTransport()
    heads = [_head(str(uuid.uuid4())) for _ in range(requests)]
    answers = []
    started = time.process_time()
    for head in heads:
        answer = await adapter.answer(parse_head(head), transport)
        encode_response(answer, close=False)
        answers.append(answer)
    decided = time.process_time() - started
    # Leased: spent from slices, no lease to release (an entry each all the same).
    refused = sum(1 for answer in answers if answer.status != 200)
    leases = [dict(answer.headers).get(HEADER_LEASE, "") for answer in answers]
    if refused or not (leased or all(leases)):
        missing = refused or leases.count("")
        raise RuntimeError(f"{missing} of {requests} requests were not admitted")
    messages = [
        als_pb2.StreamAccessLogsMessage(
            http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(
                log_entry=[_entry(s) for s in leases[i : i + per_message]]
            )
        )
        for i in range(0, requests, per_message)
    ]

    async def stream() -> AsyncIterator[Any]:
        for message in messages:
            yield message
            await asyncio.sleep(0)  # as from the wire: the loop turns between messages

    started = time.process_time()
    await AccessLogServicer(service, lease_key=KEY).StreamAccessLogs(stream(), None)
    completed = time.process_time() - started
    result = "no_lease" if leased else "released"
    released = service.metrics.registry.get_sample_value(
        "qos_completions_total", {"result": result}
    )
    if released != requests:
        raise RuntimeError(f"{released} of {requests} completions {result}")
    await store.close()
    return decided / requests * 1e6, completed / requests * 1e6


def _body_run(service: AdmissionService, size: int, requests: int) -> float:
    """CPU microseconds per ext_proc request body of `size` bytes (module docstring)."""
    method = envoy_methods(service, KEY)[EXT_PROC_PATH]
    body = request_body(size)
    message = pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))
    data = message.SerializeToString()
    headers = {"content-type": "application/json"}
    started = time.process_time()
    for _ in range(requests):
        read = method.parse(data).request_body
        rewrite = rewrite_body(PATH, headers, read.body, 2)
        if rewrite.result is not RewriteResult.REWRITTEN:
            raise RuntimeError(f"the body was not rewritten: {rewrite.result.value}")
        method.serialize(body_response_for(rewrite, split=True))
    return (time.process_time() - started) / requests * 1e6


def _body_runs(policy: Path, size: int, requests: int, repeats: int) -> list[float]:
    metrics = Metrics(CollectorRegistry())
    service = AdmissionService(
        load_policy([policy]), make_store(load_settings(environ={}), metrics), metrics
    )
    return [_body_run(service, size, requests) for _ in range(repeats)]


def _summary(name: str, runs: list[float]) -> str:
    listed = ", ".join(f"{r:.1f}" for r in runs)
    return f"{name}: {statistics.median(runs):.1f} us of CPU per request (runs {listed})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--per-message", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--store", choices=("memory", "valkey"), default="memory")
    parser.add_argument(
        "--leased",
        action="store_true",
        help="the bucket in leased mode and no concurrency limit (configuration DL): "
        "decisions spend from slices, completions carry no lease",
    )
    parser.add_argument(
        "--body-bytes",
        type=int,
        default=0,
        help="also an ext_proc request body of this many bytes (configuration H: "
        f"{BIG_BODY_BYTES}); 1,000 of them a run",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory, contextlib.ExitStack() as stack:
        policy = write_policy(Path(directory), leased=args.leased)
        url = None
        if args.store == "valkey":
            url = stack.enter_context(ValkeyProcess(Path(directory) / "valkey")).url
        runs = []
        for _ in range(args.repeats):
            if url is not None:
                redis.Redis.from_url(url).flushall()  # each run from an empty store
            run = _one_run(policy, args.requests, args.per_message, url, args.leased)
            runs.append(uvloop.run(run))
        bodies = _body_runs(policy, args.body_bytes, 1000, args.repeats) if args.body_bytes else []
    mode = ", leased mode" if args.leased else ""
    print(
        f"{args.requests} requests, ext_authz HTTP, {args.store} store{mode},"
        f" medians of {len(runs)} runs"
    )
    print(_summary("decision", [d for d, _ in runs]))
    print(_summary(f"completion ({args.per_message} per message)", [c for _, c in runs]))
    if bodies:
        print(_summary(f"ext_proc request body of {args.body_bytes} bytes", bodies))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
