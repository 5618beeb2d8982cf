"""What the sidecar's two Envoy-facing servers (http_wire.py, grpc_wire.py) share: a socket,
Unix or TCP, with one protocol object per connection."""

from __future__ import annotations

import asyncio


class SocketListener:
    """Subclasses say what serves a connection (`connection`)."""

    _server: asyncio.Server | None = None

    def connection(self) -> asyncio.Protocol:
        raise NotImplementedError

    async def start_unix(self, path: str) -> None:
        """Listen on `path`; asyncio replaces a stale socket file left by a killed process."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self.connection, path)

    async def start_tcp(self, host: str, port: int, *, reuse_port: bool) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.connection, host, port, reuse_address=True, reuse_port=reuse_port
        )

    @property
    def port(self) -> int:
        """The TCP port listened on (for a listener started on port 0)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])
