"""FastStream: the lean byte stream plain-TCP client and backend sockets are switched to.

On asyncio (and uvloop) it is an AsyncioStream that takes the transport over; on trio a
TrioStream on the non-blocking socket, whose callbacks come from the run's epoll reactor; for
TLS anyio's own stream is kept.  These tests pin what must not change, on every loop: order,
bounded read-ahead (asyncio; trio reads nothing ahead), half-close, closing a socket whose
peer stopped reading, and the callback interface a detached WebSocket tunnel runs on."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest

from muxproxy.io.fast_stream import (
    READ_AHEAD,
    AsyncioStream,
    FastStream,
    _sockaddr,
    accepted_peer,
    asyncio_running,
    serve_fast,
)
from muxproxy.io.transport import lean_stream
from muxproxy.io.trio_stream import TrioStream, serve_trio

from ..conftest import loop_name
from .harness import wait_for

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def pair() -> AsyncIterator[tuple[anyio.abc.ByteStream, anyio.abc.SocketStream]]:
    """(server side through lean_stream, plain client side) over loopback."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.raw_socket).getsockname()[1]
    client = await anyio.connect_tcp("127.0.0.1", port)
    server = lean_stream(await listener.listeners[0].accept())
    try:
        yield server, client
    finally:
        await server.aclose()
        await client.aclose()
        await listener.aclose()


async def test_a_plain_socket_becomes_the_loops_fast_stream(anyio_backend: Any) -> None:
    async with pair() as (server, _):
        kind = TrioStream if loop_name(anyio_backend) == "trio" else AsyncioStream
        assert type(server) is kind
        assert server.extra(anyio.abc.SocketAttribute.remote_address)[0] == "127.0.0.1"


async def test_bytes_arrive_whole_and_in_order_both_ways() -> None:
    async with pair() as (server, client):
        data = bytes(range(256)) * 4096  # 1 MiB
        got = bytearray()
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.send, data)
            while len(got) < len(data):
                got += await server.receive(65536)
        assert got == data
        await server.send(data)
        back = bytearray()
        while len(back) < len(data):
            back += await client.receive()
        assert back == data


async def test_read_ahead_is_bounded() -> None:
    """A peer that sends far more than we read is held to READ_AHEAD (+ one read) in memory;
    the rest waits in the kernel, and nothing is lost."""
    async with pair() as (server, client):
        assert isinstance(server, (AsyncioStream, TrioStream))
        total = 16 * 1024 * 1024
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.send, b"x" * total)
            got = len(await server.receive(1))  # (a TrioStream reads from its first receive)
            await wait_for(lambda: server.read_paused)
            assert server.buffered <= READ_AHEAD + 256 * 1024
            while got < total:
                got += len(await server.receive(65536))
                assert server.buffered <= READ_AHEAD + 256 * 1024
        assert got == total


async def test_half_close_still_gets_the_answer() -> None:
    async with pair() as (server, client):
        await client.send(b"request")
        await client.send_eof()
        assert await server.receive() == b"request"
        with pytest.raises(anyio.EndOfStream):
            await server.receive()
        await server.send(b"answer")
        assert await client.receive() == b"answer"


async def test_peer_reset_is_a_broken_resource() -> None:
    async with pair() as (server, client):
        sock = client.extra(anyio.abc.SocketAttribute.raw_socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        await client.aclose()  # linger 0: RST
        with pytest.raises((anyio.BrokenResourceError, anyio.EndOfStream)):
            await server.receive()
        with pytest.raises((anyio.BrokenResourceError, anyio.ClosedResourceError)):
            for _ in range(100):  # the first writes may still be accepted by the kernel
                await server.send(b"x" * 65536)


async def test_close_does_not_wait_for_a_peer_that_stopped_reading() -> None:
    """A send blocked on a full socket ends when the stream is closed (the send_timeout path),
    and the close does not wait for the peer to drain."""
    async with pair() as (server, _client):
        with anyio.move_on_after(0.5):  # a deadline, not a sleep: the send blocks forever
            while True:
                await server.send(b"x" * 65536)
        with anyio.fail_after(5):
            await server.aclose()
        with pytest.raises(anyio.ClosedResourceError):
            await server.send(b"x")


class _Sink:
    """Records what a FastStream delivers to its sink."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = self.lost = False
        self.drained = 0

    def on_data(self, data: bytes) -> None:
        self.data += data

    def on_eof(self) -> None:
        self.eof = True

    def on_lost(self) -> None:
        self.lost = True

    def on_drained(self) -> None:
        self.drained += 1


async def test_attach_hands_the_events_to_a_sink() -> None:
    """The callback interface a detached tunnel uses: the bytes read ahead are handed over,
    then data, pause/resume, a write that waits for the peer, the drain, EOF, and closing
    (what pausing holds back is pinned by the WebSocket flood test)."""
    async with pair() as (server, client):
        assert isinstance(server, FastStream)
        await client.send(b"queued")
        assert await server.receive(1) == b"q"  # (a TrioStream reads from its first receive)
        await wait_for(lambda: server.buffered == 5)
        sink = _Sink()
        sink.data += server.attach(sink)
        assert sink.data == b"ueued" and server.buffered == 0
        await client.send(b"live")
        await wait_for(lambda: sink.data == b"ueuedlive")
        server.pause_reading()
        await client.send(b"held")
        server.resume_reading()
        await wait_for(lambda: sink.data == b"ueuedliveheld")
        while server.write_nowait(b"x" * 65536):  # until the peer's window is full
            pass
        assert server.write_buffer_size() > 0 and sink.drained == 0
        got = 0
        while got < 65536 or server.write_buffer_size():
            got += len(await client.receive(1 << 20))
        await wait_for(lambda: sink.drained == 1)
        await client.send_eof()
        await wait_for(lambda: sink.eof and server.at_eof)
        server.close_nowait()
        if isinstance(server, AsyncioStream):  # (the transport reports its own close)
            await wait_for(lambda: sink.lost and server.lost)
        with pytest.raises(anyio.ClosedResourceError):
            server.write_nowait(b"x")


async def test_an_attached_stream_reports_a_reset_peer_even_while_paused() -> None:
    """A WebSocket whose tunnel paused reading (no window) still learns that its client reset
    the connection: reading or not, the sink gets on_lost, once."""
    async with pair() as (server, client):
        assert isinstance(server, FastStream)
        sink = _Sink()
        server.attach(sink)
        server.pause_reading()
        sock = client.extra(anyio.abc.SocketAttribute.raw_socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        await client.aclose()  # linger 0: RST
        if isinstance(server, AsyncioStream):  # (it notices a reset peer only when writing)
            server.write_nowait(b"x")
        await wait_for(lambda: sink.lost and server.lost)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_a_sink_that_raises_costs_its_own_connection_only() -> None:
    """The reactor runs every attached stream of the trio run: a bug in one sink closes that
    connection and is logged; the other attached streams are still served."""

    class Broken(_Sink):
        def on_data(self, data: bytes) -> None:
            raise RuntimeError("bug")

    async with pair() as (bad, bad_client), pair() as (good, good_client):
        assert isinstance(bad, FastStream) and isinstance(good, FastStream)
        bad.attach(Broken())
        sink = _Sink()
        good.attach(sink)
        await bad_client.send(b"boom")
        with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            with anyio.fail_after(5):
                await bad_client.receive()
        await good_client.send(b"still here")
        await wait_for(lambda: sink.data == b"still here")


@pytest.mark.parametrize("ours", [True, False], ids=["our-accept-loop", "anyio-listener"])
async def test_accepted_peer_is_the_clients_address_with_nodelay_set(ours: bool) -> None:
    """What the proxy learns of a new connection: serve_fast's and serve_trio's streams take
    the address from accept(), anyio's stream (a TLS listener's) asks the socket; the same
    answer either way, and TCP_NODELAY is on."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    raw = listener.extra(anyio.abc.SocketAttribute.raw_socket)
    seen: list[tuple[Any, int]] = []
    got = anyio.Event()

    async def handler(stream: anyio.abc.ByteStream) -> None:
        peer = accepted_peer(stream)
        sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        seen.append((peer, sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))
        got.set()
        await stream.aclose()

    async with anyio.create_task_group() as tg:
        if not ours:
            tg.start_soon(listener.serve, handler)
        else:
            tg.start_soon(serve_fast if asyncio_running() else serve_trio, raw, handler, tg)
        client = await anyio.connect_tcp("127.0.0.1", raw.getsockname()[1])
        with anyio.fail_after(5):
            await got.wait()
        local = client.extra(anyio.abc.SocketAttribute.local_address)
        await client.aclose()
        tg.cancel_scope.cancel()
    await listener.aclose()
    assert seen == [(local, 1)]


def test_an_ipv6_accept_address_reads_as_anyio_gives_it() -> None:
    assert _sockaddr(("::1", 8080, 0, 0)) == ("::1", 8080)
    assert _sockaddr(("fe80::1", 8080, 0, 3)) == ("fe80::1%3", 8080)
    assert _sockaddr(("127.0.0.1", 8080)) == ("127.0.0.1", 8080)
