"""A small HTTP/3 client (aioquic) to check a peer directly, without muxproxy in between.

Used to prove that an HTTP/3 server really serves h3 before muxproxy is put in front of it,
so that a failure in the tests through muxproxy cannot be the peer's set-up. The UDP socket
is bound to 127.0.0.1 (aioquic's own ``connect()`` binds ``::``, every interface).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import QuicEvent

from .h1 import Response

TIMEOUT = 20.0


@dataclass
class _Pending:
    done: asyncio.Future[None]
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)


class _H3Protocol(QuicConnectionProtocol):
    def __init__(self, quic: QuicConnection) -> None:
        super().__init__(quic)
        self.h3 = H3Connection(quic)
        self.pending: dict[int, _Pending] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        for h3_event in self.h3.handle_event(event):
            self._h3_event(h3_event)

    def _h3_event(self, event: H3Event) -> None:
        if not isinstance(event, HeadersReceived | DataReceived):
            return
        pending = self.pending.get(event.stream_id)
        if pending is None:
            return
        if isinstance(event, HeadersReceived):
            for name, value in event.headers:
                if name == b":status":
                    pending.status = int(value)
                else:
                    pending.headers.append((name.decode(), value.decode()))
        else:
            pending.body += event.data
        if event.stream_ended and not pending.done.done():
            pending.done.set_result(None)

    async def request(self, method: str, authority: str, path: str, body: bytes | None) -> Response:
        stream_id = self._quic.get_next_available_stream_id()
        pending = _Pending(asyncio.get_running_loop().create_future())
        self.pending[stream_id] = pending
        head = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
        ]
        if body is not None:
            head.append((b"content-length", str(len(body)).encode()))
        self.h3.send_headers(stream_id, head, end_stream=body is None)
        if body is not None:
            self.h3.send_data(stream_id, body, end_stream=True)
        self.transmit()
        await pending.done
        del self.pending[stream_id]
        return Response(pending.status, pending.headers, bytes(pending.body))


@dataclass(frozen=True)
class H3Request:
    method: str
    path: str
    body: bytes | None = None


async def _fetch(
    port: int, requests: Sequence[H3Request], ca_file: Path, server_name: str
) -> list[Response]:
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=H3_ALPN,
        server_name=server_name,
        verify_mode=ssl.CERT_REQUIRED,
    )
    config.load_verify_locations(cafile=str(ca_file))
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: _H3Protocol(QuicConnection(configuration=config)),
        local_addr=("127.0.0.1", 0),
    )
    assert isinstance(protocol, _H3Protocol)
    try:
        protocol.connect(("127.0.0.1", port))
        await protocol.wait_connected()
        authority = f"{server_name}:{port}"
        return [await protocol.request(r.method, authority, r.path, r.body) for r in requests]
    finally:
        protocol.close()
        await protocol.wait_closed()
        transport.close()


def h3_fetch(
    port: int,
    requests: Sequence[H3Request],
    *,
    ca_file: Path,
    server_name: str = "localhost",
    timeout: float = TIMEOUT,
) -> list[Response]:
    """Send ``requests`` one after another on one QUIC connection to 127.0.0.1:``port``,
    verifying the server's certificate against ``ca_file``; bounded by ``timeout``."""

    async def bounded() -> list[Response]:
        return await asyncio.wait_for(_fetch(port, requests, ca_file, server_name), timeout)

    return asyncio.run(bounded())
