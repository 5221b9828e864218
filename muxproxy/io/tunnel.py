"""WebSocket tunnels: one client upgrade = one extended CONNECT stream on the pool.

After the backend's 2xx, bytes flow both ways as DATA with flow control: the client is read
only as the stream's send window allows, and backend DATA is acknowledged only after it was
written to the client.  A tunnel ends when

* the close handshake has passed both ways (watched from frame headers): RST_STREAM(CANCEL),
  because some backends forget the stream without ending it;
* the client goes away without a close handshake: RST_STREAM(CANCEL) at once;
* the client half-closes after its close frame: END_STREAM, and the backend's answer is still
  relayed;
* the backend ends or resets the stream: the client connection is closed;
* nothing moved either way for ``tunnel_idle_timeout``.

These rules are :class:`~muxproxy.core.tunnel.TunnelCore`'s; this module makes the tunnel
(handshake, extended CONNECT or the fallback below) and hands it to a driver that only moves
bytes: :class:`~muxproxy.io.detached.DetachedTunnel` (callbacks: a plain-TCP client, on
asyncio or trio) or :class:`~muxproxy.io.tunnel_tasks.TaskTunnel` (two tasks: TLS and HTTP/2
clients).

When no connected backend supports RFC 8441 and the route allows it, the WebSocket gets a
dedicated HTTP/1.1 connection instead (counted as ``websocket_fallback_http1``), as it always
does on an ``http1`` cluster; :func:`~muxproxy.io.tunnel_tasks.relay_socket` relays it.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import h11

from ..core.frontend_h11 import RequestHead
from ..core.headers import Header, request_to_h2
from ..core.relay import StreamState
from ..core.websocket import check_handshake, connect_head, switching_protocols
from ..errors import (
    BackendError,
    BackendUnavailable,
    ClientError,
    ClientGone,
    NoExtendedConnect,
    ProxyError,
)
from .backend import NETWORK_ERRORS, BackendConnection, Signal
from .detached import DetachedTunnel
from .downstream import TunnelDownstream
from .exchange import Exchange
from .tunnel_tasks import StreamPort, TaskTunnel, relay_socket

if TYPE_CHECKING:
    from ..router import Route
    from .pool import ClusterPool

log = logging.getLogger("muxproxy.tunnel")

_NEGOTIATED = (b"sec-websocket-protocol", b"sec-websocket-extensions")
# What an open tunnel's stream keeps of the backend's response head once it was relayed: the
# connection core only asks whether a head came (and a content-length check reads the
# status), so every tunnel shares this one instead of holding its decoded head (~200 bytes
# per idle WebSocket).  Never mutated.
_RELAYED_HEAD: list[Header] = [(b":status", b"200")]


class Tunnel:
    """One WebSocket: an :class:`Exchange` opens the extended CONNECT stream (queueing,
    replays, a refused upgrade relayed as an ordinary response); a 2xx hands the stream here."""

    def __init__(
        self, client: TunnelDownstream, head: RequestHead, route: Route, pool: ClusterPool
    ) -> None:
        self.client = client
        self.head = head
        self.route = route
        self.pool = pool
        self.cfg = pool.cfg
        self.key = b""
        self.exchange = Exchange(
            client, head, route, pool, fields=[], connect_protocol=True, upgrade=self._upgraded
        )

    async def run(self) -> bool:
        """Relay the upgrade and the tunnel.  After a WebSocket, whatever happens, the client
        connection ends: returns False."""
        client = self.client
        try:
            await self._forward()
        except ClientGone:
            pass
        except ProxyError as exc:
            await client.send_error(exc)
        finally:
            client.wheel.discard(self.exchange)
            self.exchange.upgrade = None  # (a cycle through the bound method otherwise)
        return False

    async def _forward(self) -> None:
        head = self.head
        if head.http_version == b"2":  # extended CONNECT (checked by core/h2guard.py)
            self.key = b""
        else:
            if head.has_body:
                raise ClientError("a WebSocket upgrade request cannot carry a body")
            self.key = check_handshake(head.method, head.http_version, head.headers)
        if not self.pool.protocol.multiplexed:  # http1: each WebSocket has its own connection
            self._reserve_dedicated()
            await self._fallback_http1()
            return
        fields = connect_head(head.target, head.authority, head.headers, self.client.fwd)
        self.exchange.fields = fields
        try:
            await self.exchange.forward()
        except NoExtendedConnect:
            if not self.route.config.websocket_fallback_http1:
                raise
            await self._fallback_http1()

    async def _upgraded(
        self, conn: BackendConnection, st: StreamState, news: Signal, headers: Sequence[Header]
    ) -> bool:
        """The backend accepted the tunnel.  True when the tunnel released the stream itself
        (a detached one, or one that ended by its rules)."""
        self.pool.counters["websockets"] += 1
        client = self.client
        await self._accept(headers)
        st.headers = _RELAYED_HEAD
        idle, send_timeout = self.cfg.tunnel_idle_timeout, client.send_timeout
        stream = client.fast_stream
        if stream is not None:
            # a plain-TCP client: callbacks drive the tunnel from here, and this task ends.
            tunnel = DetachedTunnel(
                stream,
                conn,
                st,
                wheel=client.wheel,
                idle_timeout=idle,
                send_timeout=send_timeout,
                owner=client,
            )
            tunnel.start(client.detach(tunnel))
            return True
        client.outcome.reason = await TaskTunnel(
            client,
            StreamPort(conn, st, news),
            wheel=client.wheel,
            idle_timeout=idle,
            send_timeout=send_timeout,
        ).run(client.leftover())
        return st.stream_id not in conn.news

    async def _accept(self, headers: Sequence[Header]) -> None:
        """Tell the client its WebSocket is open: 101 (HTTP/1.1), or 200 on an HTTP/2
        extended CONNECT stream (RFC 8441 §5: no Sec-WebSocket-Accept)."""
        client = self.client
        if self.key:
            await client.send(switching_protocols(self.key, headers))
            client.outcome.status = 101
        else:
            client.send_head(200, [f for f in headers if f[0] in _NEGOTIATED])
            await client.flush()
        client.outcome.reason = "tunnel_closed"

    # --- the HTTP/1.1 fallback --------------------------------------------------------------

    def _reserve_dedicated(self) -> None:
        """On an http1 cluster, dedicated Upgrade connections count against max_connections
        (per backend, with the pooled ones): 503 when the budget is spent."""
        pool, cap = self.pool, self.cfg.max_connections
        if cap is None:
            return
        pooled = sum(len(b.conns) + len(b.draining) for b in pool.backends)
        if pooled + pool.counters["websocket_fallback_http1_open"] >= cap * len(pool.backends):
            raise BackendUnavailable("max_connections reached: no connection for a WebSocket")

    async def _fallback_http1(self) -> None:
        """A dedicated HTTP/1.1 connection for this WebSocket (backend lacks RFC 8441)."""
        client, head, pool = self.client, self.head, self.pool
        # An HTTP/2 client sent no key: the backend gets one of ours.
        key = None if self.key else base64.b64encode(os.urandom(16))
        addr = pool.pick_backend()
        h1 = h11.Connection(h11.CLIENT)
        fields = [
            (n, v)
            for n, v in request_to_h2(
                head.method,
                head.target,
                head.authority,
                head.headers,
                client.fwd,
                extra_drop=frozenset({b"sec-websocket-key"}),
            )
            if n[:1] != b":"
        ]
        fields += [
            (b"host", head.authority),
            (b"connection", b"Upgrade"),
            (b"upgrade", b"websocket"),
            (b"sec-websocket-key", key or self.key),
        ]
        try:
            with anyio.fail_after(self.cfg.connect_timeout):
                stream = await anyio.connect_tcp(addr.host, addr.port)
        except (TimeoutError, *NETWORK_ERRORS) as exc:
            raise BackendError(f"WebSocket fallback to {addr} failed: {exc!r}") from None
        pool.counters["websocket_fallback_http1"] += 1
        pool.counters["websocket_fallback_http1_open"] += 1
        try:
            await stream.send(
                h1.send(h11.Request(method=b"GET", target=head.target, headers=fields))
            )
            response = await self._read_h1_head(h1, stream)
            if response.status_code != 101:
                raise BackendError(
                    f"backend refused the WebSocket upgrade ({response.status_code})"
                )
            if key is None:
                await client.send(_h1_head(response))
                client.outcome.status = 101
                client.outcome.reason = "tunnel_closed"
            else:
                await self._accept([(n.lower(), v) for n, v in response.headers.raw_items()])
            rest, _ = h1.trailing_data
            client.outcome.reason = await relay_socket(
                client,
                stream,
                wheel=client.wheel,
                idle_timeout=self.cfg.tunnel_idle_timeout,
                send_timeout=client.send_timeout,
                client_first=client.leftover(),
                backend_first=bytes(rest),
            )
        finally:
            pool.counters["websocket_fallback_http1_open"] -= 1
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    async def _read_h1_head(self, h1: h11.Connection, stream: anyio.abc.ByteStream) -> h11.Response:
        with anyio.fail_after(self.cfg.request_timeout):
            while True:
                ev = h1.next_event()
                if ev is h11.NEED_DATA:
                    try:
                        h1.receive_data(await stream.receive())
                    except anyio.EndOfStream:
                        h1.receive_data(b"")
                    continue
                if isinstance(ev, h11.InformationalResponse | h11.Response):
                    return ev  # type: ignore[return-value]
                raise BackendError("backend closed the WebSocket fallback connection")


def _h1_head(response: h11.Response | h11.InformationalResponse) -> bytes:
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (response.status_code, response.reason or b"Switching Protocols")
    ]
    for name, value in response.headers.raw_items():
        lines.append(name + b": " + value + b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


__all__ = ["Tunnel"]
