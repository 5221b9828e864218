"""A small WebSocket client on anyio + wsproto (runs on asyncio and trio alike)."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
import anyio.abc
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)


class Rejected(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"{status} {body[:100]!r}")
        self.status = status
        self.body = body


@dataclass
class WSClient:
    stream: anyio.abc.ByteStream
    ws: WSConnection
    subprotocol: str | None = None
    pongs: list[bytes] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""
    _pending: list[object] = field(default_factory=list)

    @classmethod
    async def connect(
        cls, host: str, port: int, path: str = "/ws", subprotocols: list[str] | None = None
    ) -> WSClient:
        stream = await anyio.connect_tcp(host, port)
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send(ws.send(Request(host="app.test", target=path,
                                          subprotocols=subprotocols or [])))
        client = cls(stream, ws)
        body = b""
        status = 0
        while True:
            for ev in client._events():
                if isinstance(ev, AcceptConnection):
                    client.subprotocol = ev.subprotocol
                    return client
                if isinstance(ev, RejectConnection):
                    status = ev.status_code
                    if not ev.has_body:
                        raise Rejected(status, b"")
                elif isinstance(ev, RejectData):
                    body += ev.data
                    if ev.body_finished:
                        raise Rejected(status, body)
            await client._fill()

    def _events(self) -> list[object]:
        return list(self.ws.events())

    async def _fill(self) -> None:
        try:
            data = await self.stream.receive(1 << 20)
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            data = b""
        if not data:
            self.ws.receive_data(None)
            raise anyio.EndOfStream
        self.ws.receive_data(data)

    async def send(self, message: str | bytes) -> None:
        ev = TextMessage(message) if isinstance(message, str) else BytesMessage(message)
        await self.stream.send(self.ws.send(ev))

    async def ping(self, payload: bytes) -> None:
        await self.stream.send(self.ws.send(Ping(payload)))

    async def receive(self) -> str | bytes:
        """The next whole message (pongs are recorded on the way)."""
        text: list[str] = []
        data: list[bytes] = []
        while True:
            for ev in self._events():
                if isinstance(ev, TextMessage):
                    text.append(ev.data)
                    if ev.message_finished:
                        return "".join(text)
                elif isinstance(ev, BytesMessage):
                    data.append(bytes(ev.data))
                    if ev.message_finished:
                        return b"".join(data)
                elif isinstance(ev, Pong):
                    self.pongs.append(bytes(ev.payload))
                elif isinstance(ev, Ping):
                    await self.stream.send(self.ws.send(ev.response()))
                elif isinstance(ev, CloseConnection):
                    self.close_code, self.close_reason = ev.code, ev.reason or ""
                    await self.stream.send(self.ws.send(ev.response()))
                    raise anyio.EndOfStream
            await self._fill()

    async def wait_pong(self) -> bytes:
        while not self.pongs:
            for ev in self._events():
                if isinstance(ev, Pong):
                    self.pongs.append(bytes(ev.payload))
            if not self.pongs:
                await self._fill()
        return self.pongs.pop(0)

    async def close(self, code: int = 1000, reason: str = "") -> int | None:
        """Close handshake; returns the code the peer answered with."""
        await self.stream.send(self.ws.send(CloseConnection(code=code, reason=reason)))
        try:
            while True:
                for ev in self._events():
                    if isinstance(ev, CloseConnection):
                        self.close_code = ev.code
                        await self.stream.aclose()
                        return ev.code
                await self._fill()
        except anyio.EndOfStream:
            await self.stream.aclose()
            return self.close_code

    async def abort(self) -> None:
        """Vanish without a close handshake."""
        await self.stream.aclose()
