"""WebSocket behaviour for the in-process origin: RFC 8441 over h2, or RFC 6455 over HTTP/1.1
(for the fallback path), both echoing with wsproto."""

from __future__ import annotations

import anyio
import anyio.abc
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)

from muxproxy.demo.h2server import OriginRequest

from .origin import Script


class WSScript(Script):
    """Plain paths as Script; extended CONNECT streams become WebSocket echoes."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0  # echo handlers running now
        self.opened = 0
        self.http1_upgrades = 0
        self.flooded = 0  # bytes /flood managed to send

    async def __call__(self, req: OriginRequest) -> None:
        if req.method != b"CONNECT":
            await super().__call__(req)
            return
        if req.protocol != b"websocket" or req.path == b"/refuse-ws":
            await req.respond(403, [], b"no websocket here\n")
            return
        offered = [p.strip() for p in (req.header(b"sec-websocket-protocol") or b"").split(b",")]
        chosen = next((p for p in offered if p in (b"chat", b"superchat")), None)
        await req.respond(200, [(b"sec-websocket-protocol", chosen)] if chosen else [], end=False)
        self.live += 1
        self.opened += 1
        if req.path == b"/flood":  # binary messages of 16 KiB, as fast as flow control allows
            frame = b"\x82\x7e\x40\x00" + b"x" * 16384
            try:
                while req.reset_by_peer is None and not req.conn.closed:
                    await req.send_data(frame)
                    self.flooded += len(frame)
            finally:
                self.live -= 1
            return
        try:
            ws = Connection(ConnectionType.SERVER)
            while True:
                chunk = await req.read_chunk()
                if chunk is None:
                    return  # END_STREAM or RST: the handler ends
                ws.receive_data(chunk)
                if not await _echo(ws, req.send_data):
                    return
        finally:
            self.live -= 1

    async def http1(self, stream: anyio.abc.ByteStream, first: bytes) -> None:
        """An HTTP/1.1 WebSocket server (the fallback target)."""
        ws = WSConnection(ConnectionType.SERVER)
        ws.receive_data(first)
        self.http1_upgrades += 1
        self.live += 1

        async def send(data: bytes) -> None:
            await stream.send(data)

        try:
            while True:
                if not await _echo(ws, send):
                    return
                try:
                    ws.receive_data(await stream.receive())
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
        finally:
            self.live -= 1
            await stream.aclose()


async def _echo(ws: Connection | WSConnection, send: object) -> bool:
    """Answer every event; False once the connection is closed."""
    for ev in list(ws.events()):
        if isinstance(ev, Request):  # the HTTP/1.1 handshake (fallback server only)
            await send(ws.send(AcceptConnection()))  # type: ignore[operator]
        elif isinstance(ev, TextMessage):
            if ev.data.startswith("close:"):
                await send(ws.send(CloseConnection(code=int(ev.data[6:]))))  # type: ignore[operator]
                continue
            await send(ws.send(TextMessage(ev.data, ev.frame_finished, ev.message_finished)))  # type: ignore[operator]
        elif isinstance(ev, BytesMessage):
            await send(ws.send(BytesMessage(ev.data, ev.frame_finished, ev.message_finished)))  # type: ignore[operator]
        elif isinstance(ev, Ping):
            await send(ws.send(ev.response()))  # type: ignore[operator]
        elif isinstance(ev, CloseConnection):
            if ws.state is not ConnectionState.CLOSED:  # theirs first: answer it
                await send(ws.send(ev.response()))  # type: ignore[operator]
            return False
    return True
