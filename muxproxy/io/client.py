"""One task per client connection, driving the sans-IO HTTP/1.1 session.

Requests are served one after the other (pipelined ones wait in the session's buffer), so
responses go out in request order.  Deadlines: ``idle_timeout`` while waiting for the first
byte of a request (then the connection just closes), ``header_timeout`` for the whole head from
its first byte (408: slowloris gets nowhere by trickling bytes), ``body_timeout`` between
request-body reads (408), ``send_timeout`` for each write to the client.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from ..config import Limits, ListenerConfig
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
from ..core.outcome import Outcome
from ..core.websocket import is_upgrade
from ..errors import BackendTimeout, BackendUnavailable, ClientError, ProxyError
from .backend import NETWORK_ERRORS
from .exchange import ClientGone, Exchange
from .fast_stream import FastStream
from .tunnel import Tunnel

if TYPE_CHECKING:
    from .detached import DetachedTunnel
    from .server import Proxy

log = logging.getLogger("muxproxy.client")


_UNLISTED: set[ClientConnection] = set()


@functools.cache
def _head_limits(lim: Limits) -> HeadLimits:
    """One HeadLimits per listener's limits, shared by its connections."""
    return HeadLimits(
        lim.max_header_bytes,
        lim.max_headers,
        lim.max_uri_bytes,
        lim.max_body,
        underscore_headers=lim.underscore_headers,
    )


class _Timer:
    """One deadline of a client connection; when it passes, the connection is cancelled."""

    __slots__ = ("conn", "deadline", "kind", "timer_bucket")

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.deadline = math.inf
        self.timer_bucket: int | None = None
        self.kind = ""

    def on_deadline(self) -> None:
        self.conn.timed_out = self.kind
        scope = self.conn.scope
        if scope is not None:
            scope.cancel()


class ClientConnection:
    # Slots: an idle WebSocket keeps its ClientConnection, and a __dict__ would double its size.
    __slots__ = (
        "detached",
        "fwd",
        "idle",
        "limits",
        "listener",
        "must_close",
        "open_here",
        "outcome",
        "peer",
        "proxy",
        "read_timer",
        "scope",
        "session",
        "stream",
        "timed_out",
        "wheel",
        "write_timer",
    )

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
        self.wheel = proxy.wheel
        lim = listener.limits
        self.limits = lim
        self.session = ClientSession(_head_limits(lim))
        ip = peer[0]
        self.fwd = Forwarding(
            client_ip=ip,
            scheme=b"https" if listener.tls else b"http",
            trusted=proxy.is_trusted(listener, ip),
        )
        self.must_close = False
        self.idle = False  # waiting for the first byte of a request: a shutdown may close it
        # Cancelled by a passed deadline or a shutdown; exists while run() runs.
        self.scope: anyio.CancelScope | None = None
        self.timed_out = ""  # which deadline passed: idle, header, body or send
        self.read_timer = _Timer(self)
        self.write_timer = _Timer(self)
        self.write_timer.kind = "send"
        # Set when a WebSocket tunnel took the connection over (asyncio): this task ends, the
        # tunnel closes the socket and calls ``forget`` when it is done.
        self.detached: DetachedTunnel | None = None
        # Its listener's connections, set by server.py (a shared empty set until then: an
        # idle WebSocket should not pay for a set of its own).
        self.open_here: set[ClientConnection] = _UNLISTED
        self.peer = peer
        # The record of the request in progress, when someone records (proxy.recorders).
        self.outcome: Outcome | None = None

    def _begin(self, head: RequestHead | None) -> None:
        """A request (or a refused attempt at one) starts: open its record."""
        if not self.proxy.recorders:
            return
        o = self.outcome = Outcome(time.time(), time.monotonic(), self.listener.name)
        o.client_addr, o.client_port = self.peer[0], self.peer[1]
        if head is not None:
            o.method = head.method.decode("latin-1")
            o.authority = head.authority.decode("latin-1")
            o.path = head.target.decode("latin-1")
            o.protocol = f"HTTP/{head.http_version.decode('latin-1')}"

    def _finish(self) -> None:
        """The request or tunnel is over: hand its record to the recorders, once."""
        o = self.outcome
        if o is not None:
            self.outcome = None
            o.end = time.monotonic()
            self.proxy.record(o)

    def forget(self) -> None:
        """Called by a detached tunnel when it has closed the connection."""
        self.proxy.forget(self)

    async def run(self) -> None:
        try:
            with anyio.CancelScope() as self.scope:
                await self._serve()
            self.scope = None
            if self.timed_out in ("header", "body"):
                what = "request head" if self.timed_out == "header" else "request body"
                if self.outcome is None:
                    self._begin(self.session.request)
                with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                    await self._send_error_quietly(ClientError(f"{what} not received in time", 408))
        finally:
            self._finish()
            self.wheel.discard(self.read_timer)
            self.wheel.discard(self.write_timer)
            if self.detached is None:
                with anyio.CancelScope(shield=True):
                    await self.stream.aclose()

    async def _serve(self) -> None:
        session = self.session
        try:
            while True:
                head = await self._read_head()
                if head is None:
                    return
                if not head.has_body:
                    end = session.next_event()  # h11 emits it at once for a bodiless request
                    assert type(end) is EndOfRequest, end
                self._begin(head)
                route = self.proxy.router.match(head.authority, head.target)
                if route is None:
                    await self.send_error(ProxyError("no route for this host and path", 404))
                else:
                    if self.outcome is not None:
                        self.outcome.cluster = route.cluster
                        self.outcome.route = f"{route.host}{route.path_prefix}"
                    if route.websocket and is_upgrade(head.headers):
                        await Tunnel(self, head, route, self.proxy.pools[route.cluster]).run()
                    else:
                        await Exchange(self, head, route, self.proxy.pools[route.cluster]).run()
                self._finish()
                if self.must_close or self.proxy.draining or not session.start_next_cycle():
                    return
        except ClientGone:
            pass
        except ClientError as exc:
            await self._send_error_quietly(exc)

    async def _read_head(self) -> RequestHead | None:
        """The next request head; None when the connection should just close."""
        session = self.session
        timer = self.read_timer
        timer.kind = ""
        while True:
            try:
                ev = session.next_event()
            except ClientError as exc:
                self._begin(None)  # refused before a head existed: logged all the same
                await self._send_error_quietly(exc)
                return None
            if type(ev) is RequestHead:
                self.wheel.clear(timer)
                return ev
            if ev is CLOSED:
                return None
            assert ev is NEED_DATA
            if session.head_started:
                if timer.kind != "header":  # from the first byte: trickling does not extend it
                    timer.kind = "header"
                    self.wheel.start(timer, self.limits.header_timeout)
                data = await self.receive()
            else:
                if self.proxy.draining:
                    return None
                timer.kind = "idle"
                self.wheel.start(timer, self.limits.idle_timeout)
                self.idle = True
                try:
                    data = await self.receive()
                finally:
                    self.idle = False
            session.receive_data(data)

    async def receive(self) -> bytes:
        try:
            return await self.stream.receive(65536)
        except anyio.EndOfStream:
            return b""
        except NETWORK_ERRORS:
            raise ClientGone from None

    async def read_body(self) -> Body | EndOfRequest:
        """The next piece of the request body.  Raises ClientError (4xx) or ClientGone;
        no progress within ``body_timeout`` ends the connection with a 408."""
        session = self.session
        while True:
            ev = session.next_event()
            if ev is NEED_DATA:
                timer = self.read_timer
                timer.kind = "body"
                self.wheel.start(timer, self.limits.body_timeout)
                data = await self.receive()
                self.wheel.clear(timer)
                session.receive_data(data)
                continue
            assert type(ev) is Body or type(ev) is EndOfRequest, ev
            return ev

    async def send(self, data: bytes) -> None:
        """Write to the client; one that reads nothing for ``send_timeout`` is dropped.
        Raises ClientGone."""
        stream = self.stream
        try:
            if isinstance(stream, FastStream):
                if stream.write_nowait(data):
                    return  # the kernel took it all: nothing to time
                pending = stream.drained()
            else:
                pending = stream.send(data)
        except NETWORK_ERRORS:
            raise ClientGone from None
        timer = self.write_timer
        self.wheel.start(timer, self.limits.send_timeout)
        try:
            await pending
        except NETWORK_ERRORS:
            raise ClientGone from None
        finally:
            self.wheel.clear(timer)

    async def send_error(self, exc: ProxyError) -> None:
        """Answer a proxy-generated error with its short reason; close if not clean."""
        if isinstance(exc, ClientError):
            self.must_close = True
        o = self.outcome
        if o is not None:
            o.status = exc.status_hint
            o.reason = _reason(exc, self.timed_out)
            o.detail = exc.reason
        if exc.status_hint >= 500:
            req = self.session.request
            log.info(
                "%s %s -> %d %s",
                req.method.decode() if req else "-",
                req.target.decode("latin-1")[:200] if req else "-",
                exc.status_hint,
                exc.reason,
            )
        data = self.session.error_response(exc.status_hint, exc.reason, exc.headers)
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


def _reason(exc: ProxyError, timed_out: str) -> str:
    """The access log's reason code (core/outcome.REASONS) for a proxy-made answer."""
    status = exc.status_hint
    if status == 404:
        return "no_route"
    if status == 408:
        return "body_timeout" if timed_out == "body" else "header_timeout"
    if status in (413, 414, 431):
        return "refused_limit"
    if isinstance(exc, ClientError):
        return "refused_malformed"
    if isinstance(exc, BackendTimeout):
        return "upstream_timeout"
    if isinstance(exc, BackendUnavailable):
        if "pending_timeout" in exc.reason:
            return "pending_timeout"
        return "queue_full" if "too many" in exc.reason else "no_backend"
    return "backend_malformed" if "cannot be relayed" in exc.reason else "backend_reset"
