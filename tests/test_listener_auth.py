"""The Envoy-facing listeners in process, as `sidecar.app.start` wires them: Unix sockets by
default, and with QOS_AUTH_TOKEN set every call without the token is refused before it is read
(ext_authz HTTP 401 JSON; Check, Process, StreamAccessLogs UNAUTHENTICATED), counted, and takes
or releases nothing (sidecar.envoy.common, rule 5). The same over real Envoy: test_e2e_transport.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2, external_processor_pb2_grpc
from google.protobuf import struct_pb2
from prometheus_client import CollectorRegistry

from sidecar.app import Sidecar, start
from sidecar.envoy.common import (
    AUTH_HEADER,
    GRPC_HEALTH_METHOD,
    HEALTH_PATH,
    HEALTH_STATUS,
    TokenCheck,
)
from sidecar.metrics import Metrics
from sidecar.settings import Settings
from tests.test_adapters import check_request

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "t0ken-for-envoy"
SEARCH = {"x-api-key": "demo-key-search", "x-qos-class": "interactive"}
WITH_TOKEN = ((AUTH_HEADER, TOKEN),)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Short: a socket path must fit in 107 bytes, and pytest's tmp_path may not.
    with tempfile.TemporaryDirectory(prefix="qos-", dir="/tmp") as path:
        yield Path(path)


def settings_for(socket_dir: Path, token: str = TOKEN) -> Settings:
    return Settings(
        authz_http_addr=f"unix:{socket_dir}/authz.sock",
        grpc_addr=f"unix:{socket_dir}/grpc.sock",
        admin_addr="127.0.0.1:0",
        policy_path=(str(ROOT / "policies"),),
        lease_key="k",
        auth_token=token,
    )


def sample(sidecar: Sidecar, name: str, **labels: str) -> float:
    if name == "qos_decisions_total":
        labels.setdefault("shadow", "false")  # the enforced decisions
    return sidecar.metrics.registry.get_sample_value(name, labels) or 0.0


async def running(settings: Settings) -> Sidecar:
    return await start(settings, CollectorRegistry())


async def authz_http(socket_dir: Path, headers: dict[str, str]) -> tuple[int, Any, Any]:
    connector = aiohttp.UnixConnector(path=str(socket_dir / "authz.sock"))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post("http://sidecar/authz/v2/models/simgpu/infer", headers=headers) as r,
    ):
        return r.status, r.headers, await r.read()


def access_log_of(lease: str) -> Any:
    fields = struct_pb2.Struct()
    fields.update({"x-qos-lease": lease})
    metadata = base_pb2.Metadata()
    metadata.filter_metadata["envoy.filters.http.ext_authz"].CopyFrom(fields)
    entry = accesslog_pb2.HTTPAccessLogEntry(
        common_properties=accesslog_pb2.AccessLogCommon(metadata=metadata)
    )
    return als_pb2.StreamAccessLogsMessage(
        http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(log_entry=[entry])
    )


async def one(message: Any) -> AsyncIterator[Any]:
    yield message


def test_listeners_are_unix_sockets_envoy_can_share_and_are_removed_on_stop(
    socket_dir: Path,
) -> None:
    async def body() -> None:
        sidecar = await running(settings_for(socket_dir, token=""))
        try:
            for name in ("authz.sock", "grpc.sock"):
                mode = os.stat(socket_dir / name).st_mode
                assert stat.S_ISSOCK(mode)
                # Group may connect (Envoy shares a group with the sidecar), others may not.
                assert stat.S_IMODE(mode) == 0o660
            status, _, _ = await authz_http(socket_dir, SEARCH)
            assert status == 200  # no token configured: no check
        finally:
            await sidecar.stop()
        assert not (socket_dir / "authz.sock").exists()
        assert not (socket_dir / "grpc.sock").exists()

    asyncio.run(body())


def test_http_without_the_token_is_401_json_and_takes_nothing(socket_dir: Path) -> None:
    async def body() -> None:
        sidecar = await running(settings_for(socket_dir))
        try:
            for headers in (SEARCH, {**SEARCH, AUTH_HEADER: "wrong"}, {**SEARCH, AUTH_HEADER: ""}):
                status, response_headers, raw = await authz_http(socket_dir, headers)
                assert status == 401
                assert response_headers["content-type"] == "application/json"
                assert json.loads(raw)["error"] == "unauthenticated"
                assert "x-qos-lease" not in response_headers
            assert await sidecar.service.store.in_flight("search", None) == 0
            assert sample(sidecar, "qos_unauthenticated_calls_total", api="http") == 3
            status, response_headers, _ = await authz_http(
                socket_dir, {**SEARCH, AUTH_HEADER: TOKEN}
            )
            assert status == 200
            assert "x-qos-lease" in response_headers
            assert await sidecar.service.store.in_flight("search", None) == 1
        finally:
            await sidecar.stop()

    asyncio.run(body())


def test_grpc_calls_without_the_token_are_unauthenticated_and_take_nothing(
    socket_dir: Path,
) -> None:
    async def body() -> None:
        sidecar = await running(settings_for(socket_dir))
        try:
            async with grpc.aio.insecure_channel(f"unix:{socket_dir}/grpc.sock") as channel:
                authz = external_auth_pb2_grpc.AuthorizationStub(channel)
                als = als_pb2_grpc.AccessLogServiceStub(channel)
                proc = external_processor_pb2_grpc.ExternalProcessorStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await authz.Check(check_request(SEARCH))
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert await sidecar.service.store.in_flight("search", None) == 0

                admitted = await authz.Check(check_request(SEARCH), metadata=WITH_TOKEN)
                lease = admitted.dynamic_metadata.fields["x-qos-lease"].string_value
                assert lease and await sidecar.service.store.in_flight("search", None) == 1

                # A completion without the token releases nothing, even with a good lease.
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await als.StreamAccessLogs(one(access_log_of(lease)))
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert await sidecar.service.store.in_flight("search", None) == 1

                headers = external_processor_pb2.ProcessingRequest()
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    async for _ in proc.Process(one(headers), metadata=(("x-qos-auth", "no"),)):
                        pass
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

                await als.StreamAccessLogs(one(access_log_of(lease)), metadata=WITH_TOKEN)
                assert await sidecar.service.store.in_flight("search", None) == 0
        finally:
            await sidecar.stop()
        for api in ("grpc", "access_log", "ext_proc"):
            assert sample(sidecar, "qos_unauthenticated_calls_total", api=api) == 1
        assert sample(sidecar, "qos_decisions_total", tenant="search", **{"class": "interactive"},
                      outcome="admit", reason="admitted") == 1  # fmt: skip

    asyncio.run(body())


def test_token_check_alone() -> None:
    metrics = Metrics(CollectorRegistry())
    off = TokenCheck("", metrics.unauthenticated_calls.labels)
    assert off.admits(None, "http") and off.admits("anything", "http")
    check = TokenCheck("sesame", metrics.unauthenticated_calls.labels)
    assert check.admits("sesame", "grpc") and check.admits(b"sesame", "grpc")
    for wrong in (None, "", "sesam", "sesame ", "Sesame", "sésame"):
        assert not check.admits(wrong, "grpc")
    assert (
        metrics.registry.get_sample_value("qos_unauthenticated_calls_total", {"api": "grpc"}) == 6
    )


def test_health_answers_need_no_token_and_decide_nothing(socket_dir: Path) -> None:
    """Rule 6: Envoy's health checks carry no token (the shipped clusters send none); they are
    answered anyway, and neither is a check: no decision, no lease, no refusal counted."""

    async def body() -> None:
        sidecar = await running(settings_for(socket_dir))
        try:
            connector = aiohttp.UnixConnector(path=str(socket_dir / "authz.sock"))
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.get(f"http://sidecar{HEALTH_PATH}") as r,
            ):
                assert r.status == HEALTH_STATUS == 204  # not 200: never an ext_authz allow
                assert "x-qos-lease" not in r.headers
            async with grpc.aio.insecure_channel(f"unix:{socket_dir}/grpc.sock") as channel:
                health = channel.unary_unary(GRPC_HEALTH_METHOD)
                # grpc.health.v1.HealthCheckResponse{status: SERVING} on the wire.
                assert await health(b"") == b"\x08\x01"
        finally:
            await sidecar.stop()
        assert sample(sidecar, "qos_unauthenticated_calls_total", api="http") == 0
        assert sample(sidecar, "qos_unauthenticated_calls_total", api="other") == 0
        decided = [
            sample.value
            for family in sidecar.metrics.registry.collect()
            if family.name == "qos_decisions"
            for sample in family.samples
            if sample.name == "qos_decisions_total"
        ]
        assert sum(decided) == 0

    asyncio.run(body())
