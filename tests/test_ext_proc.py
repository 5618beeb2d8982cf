"""The ext_proc adapter in process, against the in-memory store: Envoy's stream messages in,
the sidecar's answers out.

ext_proc must decide exactly as ext_authz does, carry the decision headers upstream, write the
class's Triton priority into the body, and free a lease itself only when the stream ends before
Envoy could forward the request. The real-Envoy versions of these checks are in
test_e2e_stack (every scenario runs in ext_proc mode too).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import replace
from types import MappingProxyType
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import struct_pb2
from prometheus_client import CollectorRegistry
from tritonclient.grpc import service_pb2

from sidecar.app import GRPC_MAX_MESSAGE_BYTES
from sidecar.core.kserve import GRPC_MODEL_INFER_PATH
from sidecar.core.lease import parse_lease, verify_lease
from sidecar.core.priority import rewrite_body
from sidecar.core.types import QuotaCheck, QuotaResult, RequestAttributes
from sidecar.envoy.authz_grpc import AuthorizationServicer
from sidecar.envoy.common import TokenCheck
from sidecar.envoy.ext_proc import ATTRIBUTES_KEY, PRINCIPAL_ATTRIBUTE, ExternalProcessorServicer
from sidecar.envoy.ext_proc_answers import SplitBody, body_response_for
from sidecar.envoy.grpc_methods import envoy_methods
from sidecar.envoy.grpc_wire import GrpcWireServer
from sidecar.errors import StateUnavailable
from sidecar.metrics import Metrics
from sidecar.policy.model import OverloadPolicy
from sidecar.service import AdmissionService
from sidecar.state.memory import MemoryQuotaStore
from tests.core_fixtures import make_policy
from tests.test_adapters import INFER, KEY, check_request, make_service, sample

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


SERVER = {"kind": "grpcio"}


@pytest.fixture(autouse=True, params=["grpcio", "own"])
def grpc_server_kind(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test here runs on both servers of Settings.grpc_server: grpc.aio and the
    sidecar's own (sidecar/envoy/grpc_wire.py), with grpc.aio's client."""
    SERVER["kind"] = request.param
    yield request.param
    SERVER["kind"] = "grpcio"


async def with_ext_proc(
    service: AdmissionService, body: Callable[[Any, Any], Awaitable[None]]
) -> None:
    """Run `body(ext_proc_stub, authz_stub)` against one in-process gRPC server."""
    server: Any
    if SERVER["kind"] == "own":
        server = GrpcWireServer(
            envoy_methods(service, KEY),
            TokenCheck("", lambda api: None),
            max_message_bytes=GRPC_MAX_MESSAGE_BYTES,
            unauthenticated_reason="",
        )
        await server.start_tcp("127.0.0.1", 0, reuse_port=False)
        port = server.port
    else:
        server = grpc.aio.server()
        ep_grpc.add_ExternalProcessorServicer_to_server(
            ExternalProcessorServicer(service, lease_key=KEY), server
        )
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
            AuthorizationServicer(service, lease_key=KEY), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await body(
                ep_grpc.ExternalProcessorStub(channel),
                external_auth_pb2_grpc.AuthorizationStub(channel),
            )
    finally:
        await server.stop(0)


def run(service: AdmissionService, body: Callable[[Any, Any], Awaitable[None]]) -> None:
    asyncio.run(with_ext_proc(service, body))


def headers_message(
    headers: dict[str, str],
    *,
    method: str = "POST",
    path: str | None = INFER,
    end_of_stream: bool = False,
    principal: str | None = None,
    buffered: bool = False,
) -> Any:
    """A request_headers message as Envoy 1.40 sends it: every value in raw_value; with
    `buffered`, the first message's protocol_config of a filter that buffers the request body
    (the shipped mode), without it that of an Envoy that does not say."""
    pairs = [(":method", method), *([(":path", path)] if path is not None else [])]
    pairs += [(":authority", "triton"), *headers.items()]
    message = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs]
            ),
            end_of_stream=end_of_stream,
        )
    )
    if buffered:
        message.protocol_config.request_body_mode = ProcessingMode.BUFFERED
    attributes = struct_pb2.Struct()
    if principal is not None:
        attributes.fields[PRINCIPAL_ATTRIBUTE].string_value = principal
    message.attributes[ATTRIBUTES_KEY].CopyFrom(attributes)
    return message


def body_message(body: bytes, end_of_stream: bool = True) -> Any:
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=end_of_stream))


def set_headers(mutation: Any) -> dict[str, str]:
    for option in mutation.set_headers:
        assert option.append_action == OVERWRITE
        assert option.header.raw_value and not option.header.value
    return {o.header.key: o.header.raw_value.decode() for o in mutation.set_headers}


def lease_of(answer: Any) -> str:
    """The lease an answer hands Envoy: dynamic metadata in the sidecar's namespace, verified
    with the test key; never a header."""
    namespace = answer.dynamic_metadata.fields["qos.sidecar"].struct_value
    token = verify_lease(namespace.fields["x-qos-lease"].string_value, KEY)
    assert token is not None
    return token


async def send_all(call: Any, messages: Sequence[Any]) -> list[Any]:
    """Send each message and read its answer; then end the stream as Envoy does, unless the
    sidecar ended the RPC (it does once Envoy needs nothing more: send nothing after that)."""
    answers = []
    for message in messages:
        await call.write(message)
        answers.append(await call.read())
    with contextlib.suppress(asyncio.InvalidStateError, grpc.aio.AioRpcError):
        await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    return answers


async def exchange(stub: Any, *messages: Any) -> list[Any]:
    """Send each message, read its answer; then end the stream as Envoy does."""
    return await send_all(stub.Process(), messages)


def in_flight(service: AdmissionService, tenant: str, klass: str) -> int:
    return asyncio.run(service.store.in_flight(tenant, klass))


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


JSON = {"content-type": "application/json"}
SEARCH_INTERACTIVE = {"x-api-key": "k-search", "x-qos-class": "interactive", **JSON}


def test_admit_sets_the_decision_headers_and_writes_the_priority_into_the_body() -> None:
    service = make_service()
    request_body = b'{"inputs":[{"name":"DELAY_MS","data":[5]}]}'
    seen: list[Any] = []

    async def body(ext_proc: Any, _: Any) -> None:
        seen.extend(
            await exchange(
                ext_proc, headers_message(SEARCH_INTERACTIVE), body_message(request_body)
            )
        )
        # The request may now be on its way to Triton: the lease is the access log's to free.
        assert await service.store.in_flight("search", "interactive") == 1

    run(service, body)
    headers_answer, body_answer = seen
    common = headers_answer.request_headers.response
    assert common.clear_route_cache
    decided = set_headers(common.header_mutation)
    assert decided["x-qos-tenant"] == "search"
    assert decided["x-qos-granted-class"] == "interactive"
    assert decided["x-qos-priority"] == "1"
    assert "x-qos-lease" not in decided
    assert lease_of(headers_answer).startswith("v1.")

    rewritten = body_answer.request_body.response
    new_body = rewritten.body_mutation.body
    assert json.loads(new_body) == {
        "parameters": {"priority": 1},
        "inputs": [{"name": "DELAY_MS", "data": [5]}],
    }
    assert set_headers(rewritten.header_mutation) == {"content-length": str(len(new_body))}
    assert sample(service, "qos_priority_rewrites_total", result="rewritten") == 1
    assert (
        sample(
            service,
            "qos_decisions_total",
            tenant="search",
            **{"class": "interactive"},
            outcome="admit",
            reason="admitted",
        )
        == 1
    )
    assert service.metrics.registry.get_sample_value(
        "qos_decision_duration_seconds_count", {"api": "ext_proc"}
    )


def test_the_body_gets_the_granted_class_priority_after_a_downgrade() -> None:
    service = make_service()
    seen: list[Any] = []

    async def body(ext_proc: Any, _: Any) -> None:
        seen.extend(
            await exchange(
                ext_proc,
                # search may not use batch: downgraded to its default class, standard (2)
                headers_message({"x-api-key": "k-search", "x-qos-class": "batch", **JSON}),
                body_message(b'{"parameters":{"priority":1},"inputs":[]}'),
            )
        )

    run(service, body)
    assert set_headers(seen[0].request_headers.response.header_mutation)["x-qos-priority"] == "2"
    new_body = seen[1].request_body.response.body_mutation.body
    assert new_body == b'{"parameters":{"priority":2},"inputs":[]}'


def test_shed_is_an_immediate_response_with_status_headers_and_json_body() -> None:
    service = make_service()
    seen: list[Any] = []

    async def body(ext_proc: Any, _: Any) -> None:
        for _ in range(5):  # analytics: burst 5
            call = ext_proc.Process()
            await call.write(headers_message({"x-api-key": "k-analytics"}, end_of_stream=True))
            assert (await call.read()).HasField("request_headers")
            await call.done_writing()
        call = ext_proc.Process()
        await call.write(headers_message({"x-api-key": "k-analytics"}))
        seen.append(await call.read())
        # The sidecar's part of the stream is over: it ends the call itself.
        assert await call.read() == grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK

    run(service, body)
    immediate = seen[0].immediate_response
    assert immediate.status.code == 429
    headers = set_headers(immediate.headers)
    assert headers["retry-after"] == "1"
    assert headers["content-type"] == "application/json"
    assert headers["x-qos-reason"] == "over_rate"
    assert json.loads(immediate.body)["reason"] == "over_rate"
    assert immediate.details == "qos_over_rate"


def test_a_503_shed_keeps_its_status() -> None:
    class DownStore(MemoryQuotaStore):
        async def acquire(self, check: QuotaCheck) -> QuotaResult:
            raise StateUnavailable("down")

    service = make_service(DownStore())
    seen: list[Any] = []

    async def body(ext_proc: Any, _: Any) -> None:
        call = ext_proc.Process()
        await call.write(headers_message({"x-api-key": "k-analytics"}))  # batch: fails closed
        seen.append(await call.read())

    run(service, body)
    immediate = seen[0].immediate_response
    # Unlike ext_authz HTTP mode, no 430 detour: Envoy sends an ImmediateResponse as it is.
    assert immediate.status.code == 503
    assert set_headers(immediate.headers)["retry-after"] == "2"
    assert json.loads(immediate.body)["reason"] == "state_unavailable"


def test_grpc_model_infer_request_gets_parameters_priority() -> None:
    service = make_service()
    request = service_pb2.ModelInferRequest(
        model_name="simgpu", raw_input_contents=[b"\x00\x00\xa0\x40"]
    )
    message = request.SerializeToString()
    framed = b"\x00" + len(message).to_bytes(4, "big") + message
    seen: list[Any] = []

    async def body(ext_proc: Any, _: Any) -> None:
        headers = {"x-api-key": "k-search", "content-type": "application/grpc", "te": "trailers"}
        seen.extend(
            await exchange(
                ext_proc,
                headers_message(headers, path=GRPC_MODEL_INFER_PATH),
                body_message(framed),
            )
        )

    run(service, body)
    new_body = seen[1].request_body.response.body_mutation.body
    rewritten = service_pb2.ModelInferRequest.FromString(new_body[5:])
    assert int.from_bytes(new_body[1:5], "big") == len(new_body) - 5
    assert rewritten.parameters["priority"].int64_param == 2  # search's default: standard
    assert rewritten.raw_input_contents == request.raw_input_contents


def test_binary_tensor_requests_get_their_json_length_updated() -> None:
    service = make_service()
    header = b'{"inputs":[{"name":"DELAY_MS","parameters":{"binary_data_size":4}}]}'
    seen: list[Any] = []

    async def body(ext_proc: Any, _: Any) -> None:
        headers = {"x-api-key": "k-search", "inference-header-content-length": str(len(header))}
        seen.extend(
            await exchange(
                ext_proc, headers_message(headers), body_message(header + b"\x00\x00\xa0\x40")
            )
        )

    run(service, body)
    response = seen[1].request_body.response
    new_body = response.body_mutation.body
    new_length = len(header) + len('"parameters":{"priority":2},')
    assert set_headers(response.header_mutation) == {
        "content-length": str(len(new_body)),
        "inference-header-content-length": str(new_length),
    }
    assert json.loads(new_body[:new_length])["parameters"] == {"priority": 2}


@pytest.mark.parametrize(
    ("path", "content_type", "request_body", "result"),
    [
        (INFER, "application/json", b'{"inputs": [1,', "malformed"),
        (INFER, "text/plain", b"hello", "unsupported"),
        ("/v2/repository/index", "application/json", b"{}", "not_inference"),
    ],
)
def test_bodies_that_cannot_be_rewritten_pass_unchanged_and_are_counted(
    path: str, content_type: str, request_body: bytes, result: str
) -> None:
    service = make_service()
    seen: list[Any] = []

    async def body(ext_proc: Any, _: Any) -> None:
        headers = {"x-api-key": "k-search", "content-type": content_type}
        seen.extend(
            await exchange(
                ext_proc, headers_message(headers, path=path), body_message(request_body)
            )
        )

    run(service, body)
    assert seen[1] == ep.ProcessingResponse(request_body=ep.BodyResponse())
    assert sample(service, "qos_priority_rewrites_total", result=result) == 1


def test_chunked_bodies_pass_unchanged() -> None:
    """STREAMED or BUFFERED_PARTIAL modes send chunks; a priority cannot go into a part."""
    service = make_service()
    seen: list[Any] = []

    async def body(ext_proc: Any, _: Any) -> None:
        seen.extend(
            await exchange(
                ext_proc,
                headers_message(SEARCH_INTERACTIVE),
                body_message(b'{"inputs":', end_of_stream=False),
                body_message(b"[]}", end_of_stream=True),
            )
        )
        assert await service.store.in_flight("search", "interactive") == 1

    run(service, body)
    assert seen[1] == seen[2] == ep.ProcessingResponse(request_body=ep.BodyResponse())
    assert sample(service, "qos_priority_rewrites_total", result="unsupported") == 1


def test_principal_comes_from_the_request_attributes() -> None:
    service = make_service()
    seen: list[Any] = []

    async def body(ext_proc: Any, _: Any) -> None:
        seen.extend(
            await exchange(
                ext_proc,
                headers_message(
                    {}, method="GET", end_of_stream=True, principal="spiffe://test/analytics"
                ),
            )
        )

    run(service, body)
    assert set_headers(seen[0].request_headers.response.header_mutation)["x-qos-tenant"] == (
        "analytics"
    )


def test_header_values_in_value_and_repeated_headers_are_read() -> None:
    service = make_service()
    message = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[
                    base_pb2.HeaderValue(key=":method", value="GET"),
                    base_pb2.HeaderValue(key=":path", value=INFER),
                    base_pb2.HeaderValue(key="X-Api-Key", value="k-search"),
                    base_pb2.HeaderValue(key="x-qos-class", value="interactive"),
                    base_pb2.HeaderValue(key="x-qos-class", value="batch"),
                ]
            ),
            end_of_stream=True,
        )
    )
    seen: list[Any] = []

    async def body(ext_proc: Any, _: Any) -> None:
        seen.extend(await exchange(ext_proc, message))

    run(service, body)
    # "interactive,batch" is not a class name: 400, as ext_authz answers a repeated header.
    assert seen[0].immediate_response.status.code == 400


@pytest.mark.parametrize(
    "first",
    [
        body_message(b"{}"),
        headers_message({"x-api-key": "k-search"}, path=None),
        headers_message({"x-api-key": "k-search"}, method=""),
        ep.ProcessingRequest(),
    ],
    ids=["body-first", "no-path", "no-method", "empty"],
)
def test_malformed_stream_is_400_and_counted(first: Any) -> None:
    service = make_service()
    seen: list[Any] = []

    async def body(ext_proc: Any, _: Any) -> None:
        call = ext_proc.Process()
        await call.write(first)
        seen.append(await call.read())
        assert await call.read() == grpc.aio.EOF

    run(service, body)
    immediate = seen[0].immediate_response
    assert immediate.status.code == 400
    assert json.loads(immediate.body)["reason"] == "malformed"
    assert sample(service, "qos_malformed_requests_total", api="ext_proc") == 1


def test_a_forwarded_request_ends_its_stream_with_ok() -> None:
    """Once Envoy has every answer a request needs, the sidecar ends the RPC with OK, before
    Envoy half-closes: Envoy then ignores the stream, and a sidecar that dies later cannot
    fail the request (the module's "Ending the stream")."""
    service = make_service()

    async def body(ext_proc: Any, _: Any) -> None:
        for messages in (
            [headers_message({"x-api-key": "k-search"}, end_of_stream=True)],
            [headers_message({"x-api-key": "k-search"}), body_message(b'{"inputs":[]}')],
        ):
            call = ext_proc.Process()
            for message in messages:
                await call.write(message)
                assert (await call.read()).WhichOneof("response") is not None
            # No done_writing: the sidecar ends the RPC on its own.
            assert await call.read() == grpc.aio.EOF
            assert await asyncio.wait_for(call.code(), 5) == grpc.StatusCode.OK

    run(service, body)
    # Forwarded, not undelivered: the leases are the access log's to release.
    assert in_flight(service, "search", "standard") == 2


def test_ext_proc_and_ext_authz_give_the_same_decisions() -> None:
    cases = [
        {"x-api-key": "k-search", "x-qos-class": "interactive"},
        {"x-api-key": "k-search", "x-qos-class": "batch"},
        {"x-api-key": "k-analytics", "x-qos-class": "interactive"},
        {"x-api-key": "nope"},
        {},
        {"x-api-key": "k-search", "x-qos-class": "bad class"},
    ]
    authz_seen: list[tuple[int, str | None, str | None]] = []
    ext_proc_seen: list[tuple[int, str | None, str | None]] = []

    async def authz_body(_: Any, authz: Any) -> None:
        for headers in cases:
            r = await authz.Check(check_request(headers))
            if r.HasField("ok_response"):
                got = {h.header.key: h.header.value for h in r.ok_response.headers}
                authz_seen.append((200, got.get("x-qos-granted-class"), None))
            else:
                body = json.loads(r.denied_response.body)
                authz_seen.append((r.denied_response.status.code, None, body["reason"]))

    async def ext_proc_body(ext_proc: Any, _: Any) -> None:
        for headers in cases:
            (answer,) = await exchange(ext_proc, headers_message(headers, end_of_stream=True))
            if answer.HasField("request_headers"):
                got = set_headers(answer.request_headers.response.header_mutation)
                ext_proc_seen.append((200, got.get("x-qos-granted-class"), None))
            else:
                immediate = answer.immediate_response
                reason = json.loads(immediate.body)["reason"]
                ext_proc_seen.append((immediate.status.code, None, reason))

    run(make_service(), authz_body)
    run(make_service(), ext_proc_body)
    assert ext_proc_seen == authz_seen
    assert [s[0] for s in ext_proc_seen] == [200, 200, 403, 401, 401, 400]


# -- leases: freed here only when Envoy cannot forward the request ------------------------------


def test_stream_ending_before_the_body_frees_the_lease() -> None:
    """Envoy closes the stream without sending the body when it refuses the body itself (413
    over its buffer limit) or the client leaves mid-upload: the request never goes upstream."""
    service = make_service()

    async def body(ext_proc: Any, _: Any) -> None:
        await exchange(ext_proc, headers_message(SEARCH_INTERACTIVE))
        await wait_until(lambda: _equals(service.store.in_flight("search", "interactive"), 0))

    run(service, body)
    assert sample(service, "qos_completions_total", result="released") == 1


def test_cancel_after_the_last_answer_leaves_the_lease_to_the_access_log() -> None:
    service = make_service()

    async def body(ext_proc: Any, _: Any) -> None:
        call = ext_proc.Process()
        await call.write(headers_message(SEARCH_INTERACTIVE))
        await call.read()
        await call.write(body_message(b"{}"))
        await call.read()
        call.cancel()  # Envoy resets the stream once it has what it needs

    run(service, body)
    assert in_flight(service, "search", "interactive") == 1
    assert sample(service, "qos_completions_total", result="released") == 0


class SlowStore(MemoryQuotaStore):
    """acquire waits until the test lets it go on, and notes whether it was cancelled: it
    suspends, as a remote store's does, so it is not answered inline."""

    answers_inline = False

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.go_on = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def acquire(self, check: QuotaCheck) -> QuotaResult:
        self.entered.set()
        try:
            await self.go_on.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return await super().acquire(check)


def test_a_stream_cancelled_while_the_store_answers_leaks_no_lease() -> None:
    """The cancellation reaches AdmissionService.check while Redis is answering. The store
    call is shielded (cancelling it could lose a lease Redis already granted): it finishes,
    and the lease it took is released at once instead of waiting for its TTL."""
    store = SlowStore()
    service = make_service(store)

    async def body(ext_proc: Any, _: Any) -> None:
        call = ext_proc.Process()
        await call.write(headers_message(SEARCH_INTERACTIVE))
        await store.entered.wait()
        call.cancel()
        store.go_on.set()  # Redis answers after the client has gone
        for _ in range(500):
            if sample(service, "qos_completions_total", result="released") == 1:
                break
            await asyncio.sleep(0.01)
        assert not store.cancelled.is_set()
        assert await store.in_flight("search", "interactive") == 0
        assert sample(service, "qos_completions_total", result="released") == 1

    run(service, body)


def test_a_handler_cancelled_after_the_admit_was_written_frees_the_lease() -> None:
    """The handler itself is cancelled (grpc.aio does that when Envoy resets the stream) after
    the admit went out but before the body came: Envoy will not forward the request."""

    class Context:
        def __init__(self) -> None:
            self.written: list[Any] = []

        async def write(self, message: Any) -> None:
            self.written.append(message)

    async def scenario() -> None:
        service = make_service()
        context = Context()
        answered = asyncio.Event()

        async def envoy() -> Any:
            yield headers_message(SEARCH_INTERACTIVE)
            answered.set()
            await asyncio.Event().wait()  # the body never comes

        handler = asyncio.create_task(
            ExternalProcessorServicer(service, lease_key=KEY).Process(envoy(), context)  # type: ignore[arg-type]
        )
        await answered.wait()
        assert len(context.written) == 1
        assert await service.store.in_flight("search", "interactive") == 1
        handler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handler
        assert await service.store.in_flight("search", "interactive") == 0
        assert sample(service, "qos_completions_total", result="released") == 1

    asyncio.run(scenario())


async def _equals(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


def test_a_held_request_first_extends_envoys_message_timeout() -> None:
    """Deferral holds the decision; ext_proc must ask Envoy for time before it does, or Envoy
    answers 504 after message_timeout."""
    from tests.test_service_overload import Backend, policy_with_overload

    backend = Backend(depth=6)  # between admit_below 4 and shed_above 40: deferred
    service = AdmissionService(
        policy_with_overload(max_wait_ms=2000),
        MemoryQuotaStore(),
        make_service().metrics,
        load=backend.view,
    )

    async def body(ext_proc: Any, _: Any) -> None:
        call = ext_proc.Process()
        await call.write(headers_message({"x-api-key": "k-search", "x-qos-class": "standard"}))
        first = await asyncio.wait_for(call.read(), 5)
        assert first.WhichOneof("response") is None  # only the timeout extension
        assert first.HasField("override_message_timeout")
        assert first.override_message_timeout.seconds == 2  # max_wait 2 s + 0.5 s margin
        assert first.override_message_timeout.nanos == 500_000_000
        backend.depth = 0
        assert service.deferrer is not None
        service.deferrer.on_scrape()
        second = await asyncio.wait_for(call.read(), 5)
        assert second.WhichOneof("response") == "request_headers"
        await call.done_writing()

    run(service, body)


# -- a buffered body: decided while it comes --------------------------------------------------


def test_a_buffered_request_is_decided_while_its_body_comes() -> None:
    """Envoy forwards nothing of a buffered request before the body's answer: its headers are
    answered at once, while the store is still deciding, and the body's answer carries the
    decision with the rewritten body."""
    store = SlowStore()
    service = make_service(store)
    seen: list[Any] = []

    async def body(ext_proc: Any, _: Any) -> None:
        call = ext_proc.Process()
        await call.write(headers_message(SEARCH_INTERACTIVE, buffered=True))
        headers_answer = await asyncio.wait_for(call.read(), 5)
        assert store.entered.is_set() and not store.go_on.is_set()  # still deciding
        await call.write(body_message(b'{"inputs":[]}'))
        store.go_on.set()
        seen.extend([headers_answer, await asyncio.wait_for(call.read(), 5)])
        assert await call.read() == grpc.aio.EOF
        assert await service.store.in_flight("search", "interactive") == 1

    run(service, body)
    headers_answer, body_answer = seen
    assert headers_answer.request_headers == ep.HeadersResponse()  # continue, nothing set
    assert not headers_answer.HasField("dynamic_metadata")
    common = body_answer.request_body.response
    assert common.clear_route_cache
    decided = set_headers(common.header_mutation)
    assert decided["x-qos-tenant"] == "search"
    assert decided["x-qos-priority"] == "1"
    new_body = common.body_mutation.body
    assert json.loads(new_body) == {"parameters": {"priority": 1}, "inputs": []}
    assert decided["content-length"] == str(len(new_body))
    assert lease_of(body_answer).startswith("v1.")


def test_a_buffered_request_over_its_quota_is_refused_on_its_body() -> None:
    service = make_service()
    seen: list[Any] = []

    async def body(ext_proc: Any, _: Any) -> None:
        for _ in range(6):  # analytics: burst 5
            call = ext_proc.Process()
            await call.write(headers_message({"x-api-key": "k-analytics"}, buffered=True))
            assert (await call.read()).request_headers == ep.HeadersResponse()
            await call.write(body_message(b"{}"))
            seen.append(await call.read())
            assert await call.read() == grpc.aio.EOF

    run(service, body)
    assert [a.WhichOneof("response") for a in seen] == ["request_body"] * 5 + ["immediate_response"]
    assert seen[-1].immediate_response.status.code == 429
    assert set_headers(seen[-1].immediate_response.headers)["x-qos-reason"] == "over_rate"
    assert in_flight(service, "analytics", "batch") == 5  # the refused one took nothing


def test_a_buffered_stream_ending_before_its_body_frees_what_it_took() -> None:
    """The early decision admitted and the stream ends (client gone mid-upload, body over
    Envoy's buffer limit): the lease is released at once; one still deciding is cancelled
    and gives its slot back too."""
    store = SlowStore()
    service = make_service(store)

    async def body(ext_proc: Any, _: Any) -> None:
        # Answered without the store (decided on the headers, this would wait for it).
        await asyncio.wait_for(
            exchange(ext_proc, headers_message(SEARCH_INTERACTIVE, buffered=True)), 5
        )
        store.go_on.set()  # the admit lands after the stream ended, or was cancelled first
        await wait_until(lambda: _equals(service.store.in_flight("search", "interactive"), 0))
        call = ext_proc.Process()  # now one whose admit is in before the end
        await call.write(headers_message(SEARCH_INTERACTIVE, buffered=True))
        await call.read()
        await wait_until(lambda: _equals(service.store.in_flight("search", "interactive"), 1))
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        await wait_until(lambda: _equals(service.store.in_flight("search", "interactive"), 0))

    run(service, body)
    assert sample(service, "qos_completions_total", result="released") >= 1


def test_a_hold_begun_before_the_body_extends_the_bodys_timeout() -> None:
    """No message of Envoy's waits while the body comes, and Envoy takes an extension only for
    the message it waits on: the extension goes out once the body is here, before the
    decision it waits for."""
    from tests.test_service_overload import Backend, policy_with_overload

    backend = Backend(depth=6)  # between admit_below 4 and shed_above 40: deferred
    service = AdmissionService(
        policy_with_overload(max_wait_ms=2000),
        MemoryQuotaStore(),
        make_service().metrics,
        load=backend.view,
    )
    written: list[Any] = []

    class Context:
        async def write(self, message: Any) -> None:
            written.append(message)

    async def envoy() -> Any:
        headers = {"x-api-key": "k-search", "x-qos-class": "standard", **JSON}
        yield headers_message(headers, buffered=True)
        held = {"class": "standard"}
        await wait_until(lambda: _resolved(sample(service, "qos_held_requests", **held) == 1))
        assert [w.request_headers == ep.HeadersResponse() for w in written] == [True]
        yield body_message(b'{"inputs":[]}')

    async def scenario() -> None:
        handler = asyncio.create_task(
            ExternalProcessorServicer(service, lease_key=KEY).Process(envoy(), Context())  # type: ignore[arg-type]
        )
        await wait_until(lambda: _resolved(len(written) == 2))
        assert written[1].WhichOneof("response") is None  # only the timeout extension
        assert written[1].override_message_timeout.seconds == 2  # max_wait 2 s + 0.5 s margin
        backend.depth = 0
        assert service.deferrer is not None
        service.deferrer.on_scrape()
        await asyncio.wait_for(handler, 5)
        assert written[2].WhichOneof("response") == "request_body"
        decided = set_headers(written[2].request_body.response.header_mutation)
        assert decided["x-qos-tenant"] == "search"

    asyncio.run(scenario())


async def _resolved(value: bool) -> bool:
    return value


# -- gRPC ModelInfer: the model is in the body -------------------------------------------------


def model_infer_body(model: str) -> bytes:
    message = service_pb2.ModelInferRequest(model_name=model).SerializeToString()
    return b"\x00" + len(message).to_bytes(4, "big") + message


GRPC_SEARCH = {"x-api-key": "k-search", "content-type": "application/grpc", "te": "trailers"}


def test_grpc_model_infer_is_decided_on_its_body_for_its_model() -> None:
    # A class caps a model's requests in flight, so that admits are counted for their model.
    policy = make_policy()
    classes = dict(policy.classes)
    cap = OverloadPolicy(admit_below=1000, max_in_flight=1000)
    classes["batch"] = replace(classes["batch"], overload=cap)
    policy = replace(policy, classes=MappingProxyType(classes))
    service = AdmissionService(policy, MemoryQuotaStore(), Metrics(CollectorRegistry()))
    seen: list[Any] = []

    async def body(ext_proc: Any, _: Any) -> None:
        seen.extend(
            await exchange(
                ext_proc,
                headers_message(GRPC_SEARCH, path=GRPC_MODEL_INFER_PATH),
                body_message(model_infer_body("simgpu")),
            )
        )
        # The lease counts for the model the body named.
        assert await service.store.model_in_flight("simgpu") == 1

    run(service, body)
    # The headers wait for the body, and nothing more: no response phases are asked for.
    assert seen[0] == ep.ProcessingResponse(request_headers=ep.HeadersResponse())
    decided = seen[1].request_body.response
    assert decided.clear_route_cache
    lease = parse_lease(lease_of(seen[1]))
    assert lease is not None and lease.model == "simgpu"


def test_overload_admission_applies_to_a_grpc_model_infer() -> None:
    """Without its model a ModelInfer was admitted by quota alone, whatever Triton's queue."""
    from tests.test_service_overload import Backend, policy_with_overload

    service = AdmissionService(
        policy_with_overload(),
        MemoryQuotaStore(),
        make_service().metrics,
        load=Backend(depth=60).view,  # beyond standard's shed_above 40
    )
    seen: list[Any] = []

    async def body(ext_proc: Any, _: Any) -> None:
        call = ext_proc.Process()
        headers = {**GRPC_SEARCH, "x-qos-class": "standard"}
        await call.write(headers_message(headers, path=GRPC_MODEL_INFER_PATH))
        seen.append(await call.read())
        await call.write(body_message(model_infer_body("simgpu")))
        seen.append(await call.read())
        assert await call.read() == grpc.aio.EOF

    run(service, body)
    immediate = seen[1].immediate_response
    assert immediate.status.code == 503
    assert json.loads(immediate.body)["reason"] == "overloaded"


@pytest.mark.parametrize("admitted", [False, True])
@pytest.mark.parametrize("size", [40, 1 << 20])
def test_a_split_answer_is_read_as_the_whole_answer(admitted: bool, size: int) -> None:
    """ext_proc_answers: the head and the body's wrapping, joined, parse as the answer with
    the body inside it (a parser merges the message field that comes twice), for a small
    body and a megabyte, with and without the decision of a request decided on its body."""
    service = make_service()
    admit = None
    if admitted:
        attrs = RequestAttributes("POST", INFER, SEARCH_INTERACTIVE)
        admit = asyncio.run(service.check(attrs, "ext_proc"))
        assert admit.admitted
    padding = b"x" * max(0, size - 40)
    body = b'{"inputs":[{"name":"P","data":["' + padding + b'"]}]}'
    rewrite = rewrite_body(INFER, {"content-type": "application/json"}, body, 2)
    assert rewrite.body is not None

    whole = body_response_for(rewrite, admit, KEY)
    split = body_response_for(rewrite, admit, KEY, split=True)
    assert isinstance(split, SplitBody)
    head, tail = split.wire_parts()
    assert tail is rewrite.body  # the body itself, not a copy
    assert ep.ProcessingResponse.FromString(head + tail) == whole
    assert split.message() == whole
    assert whole.request_body.response.body_mutation.body == rewrite.body
