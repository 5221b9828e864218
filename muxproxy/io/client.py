"""One task per client connection, driving the sans-IO HTTP/1.1 session.

Requests are served one after the other (pipelined ones wait in the session's buffer), so
responses go out in request order.  Deadlines: ``idle_timeout`` while waiting for the first
byte of a request (then the connection just closes), ``header_timeout`` for the whole head from
its first byte (408: slowloris gets nowhere by trickling bytes), ``body_timeout`` between
request-body reads (408), ``send_timeout`` for each write to the client.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from ..config import ListenerConfig
from ..core.frontend_h11 import (
    CLOSED,
    NEED_DATA,
    Body,
    ClientSession,
    EndOfRequest,
    HeadLimits,
    RequestHead,
)
from ..core.headers import Forwarding
from ..errors import ClientError, ProxyError
from .backend import NETWORK_ERRORS
from .exchange import ClientGone, Exchange

if TYPE_CHECKING:
    from .server import Proxy

log = logging.getLogger("muxproxy.client")


class ClientConnection:
    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        listener: ListenerConfig,
        proxy: Proxy,
        peer: tuple[str, int],
    ) -> None:
        self.stream = stream
        self.listener = listener
        self.proxy = proxy
        lim = listener.limits
        self.limits = lim
        self.session = ClientSession(
            HeadLimits(lim.max_header_bytes, lim.max_headers, lim.max_uri_bytes, lim.max_body)
        )
        ip = peer[0]
        self.fwd = Forwarding(
            client_ip=ip,
            scheme=b"https" if listener.tls else b"http",
            trusted=proxy.is_trusted(listener, ip),
        )
        self.must_close = False
        self.idle_scope: anyio.CancelScope | None = None  # cancelled by a graceful shutdown

    async def run(self) -> None:
        session = self.session
        try:
            while True:
                head = await self._read_head()
                if head is None:
                    return
                if not head.has_body:
                    end = session.next_event()  # h11 emits it at once for a bodiless request
                    assert type(end) is EndOfRequest, end
                route = self.proxy.router.match(head.authority, head.target)
                if route is None:
                    await self.send_error(ProxyError("no route for this host and path", 404))
                else:
                    await Exchange(self, head, route, self.proxy.pools[route.cluster]).run()
                if self.must_close or self.proxy.draining or not session.start_next_cycle():
                    return
        except ClientGone:
            pass
        except ClientError as exc:
            await self._send_error_quietly(exc)
        finally:
            with anyio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _read_head(self) -> RequestHead | None:
        """The next request head; None when the connection should just close."""
        session = self.session
        deadline = None
        while True:
            try:
                ev = session.next_event()
            except ClientError as exc:
                await self._send_error_quietly(exc)
                return None
            if type(ev) is RequestHead:
                return ev
            if ev is CLOSED:
                return None
            assert ev is NEED_DATA
            if session.head_started:
                if deadline is None:
                    deadline = anyio.current_time() + self.limits.header_timeout
                with anyio.CancelScope(deadline=deadline) as scope:
                    data = await self._receive()
                if scope.cancelled_caught:
                    await self._send_error_quietly(
                        ClientError("request head not received within header_timeout", 408)
                    )
                    return None
            else:
                if self.proxy.draining:
                    return None
                with anyio.move_on_after(self.limits.idle_timeout) as scope:
                    self.idle_scope = scope
                    data = await self._receive()
                self.idle_scope = None
                if scope.cancel_called:
                    return None
            session.receive_data(data)

    async def _receive(self) -> bytes:
        try:
            return await self.stream.receive(65536)
        except anyio.EndOfStream:
            return b""
        except NETWORK_ERRORS:
            raise ClientGone from None

    async def read_body(self) -> Body | EndOfRequest:
        """The next piece of the request body.  Raises ClientError (4xx) or ClientGone."""
        session = self.session
        while True:
            ev = session.next_event()
            if ev is NEED_DATA:
                with anyio.move_on_after(self.limits.body_timeout) as scope:
                    data = await self._receive()
                if scope.cancelled_caught:
                    raise ClientError("request body stalled past body_timeout", 408)
                session.receive_data(data)
                continue
            assert type(ev) is Body or type(ev) is EndOfRequest, ev
            return ev

    async def send(self, data: bytes) -> None:
        """Write to the client within ``send_timeout``.  Raises ClientGone."""
        try:
            with anyio.fail_after(self.limits.send_timeout):
                await self.stream.send(data)
        except TimeoutError:
            raise ClientGone("client stopped reading") from None
        except NETWORK_ERRORS:
            raise ClientGone from None

    async def send_error(self, exc: ProxyError) -> None:
        """Answer a proxy-generated error with its short reason; close if not clean."""
        if isinstance(exc, ClientError):
            self.must_close = True
        if exc.status_hint >= 500:
            log.info(
                "%s %s → %d %s",
                self.session.request.method.decode() if self.session.request else "-",
                self.session.request.target.decode("latin-1")[:200]
                if self.session.request
                else "-",
                exc.status_hint,
                exc.reason,
            )
        data = self.session.error_response(exc.status_hint, exc.reason)
        if not self.session.request_complete:
            self.must_close = True
        if data:
            await self.send(data)
        else:
            self.must_close = True  # the response had started: only closing can signal failure

    async def _send_error_quietly(self, exc: ProxyError) -> None:
        try:
            await self.send_error(exc)
        except ClientGone:
            pass
