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

When no connected backend supports RFC 8441 and the route allows it, the WebSocket gets a
dedicated HTTP/1.1 connection instead (counted as ``websocket_fallback_http1``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import h11

from ..core.frontend_h11 import ClientSession, RequestHead
from ..core.headers import Header, request_to_h2, response_from_h2
from ..core.relay import StreamState
from ..core.websocket import FrameWatcher, check_handshake, connect_head, switching_protocols
from ..errors import BackendError, BackendUnavailable, ClientError, NoExtendedConnect
from .backend import NETWORK_ERRORS, BackendConnection, Signal
from .detached import DetachedTunnel
from .exchange import ClientGone, Exchange
from .fast_stream import FastStream

if TYPE_CHECKING:
    from ..config import RouteConfig
    from .client import ClientConnection
    from .pool import ClusterPool

log = logging.getLogger("muxproxy.tunnel")

_SPENT = ClientSession()  # what a detached client connection keeps instead of its session


class Tunnel(Exchange):
    def __init__(
        self, client: ClientConnection, head: RequestHead, route: RouteConfig, pool: ClusterPool
    ) -> None:
        super().__init__(client, head, route, pool)
        self.key = b""
        self._scope: anyio.CancelScope | None = None
        self.tunnelling = False

    def on_deadline(self) -> None:
        if self.tunnelling:  # tunnel_idle_timeout: nothing moved either way
            if self._scope is not None:
                self._scope.cancel()
            return
        super().on_deadline()

    connect_protocol = True

    def _fields(self) -> list[Header]:
        head = self.head
        return connect_head(head.target, head.authority, head.headers, self.client.fwd)

    async def _forward(self) -> None:
        head = self.head
        self.client.must_close = True  # after a WebSocket, whatever happens, the connection ends
        if head.has_body:
            raise ClientError("a WebSocket upgrade request cannot carry a body")
        self.key = check_handshake(head.method, head.http_version, head.headers)
        if not self.pool.protocol.multiplexed:  # http1: each WebSocket has its own connection
            self._reserve_dedicated()
            await self._fallback_http1()
            return
        try:
            await super()._forward()
        except NoExtendedConnect:
            if not self.route.websocket_fallback_http1:
                raise
            await self._fallback_http1()

    async def _attempt(self, conn: BackendConnection, st: StreamState, body: object) -> None:
        news = Signal(conn.loop)
        self._news = news
        conn.news[st.stream_id] = news
        try:
            await self._await_head(st, news)
            assert st.headers is not None
            status, headers = response_from_h2(st.headers)
            if not 200 <= status < 300:  # refused upgrade: an ordinary response, no switch
                await self._relay_response(conn, st, news, status, headers)
                return
            self.pool.counters["websockets"] += 1
            client = self.client
            await client.send(switching_protocols(self.key, headers))
            if isinstance(client.stream, FastStream):
                # asyncio: callbacks drive the tunnel from here, and this task ends.
                tunnel = DetachedTunnel(
                    client.stream,
                    conn,
                    st,
                    wheel=client.wheel,
                    idle_timeout=self.cfg.tunnel_idle_timeout,
                    send_timeout=client.limits.send_timeout,
                    on_finished=client.forget,
                )
                client.detached = tunnel
                self.tunnelling = True
                first = client.session.detach()
                client.session = _SPENT  # the HTTP/1.1 session is over; an idle tunnel is small
                tunnel.start(first)
                return
            await self._relay(conn, st, news)
        finally:
            if self.client.detached is None:  # else the detached tunnel releases it
                conn.release(st)

    async def _relay(self, conn: BackendConnection, st: StreamState, news: Signal) -> None:
        self.tunnelling = True
        wheel = self.client.wheel
        idle = self.cfg.tunnel_idle_timeout
        wheel.start(self, idle)
        up, down = FrameWatcher(), FrameWatcher()
        with anyio.CancelScope() as scope:
            self._scope = scope
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._upstream, conn, st, news, up, down)
                await self._downstream(conn, st, news, up, down)
                tg.cancel_scope.cancel()

    async def _upstream(
        self,
        conn: BackendConnection,
        st: StreamState,
        news: Signal,
        up: FrameWatcher,
        down: FrameWatcher,
    ) -> None:
        """Client → backend.  Ends with END_STREAM after a close frame, else RST(CANCEL)."""
        client, core, sid = self.client, conn.core, st.stream_id
        window = Signal(conn.loop)
        data = client.session.detach()  # bytes the client sent right after its handshake
        try:
            while True:
                if not data:
                    data = await client.receive()
                    if not data:  # EOF
                        if up.closed and sid in core.streams:
                            core.end_stream(sid)  # half-close after the close frame
                            conn.schedule_flush()
                            return
                        break  # vanished without a close handshake
                client.wheel.start(self, self.cfg.tunnel_idle_timeout)
                up.feed(data)
                if not await conn.send_body(sid, data, window):
                    return
                data = b""
                if up.closed and down.closed:
                    break  # close handshake done both ways: end the stream now
        except ClientGone:
            pass
        self.failure = ClientGone()  # the downstream side ends the stream (RST) and the tunnel
        news.set()

    async def _downstream(
        self,
        conn: BackendConnection,
        st: StreamState,
        news: Signal,
        up: FrameWatcher,
        down: FrameWatcher,
    ) -> None:
        """Backend → client, credit given back once written."""
        client, core, sid, chunks = self.client, conn.core, st.stream_id, st.chunks
        while True:
            finished = st.ended
            credit = 0
            out = []
            for data, n in chunks:
                credit += n
                if data:
                    out.append(data)
                    down.feed(data)
            chunks.clear()
            if out:
                client.wheel.start(self, self.cfg.tunnel_idle_timeout)
                try:
                    await client.send(b"".join(out))
                finally:
                    core.consumed(sid, credit)
                    conn.schedule_flush()
            elif credit:
                core.consumed(sid, credit)
            if finished or st.reset_code is not None or self.failure is not None:
                return  # release() resets the stream if it is still open
            if up.closed and down.closed and not chunks:
                return
            await news.wait()

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
            (b"sec-websocket-key", self.key),
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
            await client.send(_h1_head(response))
            rest, _ = h1.trailing_data
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._splice_to_client, stream, bytes(rest), tg.cancel_scope)
                await self._splice_to_backend(stream)
                tg.cancel_scope.cancel()
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

    async def _splice_to_client(
        self, stream: anyio.abc.ByteStream, first: bytes, scope: anyio.CancelScope
    ) -> None:
        try:
            if first:
                await self.client.send(first)
            while True:
                await self.client.send(await stream.receive())
        except (ClientGone, *NETWORK_ERRORS):
            pass
        scope.cancel()

    async def _splice_to_backend(self, stream: anyio.abc.ByteStream) -> None:
        data = self.client.session.detach()
        try:
            while True:
                if data:
                    await stream.send(data)
                data = await self.client.receive()
                if not data:
                    return
        except (ClientGone, *NETWORK_ERRORS):
            return


def _h1_head(response: h11.Response | h11.InformationalResponse) -> bytes:
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (response.status_code, response.reason or b"Switching Protocols")
    ]
    for name, value in response.headers.raw_items():
        lines.append(name + b": " + value + b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


__all__ = ["Tunnel"]
