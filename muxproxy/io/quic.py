"""One pooled HTTP/3 backend connection: aioquic driven from an anyio connected UDP socket.

Same shape as the HTTP/2 connection it subclasses — one reader task, one batching writer task —
with datagrams for bytes: the reader receives with aioquic's ``get_timer()`` as its deadline
and calls ``handle_timer(now)`` when it passes; the writer sends ``datagrams_to_send(now)``.
``aioquic.asyncio`` is never imported, so this runs on asyncio and trio alike.
"""

from __future__ import annotations

import math
import ssl

import anyio
import anyio.abc
from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration

from ..core.backend_h3 import H3Backend
from ..core.relay import BackendCore, Update
from ..errors import BackendUnavailable
from .backend import NETWORK_ERRORS, BackendConnection, _describe


def quic_configuration(conn: BackendConnection) -> QuicConfiguration:
    """TLS 1.3 for the QUIC handshake: ALPN h3, the certificate verified unless configured off."""
    tls = conn.cfg.tls
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=H3_ALPN,
        server_name=tls.server_name or conn.address.host,
        verify_mode=ssl.CERT_REQUIRED if tls.verify else ssl.CERT_NONE,
        idle_timeout=max(60.0, 3 * conn.cfg.ping_interval),
        max_stream_data=conn.cfg.stream_window,
    )
    if tls.ca:
        config.load_verify_locations(cafile=tls.ca)
    return config


class QuicBackendConnection(BackendConnection):
    """A persistent HTTP/3 connection to one backend, shared by many exchanges."""

    _sock: anyio.abc.ConnectedUDPSocket | None = None

    def _make_core(self) -> BackendCore:
        return H3Backend(
            quic_configuration(self),
            max_streams=self.cfg.max_streams_per_connection,
            stream_window=self.cfg.stream_window,
            slow_client_grace=self.cfg.slow_client_timeout,
        )

    @property
    def h3core(self) -> H3Backend:
        assert isinstance(self.core, H3Backend)
        return self.core

    async def connect(self) -> None:
        """QUIC + TLS handshake and the peer's HTTP/3 SETTINGS, within connect_timeout."""
        addr = self.address
        core = self.h3core
        try:
            with anyio.fail_after(self.cfg.connect_timeout):
                self._sock = await anyio.create_connected_udp_socket(
                    remote_host=addr.host, remote_port=addr.port
                )
                peer = self._sock.extra(anyio.abc.SocketAttribute.remote_address)
                self._peer = (str(peer[0]), int(peer[1]))
                core.connect(self._peer, anyio.current_time())
                await self._send_datagrams()
                while not core.settings_received:
                    up, _ = await self._receive_once()
                    if up.closed:
                        raise BackendUnavailable(f"backend {addr}: {core.close_reason}")
                    await self._send_datagrams()
        except TimeoutError:
            await self._abort()
            raise BackendUnavailable(f"backend {addr} QUIC handshake timed out") from None
        except NETWORK_ERRORS as exc:
            await self._abort()
            raise BackendUnavailable(f"backend {addr} unreachable: {_describe(exc)}") from None
        except BaseException:
            await self._abort()
            raise

    async def _aclose_transport(self) -> None:
        if self._sock is not None:
            await self._sock.aclose()

    async def _receive_once(self) -> tuple[Update, bool]:
        """One datagram, or aioquic's timer: (what changed, whether the peer spoke)."""
        assert self._sock is not None
        core = self.h3core
        timer = core.get_timer()
        wait = math.inf if timer is None else max(0.0, timer - anyio.current_time())
        with anyio.move_on_after(wait):
            try:
                data = await self._sock.receive()
            except NETWORK_ERRORS:
                return core.abort("backend connection lost"), False
            return core.receive_datagram(data, self._peer, anyio.current_time()), True
        return core.handle_timer(anyio.current_time()), False

    async def _send_datagrams(self) -> None:
        assert self._sock is not None
        for datagram in self.h3core.datagrams_to_send(anyio.current_time()):
            await self._sock.send(datagram)

    async def _reader(self) -> None:
        while True:
            up, alive = await self._receive_once()
            if self._dispatch(up, alive=alive):
                return

    async def _writer(self) -> None:
        try:
            while True:
                await self._flush.wait()
                try:
                    await self._send_datagrams()
                except NETWORK_ERRORS:
                    self.core.abort("backend connection lost")
                    self.retired.set()
                    self._wake_all()
                    return
                if self.core.closed:
                    await self._aclose_transport()
                    return
        finally:
            self._writer_done.set()
