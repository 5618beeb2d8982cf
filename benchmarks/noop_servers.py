"""No-op twins of the sidecar for the overhead benchmark: the same protocols on the same
sockets, with no work behind them, so that the sidecar's cost is its ratio to these.

One process, one uvloop event loop (as the sidecar runs), serving
- ext_authz HTTP (aiohttp, ``handler_cancellation=True`` as the sidecar sets): 200, no headers;
- on the gRPC socket (grpc.aio): ext_authz ``Check`` (OK), ext_proc ``Process`` (each message
  answered with CONTINUE for its phase, the body left alone), and the access-log stream (read
  and dropped), so the Envoy config is exactly the sidecar's and Envoy does the same work.

``python -m benchmarks.noop_servers --http unix:/path/authz.sock --grpc unix:/path/grpc.sock
--ready-file F``: F is written once both listen.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

from sidecar.envoy.common import HEALTH_PATH, HEALTH_STATUS, grpc_health_handler


class NoopAuthorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: Any
    ) -> external_auth_pb2.CheckResponse:
        response = external_auth_pb2.CheckResponse()
        response.status.code = 0
        response.ok_response.SetInParent()
        return response


# The phase of a ProcessingRequest -> the field of the ProcessingResponse that continues it.
_CONTINUE = {
    "request_headers": lambda: ep.ProcessingResponse(request_headers=ep.HeadersResponse()),
    "response_headers": lambda: ep.ProcessingResponse(response_headers=ep.HeadersResponse()),
    "request_body": lambda: ep.ProcessingResponse(request_body=ep.BodyResponse()),
    "response_body": lambda: ep.ProcessingResponse(response_body=ep.BodyResponse()),
    "request_trailers": lambda: ep.ProcessingResponse(request_trailers=ep.TrailersResponse()),
    "response_trailers": lambda: ep.ProcessingResponse(response_trailers=ep.TrailersResponse()),
}


class NoopProcessor(external_processor_pb2_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    async def Process(
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: Any
    ) -> AsyncIterator[ep.ProcessingResponse]:
        async for message in request_iterator:
            phase = message.WhichOneof("request")
            if phase in _CONTINUE:
                yield _CONTINUE[phase]()


class NoopAccessLog(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: Any
    ) -> als_pb2.StreamAccessLogsResponse:
        async for _ in request_iterator:
            pass
        return als_pb2.StreamAccessLogsResponse()


async def _allow(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def _healthy(request: web.Request) -> web.Response:
    return web.Response(status=HEALTH_STATUS)


async def serve(http_addr: str, grpc_addr: str, ready_file: Path | None) -> None:
    app = web.Application()
    # The shipped clusters health-check the sidecar's listeners: answered as the sidecar does.
    app.router.add_get(HEALTH_PATH, _healthy)
    app.router.add_route("*", "/{tail:.*}", _allow)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.UnixSite(runner, http_addr.removeprefix("unix:"))
    await site.start()
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 8 << 20),
            ("grpc.max_send_message_length", 8 << 20),
        ]
    )
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(NoopAuthorization(), server)
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(NoopProcessor(), server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(NoopAccessLog(), server)
    server.add_generic_rpc_handlers((grpc_health_handler(),))
    if server.add_insecure_port(grpc_addr) == 0:
        raise OSError(f"cannot listen on {grpc_addr}")
    await server.start()
    if ready_file is not None:
        # One tiny write when ready; nothing else runs on the loop yet.
        ready_file.write_text("ready\n")  # noqa: ASYNC240
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop(0.5)
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.noop_servers", description=__doc__)
    parser.add_argument("--http", required=True, help="unix:/path for ext_authz HTTP")
    parser.add_argument("--grpc", required=True, help="unix:/path for the gRPC services")
    parser.add_argument("--ready-file", type=Path)
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(serve(args.http, args.grpc, args.ready_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
