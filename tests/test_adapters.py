"""The Envoy adapters in process, against the in-memory store: wire format in, wire out.

Both ext_authz APIs must give the same decisions; the access-log stream must release the
lease named in each entry. The real-Envoy versions of these checks are in test_e2e_stack.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import ClientSession
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.protobuf import struct_pb2
from prometheus_client import CollectorRegistry

from sidecar.core.lease import format_lease, sign_lease, verify_lease
from sidecar.core.types import LeaseRef, RequestAttributes
from sidecar.envoy.access_log import AccessLogServicer
from sidecar.envoy.authz_grpc import AuthorizationServicer
from sidecar.envoy.authz_http import AuthzHttp
from sidecar.envoy.common import HEALTH_PATH, HEALTH_STATUS, release_if_undelivered
from sidecar.errors import StateUnavailable
from sidecar.metrics import Metrics
from sidecar.service import AdmissionService
from sidecar.state.memory import MemoryQuotaStore
from tests.core_fixtures import make_policy

INFER = "/v2/models/simgpu/infer"
KEY = b"test lease key"


def make_service(store: Any = None) -> AdmissionService:
    return AdmissionService(
        make_policy(), store or MemoryQuotaStore(), Metrics(CollectorRegistry())
    )


def sample(service: AdmissionService, name: str, **labels: str) -> float:
    if name == "qos_decisions_total":
        labels.setdefault("shadow", "false")  # the enforced decisions
    return service.metrics.registry.get_sample_value(name, labels) or 0.0


async def with_http(
    service: AdmissionService, body: Callable[[ClientSession], Awaitable[None]]
) -> None:
    """The ext_authz HTTP listener on a free port, and a client whose paths are relative."""
    listener = AuthzHttp(service, lease_key=KEY).listener()
    await listener.start_tcp("127.0.0.1", 0, reuse_port=False)
    try:
        async with ClientSession(base_url=f"http://127.0.0.1:{listener.port}") as client:
            await body(client)
    finally:
        await listener.close()


async def with_grpc(service: AdmissionService, body: Callable[[Any, Any], Awaitable[None]]) -> None:
    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
        AuthorizationServicer(service, lease_key=KEY), server
    )
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(
        AccessLogServicer(service, lease_key=KEY), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await body(
                external_auth_pb2_grpc.AuthorizationStub(channel),
                als_pb2_grpc.AccessLogServiceStub(channel),
            )
    finally:
        await server.stop(None)


def check_request(headers: dict[str, str], path: str = INFER, principal: str = "") -> Any:
    ctx = attribute_context_pb2.AttributeContext
    return external_auth_pb2.CheckRequest(
        attributes=ctx(
            source=ctx.Peer(principal=principal),
            request=ctx.Request(http=ctx.HttpRequest(method="POST", path=path, headers=headers)),
        )
    )


def test_http_admit_sets_decision_headers_and_shed_has_json_body() -> None:
    service = make_service()

    async def body(client: ClientSession) -> None:
        ok = await client.post("/authz" + INFER, headers={"x-api-key": "k-analytics"})
        assert ok.status == 200
        assert ok.headers["x-qos-tenant"] == "analytics"
        assert ok.headers["x-qos-granted-class"] == "batch"
        assert ok.headers["x-qos-priority"] == "3"
        # Signed, for ext_authz's dynamic_metadata_from_headers (not copied upstream).
        assert verify_lease(ok.headers["x-qos-lease"], KEY) is not None
        for _ in range(4):  # analytics: burst 5
            assert (
                await client.post("/authz" + INFER, headers={"x-api-key": "k-analytics"})
            ).status == 200
        shed = await client.post("/authz" + INFER, headers={"x-api-key": "k-analytics"})
        assert shed.status == 429
        assert shed.headers["retry-after"] == "1"
        refusal = await shed.json()
        assert refusal["reason"] == "over_rate"
        assert "trace" not in refusal  # QOS_EXPLAIN_REFUSALS is off by default
        service.explain_refusals = True
        shed = await client.post("/authz" + INFER, headers={"x-api-key": "k-analytics"})
        steps = (await shed.json())["trace"]
        assert "tenant 'analytics'" in steps[0] and steps[-1] == "shed 429 over_rate", steps

    asyncio.run(with_http(service, body))
    assert (
        sample(
            service,
            "qos_decisions_total",
            tenant="analytics",
            **{"class": "batch"},
            outcome="admit",
            reason="admitted",
        )
        == 5
    )


def acquire_raising(exc: Exception) -> MemoryQuotaStore:
    """A memory store whose every acquire raises `exc`."""

    class Failing(MemoryQuotaStore):
        async def acquire(self, check: Any) -> Any:
            raise exc

    return Failing()


def test_http_overload_travels_as_430_with_x_qos_status_503() -> None:
    service = make_service(acquire_raising(StateUnavailable("down")))

    async def body(client: ClientSession) -> None:
        closed = await client.post("/authz" + INFER, headers={"x-api-key": "k-analytics"})
        # Envoy turns a 5xx from an HTTP authz server into its own error; the shipped
        # config's local-reply mapper turns this back into 503.
        assert closed.status == 430
        assert closed.headers["x-qos-status"] == "503"
        assert (await closed.json())["reason"] == "state_unavailable"
        fail_open = await client.post("/authz" + INFER, headers={"x-api-key": "k-search"})
        assert fail_open.status == 200
        assert "x-qos-lease" not in fail_open.headers

    asyncio.run(with_http(service, body))
    assert sample(service, "qos_state_errors_total", operation="acquire") == 2


def test_http_health_check_is_answered_and_anything_unforeseen_is_a_json_500() -> None:
    service = make_service(acquire_raising(RuntimeError("a bug, not an outage")))

    async def body(client: ClientSession) -> None:
        for method in ("GET", "HEAD"):  # Envoy's health check (common.py, rule 6)
            assert (await client.request(method, HEALTH_PATH)).status == HEALTH_STATUS
        # Any other method on that path is a call Envoy did not write: 400, taking nothing.
        other = await client.post(HEALTH_PATH, headers={"x-api-key": "k-analytics"})
        assert other.status == 400
        assert (await other.json())["reason"] == "malformed"
        broken = await client.post("/authz" + INFER, headers={"x-api-key": "k-analytics"})
        assert broken.status == 500
        assert broken.content_type == "application/json"
        assert (await broken.json())["reason"] == "internal_error"

    asyncio.run(with_http(service, body))
    assert sample(service, "qos_adapter_errors_total", api="http") == 1


def test_http_path_prefix_and_principal_header() -> None:
    service = make_service()

    async def body(client: ClientSession) -> None:
        ok = await client.post(
            "/authz/v2/models/llm/infer",
            headers={"x-qos-peer-principal": "spiffe://test/analytics"},
        )
        assert ok.status == 200
        assert ok.headers["x-qos-tenant"] == "analytics"

    asyncio.run(with_http(service, body))


def test_grpc_and_http_give_the_same_decisions() -> None:
    cases = [
        {"x-api-key": "k-search", "x-qos-class": "interactive"},
        {"x-api-key": "k-search", "x-qos-class": "batch"},
        {"x-api-key": "k-analytics", "x-qos-class": "interactive"},
        {"x-api-key": "nope"},
        {},
        {"x-api-key": "k-search", "x-qos-class": "bad class"},
    ]
    http_seen: list[tuple[int, str | None, str | None]] = []
    grpc_seen: list[tuple[int, str | None, str | None]] = []

    async def http_body(client: ClientSession) -> None:
        for headers in cases:
            r = await client.post("/authz" + INFER, headers=headers)
            reason = (await r.json())["reason"] if r.status != 200 else None
            http_seen.append((r.status, r.headers.get("x-qos-granted-class"), reason))

    async def grpc_body(authz: Any, _: Any) -> None:
        for headers in cases:
            r = await authz.Check(check_request(headers))
            if r.HasField("ok_response"):
                got = {h.header.key: h.header.value for h in r.ok_response.headers}
                for h in r.ok_response.headers:
                    assert h.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
                grpc_seen.append((200, got.get("x-qos-granted-class"), None))
            else:
                assert r.status.code != 0
                grpc_seen.append(
                    (
                        r.denied_response.status.code,
                        None,
                        json.loads(r.denied_response.body)["reason"],
                    )
                )

    asyncio.run(with_http(make_service(), http_body))
    asyncio.run(with_grpc(make_service(), grpc_body))
    assert http_seen == grpc_seen
    assert [s[0] for s in http_seen] == [200, 200, 403, 401, 401, 400]


def test_grpc_malformed_check_request_is_400_and_counted() -> None:
    service = make_service()

    async def body(authz: Any, _: Any) -> None:
        r = await authz.Check(external_auth_pb2.CheckRequest())
        assert r.denied_response.status.code == 400
        assert json.loads(r.denied_response.body)["reason"] == "malformed"
        # A direct call with a request but no path and no headers: Envoy never sends one.
        for _ in range(3):
            r = await authz.Check(check_request({}, path=""))
            assert r.denied_response.status.code == 400
            assert not r.dynamic_metadata.fields

    asyncio.run(with_grpc(service, body))
    assert sample(service, "qos_malformed_requests_total", api="grpc") == 4


def test_http_call_without_the_authz_prefix_takes_no_lease() -> None:
    service = make_service()

    async def body(client: ClientSession) -> None:
        for path in ("/", "/v2/models/simgpu/infer", "/authz"):
            refused = await client.post(path)
            assert refused.status == 400
            assert (await refused.json())["reason"] == "malformed"
            assert "x-qos-lease" not in refused.headers

    asyncio.run(with_http(service, body))
    assert sample(service, "qos_malformed_requests_total", api="http") == 3


async def _raw_http(service: AdmissionService, head: bytes) -> tuple[int, dict[str, str], Any]:
    """One request written as raw bytes to the HTTP listener: its status, headers and JSON."""
    listener = AuthzHttp(service, lease_key=KEY).listener()
    await listener.start_tcp("127.0.0.1", 0, reuse_port=False)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(head + b"\r\n\r\n")
        answer = await reader.readuntil(b"\r\n\r\n")
        lines = answer.decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:] if line)
        body = await reader.readexactly(int(headers["content-length"]))
        writer.close()
        return int(lines[0].split()[1]), headers, json.loads(body) if body else None
    finally:
        await listener.close()


def test_http_header_that_is_not_utf8_is_a_400_naming_it() -> None:
    service = make_service()
    head = b"POST /authz" + INFER.encode() + b" HTTP/1.1\r\nx-api-key: k-\xff\r\nx-b: \xc3\xa9"
    status, _, body = asyncio.run(_raw_http(service, head))
    assert status == 400
    assert body["reason"] == "malformed"
    (refused,) = service.refusals.read()  # what the admin's recent refusals show
    assert refused["trace"][0] == "header 'x-api-key' is not UTF-8"
    # UTF-8 beyond ASCII is text: read, not refused (here the tenant's key, then an unknown).
    status, headers, _ = asyncio.run(_raw_http(service, head.replace(b"\xff", b"\xc3\xa9")))
    assert status != 400 and "x-qos-lease" not in headers


def test_http_repeated_header_is_read_joined_with_a_comma() -> None:
    service = make_service()
    once = b"POST /authz" + INFER.encode() + b" HTTP/1.1\r\nx-api-key: k-analytics"
    status, headers, _ = asyncio.run(_raw_http(service, once))
    assert status == 200 and headers["x-qos-tenant"] == "analytics"
    # Twice: "k-analytics,k-analytics", which is nobody's key.
    status, headers, _ = asyncio.run(_raw_http(service, once + b"\r\nx-api-key: k-analytics"))
    assert status != 200 and "x-qos-lease" not in headers


def test_access_log_stream_releases_leases() -> None:
    service = make_service()

    async def body(authz: Any, als: Any) -> None:
        leases = []
        for _ in range(2):  # search, interactive: max 2 per class
            r = await authz.Check(
                check_request({"x-api-key": "k-search", "x-qos-class": "interactive"})
            )
            # The lease is in the dynamic metadata, signed, and in no header.
            assert "x-qos-lease" not in {h.header.key for h in r.ok_response.headers}
            leases.append(r.dynamic_metadata.fields["x-qos-lease"].string_value)
        full = await authz.Check(
            check_request({"x-api-key": "k-search", "x-qos-class": "interactive"})
        )
        assert json.loads(full.denied_response.body)["reason"] == "over_class_concurrency"

        def entry(lease: str | None, namespace: str = "envoy.filters.http.ext_authz") -> Any:
            metadata = base_pb2.Metadata()
            if lease:
                fields = struct_pb2.Struct()
                fields.update({"x-qos-lease": lease})
                metadata.filter_metadata[namespace].CopyFrom(fields)
            return accesslog_pb2.HTTPAccessLogEntry(
                common_properties=accesslog_pb2.AccessLogCommon(metadata=metadata),
                # A lease in a request header is the client's: never read.
                request=accesslog_pb2.HTTPRequestProperties(
                    request_headers={"x-qos-lease": leases[0]}
                ),
            )

        unsigned = format_lease(LeaseRef("search", "interactive", "x"))
        other_key = sign_lease(unsigned, b"another deployment")

        messages = [
            als_pb2.StreamAccessLogsMessage(
                http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(
                    log_entry=[
                        entry(leases[0]),
                        entry(None),
                        entry(unsigned),
                        entry(other_key),
                        entry("s1.forged." + unsigned),
                    ]
                )
            ),
            als_pb2.StreamAccessLogsMessage(
                http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(
                    log_entry=[entry(leases[1], "qos.sidecar"), entry(leases[1])]
                )
            ),
            # Only entries without a lease (leased mode's slices): counted, nothing to free.
            als_pb2.StreamAccessLogsMessage(
                http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(
                    log_entry=[entry(None), entry(None)]
                )
            ),
        ]

        async def stream() -> Any:
            for m in messages:
                yield m

        await als.StreamAccessLogs(stream())
        again = await authz.Check(
            check_request({"x-api-key": "k-search", "x-qos-class": "interactive"})
        )
        assert again.HasField("ok_response")

    asyncio.run(with_grpc(service, body))
    for result, count in (
        ("released", 2),
        ("no_lease", 3),
        ("bad_lease", 3),
        ("already_released", 1),
    ):
        assert sample(service, "qos_completions_total", result=result) == count, result


def test_an_admit_without_a_lease_is_recorded_as_one_when_the_sidecar_granted_it() -> None:
    """Leased mode's admits carry no lease (a policy that counts no model). Their access-log
    entries still carry the grant headers the sidecar set upstream (Envoy strips clients'),
    so their tenant's experience and their model's drain are recorded; an entry without
    them (a refusal) records neither."""
    service = make_service()

    def entry(headers: dict[str, str]) -> Any:
        duration = accesslog_pb2.AccessLogCommon().time_to_last_downstream_tx_byte
        duration.FromMilliseconds(40)
        return accesslog_pb2.HTTPAccessLogEntry(
            common_properties=accesslog_pb2.AccessLogCommon(
                time_to_last_downstream_tx_byte=duration
            ),
            request=accesslog_pb2.HTTPRequestProperties(path=INFER, request_headers=headers),
            response=accesslog_pb2.HTTPResponseProperties(response_code={"value": 200}),
        )

    granted = {"x-qos-tenant": "analytics", "x-qos-granted-class": "batch"}
    servicer = AccessLogServicer(service, lease_key=KEY)
    for headers in (granted, granted, {"x-qos-tenant": "analytics"}, {}):
        servicer._complete_unleased(entry(headers))
    slo = sample(service, "qos_slo_requests_total", tenant="analytics", result="met", **BATCH)
    assert slo == 2  # the two granted ones, within batch's objective
    assert sample(service, "qos_completions_total", result="no_lease") == 4
    assert sample(service, "qos_model_drain_rate", model="simgpu") > 0
    other = make_service()  # the same entries, none granted: nothing drained
    for headers in ({"x-qos-tenant": "analytics"}, {}):
        AccessLogServicer(other, lease_key=KEY)._complete_unleased(entry(headers))
    assert sample(other, "qos_model_drain_rate", model="simgpu") == 0


BATCH = {"class": "batch"}


def test_an_undelivered_admit_gives_back_its_bucket_charge_and_its_lease() -> None:
    """Envoy never used the admit (it timed the authz call out, or the client left): the
    adapter's give-back returns the tokens it charged, not only its slot."""
    service = make_service()
    analytics = {"x-api-key": "k-analytics"}  # a requests bucket of burst 5

    async def body() -> None:
        attrs = attributes(analytics)
        admits = [await service.check(attrs, "test") for _ in range(5)]
        assert all(d.admitted for d in admits)
        assert (await service.check(attrs, "test")).reason.value == "over_rate"
        await release_if_undelivered(service, admits[0], delivered=False)
        await release_if_undelivered(service, admits[1], delivered=True)  # used: kept
        assert await service.store.in_flight("analytics", None) == 4
        assert (await service.check(attrs, "test")).admitted  # one token came back
        assert (await service.check(attrs, "test")).reason.value == "over_rate"

    asyncio.run(body())


def attributes(headers: dict[str, str]) -> RequestAttributes:
    return RequestAttributes("POST", INFER, headers)
