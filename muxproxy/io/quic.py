"""The QUIC wire of an HTTP/3 backend connection: aioquic driven from an anyio UDP socket.

:class:`DatagramTransport` is the :class:`~muxproxy.io.transport.Transport` of the HTTP/3 core:
``receive`` waits for one datagram with aioquic's ``get_timer()`` as its deadline and calls
``handle_timer(now)`` when it passes; ``flush`` sends ``datagrams_to_send(now)``.
``aioquic.asyncio`` is never imported, so this runs on asyncio and trio alike.
"""

from __future__ import annotations

import math
import ssl
from typing import Protocol, cast

import anyio
import anyio.abc
from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration

from ..config import Address, ClusterConfig
from ..core.backend_h3 import H3Backend
from ..core.relay import BackendCore, Update
from .transport import NETWORK_ERRORS, Transport


class DatagramCore(BackendCore, Protocol):
    """A protocol core fed datagrams, with a timer of its own (HTTP/3 over aioquic)."""

    def connect(self, addr: tuple[str, int], now: float) -> None: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> Update: ...
    def receive_datagram(self, data: bytes, addr: tuple[str, int], now: float) -> Update: ...
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


class DatagramTransport:
    """A connected UDP socket carrying a :class:`DatagramCore`."""

    __slots__ = ("_core", "_peer", "_sock")

    def __init__(
        self, sock: anyio.abc.ConnectedUDPSocket, peer: tuple[str, int], core: DatagramCore
    ) -> None:
        self._sock = sock
        self._peer = peer
        self._core = core

    def start(self, now: float) -> None:
        self._core.connect(self._peer, now)

    async def receive(self) -> tuple[Update, bool]:
        core = self._core
        timer = core.get_timer()
        wait = math.inf if timer is None else max(0.0, timer - anyio.current_time())
        with anyio.move_on_after(wait):
            try:
                data = await self._sock.receive()
            except NETWORK_ERRORS:
                return core.abort("backend connection lost"), False
            return core.receive_datagram(data, self._peer, anyio.current_time()), True
        return core.handle_timer(anyio.current_time()), False

    async def flush(self) -> bool:
        for datagram in self._core.datagrams_to_send(anyio.current_time()):
            await self._sock.send(datagram)
        return False

    async def aclose(self) -> None:
        await self._sock.aclose()


async def connect_datagram(
    address: Address,
    cfg: ClusterConfig,
    tls: ssl.SSLContext | None,
    alpn: str | None,
    core: BackendCore,
) -> Transport:
    """A connected UDP socket (QUIC brings its own TLS: ``tls`` and ``alpn`` are unused)."""
    sock = await anyio.create_connected_udp_socket(
        remote_host=address.host, remote_port=address.port
    )
    peer = sock.extra(anyio.abc.SocketAttribute.remote_address)
    return DatagramTransport(sock, (str(peer[0]), int(peer[1])), cast(DatagramCore, core))
