"""The QUIC wire of an HTTP/3 backend connection: aioquic driven from a non-blocking UDP socket.

:class:`DatagramTransport` is the :class:`~muxproxy.io.transport.Transport` of the HTTP/3 core.
``receive`` takes every datagram already queued in the socket (up to ``RECEIVE_BATCH``) and
feeds them to the core at once, so the core processes its events and the writer builds its
packets once per batch rather than once per datagram (a 16 KiB response is a dozen datagrams);
only when none is queued does it wait (``anyio.wait_readable``) with aioquic's ``get_timer()``
as the deadline, and call ``handle_timer(now)`` when that passes.  ``flush`` writes
``datagrams_to_send(now)`` with plain non-blocking ``send`` calls, waiting only when the
kernel's buffer is full.  ``aioquic.asyncio`` is never imported, so this runs on asyncio and
trio alike.
"""

from __future__ import annotations

import math
import socket
import ssl
from typing import Protocol, cast

import anyio
from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration
from anyio.lowlevel import checkpoint

from ..config import Address, ClusterConfig
from ..core.backend_h3 import H3Backend
from ..core.relay import BackendCore, Update
from .transport import NETWORK_ERRORS, Transport


class DatagramCore(BackendCore, Protocol):
    """A protocol core fed datagrams, with a timer of its own (HTTP/3 over aioquic)."""

    def connect(self, addr: tuple[str, int], now: float) -> None: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> Update: ...
    def receive_datagrams(
        self, datagrams: list[bytes], addr: tuple[str, int], now: float
    ) -> Update: ...
    def datagrams_to_send(self, now: float) -> list[bytes]: ...


def quic_configuration(address: Address, cfg: ClusterConfig) -> QuicConfiguration:
    """TLS 1.3 for the QUIC handshake: ALPN h3, the certificate verified unless configured off."""
    tls = cfg.tls
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=H3_ALPN,
        server_name=tls.server_name or address.host,
        verify_mode=ssl.CERT_REQUIRED if tls.verify else ssl.CERT_NONE,
        idle_timeout=max(60.0, 3 * cfg.ping_interval),
        max_stream_data=cfg.stream_window,
    )
    if tls.ca:
        config.load_verify_locations(cafile=tls.ca)
    return config


def h3_core(address: Address, cfg: ClusterConfig) -> H3Backend:
    return H3Backend(
        quic_configuration(address, cfg),
        max_streams=cfg.max_streams_per_connection,
        stream_window=cfg.stream_window,
        slow_client_grace=cfg.slow_client_timeout,
    )


# At most this many datagrams are taken from the socket per receive: the writer's ACKs and
# the exchanges' wake-ups wait for the batch, so it is kept to a few responses' worth.
RECEIVE_BATCH = 128
# The kernel's receive buffer: a pool connection carries hundreds of streams, whose responses
# arrive in bursts while the loop is busy elsewhere (the default 208 KiB dropped datagrams).
RECEIVE_BUFFER = 4 * 1024 * 1024
MAX_DATAGRAM = 65536


class DatagramTransport:
    """A connected, non-blocking UDP socket carrying a :class:`DatagramCore`."""

    __slots__ = ("_core", "_peer", "_sock")

    def __init__(self, sock: socket.socket, peer: tuple[str, int], core: DatagramCore) -> None:
        self._sock = sock
        self._peer = peer
        self._core = core

    def start(self, now: float) -> None:
        self._core.connect(self._peer, now)

    def _drain(self) -> list[bytes]:
        """The datagrams queued in the socket now (raises ``OSError`` for a dead one)."""
        recv = self._sock.recv
        batch: list[bytes] = []
        try:
            while len(batch) < RECEIVE_BATCH:
                batch.append(recv(MAX_DATAGRAM))
        except BlockingIOError:
            pass
        return batch

    async def receive(self) -> tuple[Update, bool]:
        core = self._core
        try:
            batch = self._drain()
            if batch:
                # Always one await per receive, so the writer and the exchanges run between
                # batches even while datagrams keep arriving.
                await checkpoint()
            else:
                timer = core.get_timer()
                wait = math.inf if timer is None else timer - anyio.current_time()
                if wait > 0:
                    with anyio.move_on_after(wait):
                        await anyio.wait_readable(self._sock)
                        batch = self._drain()
                else:
                    await checkpoint()
        except NETWORK_ERRORS:
            return core.abort("backend connection lost"), False
        if batch:
            return core.receive_datagrams(batch, self._peer, anyio.current_time()), True
        return core.handle_timer(anyio.current_time()), False

    async def flush(self) -> bool:
        send = self._sock.send
        for datagram in self._core.datagrams_to_send(anyio.current_time()):
            while True:
                try:
                    send(datagram)
                    break
                except BlockingIOError:
                    await anyio.wait_writable(self._sock)
        return False

    async def aclose(self) -> None:
        if self._sock.fileno() >= 0:
            anyio.notify_closing(self._sock)  # a reader waiting on it gets ClosedResourceError
            self._sock.close()


async def connect_datagram(
    address: Address,
    cfg: ClusterConfig,
    tls: ssl.SSLContext | None,
    alpn: str | None,
    core: BackendCore,
) -> Transport:
    """A connected UDP socket (QUIC brings its own TLS: ``tls`` and ``alpn`` are unused)."""
    infos = await anyio.getaddrinfo(address.host, address.port, type=socket.SOCK_DGRAM)
    family, kind, proto, _, peer = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sock.connect(peer)
    except BaseException:
        sock.close()
        raise
    return DatagramTransport(sock, (str(peer[0]), int(peer[1])), cast(DatagramCore, core))
