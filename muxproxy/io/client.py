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
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

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
    ResponseFramingError,
)
from ..core.headers import Forwarding, Header
from ..core.outcome import Outcome
from ..errors import BackendError, ClientError, ProxyError
from .backend import NETWORK_ERRORS
from .dispatch import dispatch
from .downstream import ClientGone, ProxyHost
from .fast_stream import FastStream

if TYPE_CHECKING:
    from .detached import DetachedTunnel

log = logging.getLogger("muxproxy.client")


class ClientHost(ProxyHost, Protocol):
    """What an HTTP/1.1 connection needs beyond :class:`ProxyHost`: to be forgotten, and
    whether a drain lets an idle keep-alive connection make one more request."""

    @property
    def retiring(self) -> bool: ...
    def forget(self, client: ClientConnection) -> None: ...


_UNLISTED: set[ClientConnection] = set()
_SPENT = ClientSession()  # what a detached client connection keeps instead of its session
_NO_OUTCOME = Outcome(0.0, 0.0)  # between requests (never recorded)
_SPENT_OUT: list[bytes] = []  # (never written to: a detached connection queues nothing)
_SPENT_PEER = ("", 0)
_SPENT_FWD = Forwarding(client_ip="", scheme=b"http", trusted=False)


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


def _refusal_reason(exc: ProxyError, timed_out: str) -> str:
    """The outcome's reason code for a proxy-generated answer."""
    code = getattr(exc, "code", "")
    if code:
        return str(code)
    status = exc.status_hint
    if status == 408:
        return "body_timeout" if timed_out == "body" else "header_timeout"
    if status in (413, 414, 431):
        return "refused_limit"
    if status == 404:
        return "no_route"
    if status == 429:
        return "rate_limited"
    if isinstance(exc, ClientError):
        return "refused_malformed"
    if status == 504:
        return "upstream_timeout"
    if status == 503:
        return "no_backend"
    return "backend_lost"


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


_SPENT_TIMER = _Timer.__new__(_Timer)  # what a detached connection keeps: never armed
_SPENT_TIMER.deadline, _SPENT_TIMER.timer_bucket, _SPENT_TIMER.kind = math.inf, None, ""


class ClientConnection:
    """One HTTP/1.1 client connection: serves its requests in order, and is the
    :class:`~muxproxy.io.downstream.Downstream` (and ``TunnelDownstream``) of each."""

    # Slots: an idle WebSocket keeps its ClientConnection, and a __dict__ would double its size.
    __slots__ = (
        "_head",
        "_out",
        "detached",
        "direct",
        "fwd",
        "idle",
        "limits",
        "linger",
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
        proxy: ClientHost,
        peer: tuple[str, int],
        direct: str = "",
    ) -> None:
        self.stream = stream
        self.listener = listener
        self.proxy = proxy
        self.wheel = proxy.wheel
        self.peer = peer  # the client: the PROXY header's source if there was one
        self.direct = direct  # the TCP peer (an L4 balancer) when it is not the client
        lim = listener.limits
        self.limits = lim
        self.session = ClientSession(_head_limits(lim))
        ip = peer[0]
        self.fwd = Forwarding(
            client_ip=ip,
            scheme=b"https" if listener.tls else b"http",
            trusted=proxy.is_trusted(listener, ip),
            mode=listener.forwarded,
        )
        self.idle = False  # waiting for the first byte of a request: a shutdown may close it
        # Cancelled by a passed deadline or a shutdown; exists while run() runs.
        self.scope: anyio.CancelScope | None = None
        self.timed_out = ""  # which deadline passed: idle, header, body or send
        self.read_timer = _Timer(self)
        self.write_timer = _Timer(self)
        self.write_timer.kind = "send"
        # Set when a WebSocket tunnel took the connection over (plain TCP): this task ends, the
        # tunnel closes the socket and calls ``forget`` when it is done.
        self.detached: DetachedTunnel | None = None
        # Its listener's connections, set by server.py (a shared empty set until then: an
        # idle WebSocket should not pay for a set of its own).
        self.open_here: set[ClientConnection] = _UNLISTED
        # Set by a reload that removed this connection's listener: close after this request.
        self.must_close = False
        # The current request's record, until it is handed over (_NO_OUTCOME: none).
        self.outcome = _NO_OUTCOME
        # What the outcome's text fields are made from, only when someone listens.
        self._head: RequestHead | None = None
        self._out: list[bytes] = []  # response bytes queued by send_head/send_data/end
        self.linger = False  # closing after a refusal: drain what the client still sends

    # --- the downstream interface (see downstream.py) ---------------------------------------

    @property
    def body_timeout(self) -> float:
        return self.limits.body_timeout

    @property
    def send_timeout(self) -> float:
        return self.limits.send_timeout

    @property
    def fast_stream(self) -> FastStream | None:
        stream = self.stream
        return stream if isinstance(stream, FastStream) else None

    async def send_continue(self) -> None:
        cont = self.session.continue_bytes()
        if cont:
            await self.send(cont)

    def send_head(self, status: int, headers: Sequence[Header]) -> None:
        if self.must_close or self.proxy.draining:
            self.session.close_after_response()  # ("connection: close": not reused)
        try:
            self._out.append(self.session.response_head(status, headers))
        except ResponseFramingError as exc:
            raise BackendError(f"backend response cannot be relayed: {exc}") from None
        self.outcome.status = status

    def send_data(self, data: bytes) -> bool:
        try:
            out = self.session.response_body(data)
        except ResponseFramingError:
            self.outcome.reason = "backend_malformed"
            return False
        if out:
            self._out.append(out)
        return True

    def end(self, trailers: list[Header] | None) -> bool:
        session = self.session
        try:
            self._out.append(session.response_end(trailers))
        except ResponseFramingError:
            self.outcome.reason = "backend_malformed"
            return False
        return session.can_keep_alive

    def reset(self) -> bool:
        return False  # HTTP/1.1 has no way to cut one response but closing the connection

    async def flush(self) -> None:
        out = self._out
        if out:
            data = b"".join(out) if len(out) > 1 else out[0]
            out.clear()
            if data:
                await self.send(data)

    def leftover(self) -> bytes:
        return self.session.detach()

    def detach(self, tunnel: DetachedTunnel) -> bytes:
        self.detached = tunnel
        first = self.session.detach()
        # An idle tunnel should be small: the HTTP/1.1 session, the head and the output list
        # go; the outcome stays (text fields filled now) only if a recorder will want it.
        self.session = _SPENT
        self._out = _SPENT_OUT
        self.peer = _SPENT_PEER
        # Nor does it read or write through this object any more: its two timers (a cycle
        # each, back to this connection) and the forwarding facts go too (~0.2 KiB).
        wheel = self.wheel
        wheel.discard(self.read_timer)
        wheel.discard(self.write_timer)
        self.read_timer = self.write_timer = _SPENT_TIMER
        self.fwd = _SPENT_FWD
        if self.proxy.describe:
            self._describe(self.outcome)
        elif self.proxy.recorders:
            self._head = None
        else:
            self.outcome = _NO_OUTCOME
            self._head = None
        return first

    def local_authority(self) -> bytes:
        """``host:port`` this connection was accepted on (the target URI's authority when a
        request names none, RFC 9112 §3.3)."""
        addr = self.stream.extra(anyio.abc.SocketAttribute.local_address, None)
        if not isinstance(addr, tuple):
            return b""
        host, port = str(addr[0]), int(addr[1])
        return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode()

    def forget(self) -> None:
        """Called by a detached tunnel when it has closed the connection."""
        self._finish()
        self.proxy.forget(self)

    # --- the connection's life ----------------------------------------------------------------

    async def run(self) -> None:
        try:
            with anyio.CancelScope() as self.scope:
                await self._serve()
            self.scope = None
            if self.timed_out in ("header", "body"):
                if self.outcome is _NO_OUTCOME:  # a head that never completed is recorded too
                    self._begin(time.monotonic() - self.limits.header_timeout, None)
                what = "request head" if self.timed_out == "header" else "request body"
                with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                    await self._send_error_quietly(ClientError(f"{what} not received in time", 408))
            elif self.timed_out == "send" and self.outcome is not _NO_OUTCOME:
                self.outcome.reason = "send_timeout"
        finally:
            self.wheel.discard(self.read_timer)
            self.wheel.discard(self.write_timer)
            if self.detached is None:
                self._finish()
                with anyio.CancelScope(shield=True):
                    if self.linger:
                        await self._linger()
                    await self.stream.aclose()

    def _begin(self, start: float, head: RequestHead | None) -> Outcome:
        """A new outcome record for the request whose head started at ``start``.  (Its text
        fields are filled in ``_describe``, and only when a recorder listens.)"""
        peer = self.peer
        o = Outcome(0.0, start, self.listener.name, peer[0], peer[1], self.direct)
        self.outcome = o
        self._head = head
        return o

    def _describe(self, o: Outcome) -> None:
        """Fill the outcome's text fields from the request head, and let it go.  (Route and
        cluster are written by the dispatch as it decides them.)"""
        head = self._head
        if head is not None:
            o.method = head.method.decode("latin-1")
            o.authority = head.authority.decode("latin-1")
            o.path = head.target.decode("latin-1")
            if not o.protocol:
                o.protocol = "HTTP/1.1" if head.http_version == b"1.1" else "HTTP/1.0"
        self._head = None

    def _finish(self) -> None:
        """Hand the current request's outcome to the proxy's recorders, once."""
        o = self.outcome
        if o is not _NO_OUTCOME:
            self.outcome = _NO_OUTCOME
            proxy = self.proxy
            if proxy.recorders:
                o.end = now = time.monotonic()
                if proxy.describe:
                    self._describe(o)
                    o.wall_start = time.time() - (now - o.start)
                proxy.record(o)
            self._head = None

    async def _serve(self) -> None:
        session = self.session
        try:
            while True:
                head = await self._read_head()
                if head is None:
                    return
                if not head.has_body:
                    end = session.next_event()  # emitted at once for a bodiless request
                    assert type(end) is EndOfRequest, end
                if not head.authority:  # no Host (HTTP/1.0): RFC 9112 §3.3, our own address
                    head.authority = self.local_authority()
                route = self.proxy.router.route(head, self.listener)  # normalises head.target
                keep = await dispatch(self, head, route, self.proxy.pools)
                if self.detached is not None:
                    return  # the tunnel has the connection (and the outcome) now
                self._finish()
                # (Retiring: a response that began before the drain did not say "close", so
                # the client may already be sending the next request: that one is answered.)
                if (
                    not keep
                    or self.must_close
                    or (self.proxy.draining and not self.proxy.retiring)
                    or not session.start_next_cycle()
                ):
                    return
        except ClientGone:
            if self.outcome is not _NO_OUTCOME and not self.outcome.reason:
                self.outcome.reason = "client_gone"
        except ClientError as exc:
            await self._send_error_quietly(exc)

    async def _read_head(self) -> RequestHead | None:
        """The next request head; None when the connection should just close."""
        session = self.session
        timer = self.read_timer
        timer.kind = ""
        start = 0.0  # when the head's first byte came (now, for one already buffered)
        while True:
            try:
                ev = session.next_event()
            except ClientError as exc:
                self._begin(start or time.monotonic(), None)
                await self._send_error_quietly(exc)
                return None
            if type(ev) is RequestHead:
                self.wheel.clear(timer)
                self._begin(start or time.monotonic(), ev)
                return ev
            if ev is CLOSED:
                return None
            assert ev is NEED_DATA
            if session.head_started:
                if timer.kind != "header":  # from the first byte: trickling does not extend it
                    timer.kind = "header"
                    self.wheel.start(timer, self.limits.header_timeout)
                    start = start or time.monotonic()
                data = await self.receive()
            else:
                if self.proxy.draining and not self.proxy.retiring:
                    return None  # (retiring: one more request, answered with a close)
                timer.kind = "idle"
                self.wheel.start(timer, self.limits.idle_timeout)
                self.idle = True
                try:
                    data = await self.receive()
                finally:
                    self.idle = False
                start = time.monotonic()
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
            if type(ev) is Body:
                self.outcome.bytes_in += len(ev.data)
                return ev
            assert type(ev) is EndOfRequest, ev
            return ev

    async def send(self, data: bytes) -> None:
        """Write to the client; one that reads nothing for ``send_timeout`` is dropped.
        Raises ClientGone."""
        stream = self.stream
        self.outcome.bytes_out += len(data)
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

    async def send_error(self, exc: ProxyError) -> bool:
        """Answer a proxy-generated error with its short reason; whether the connection can
        be kept (never after a refusal, nor when the response had started)."""
        session = self.session
        o = self.outcome
        if not o.reason:
            o.reason = _refusal_reason(exc, self.timed_out)
        o.detail = exc.reason
        self._out.clear()
        status = exc.status_hint
        if status >= 500:
            req = session.request
            log.info(
                "%s %s -> %d %s",
                req.method.decode() if req else "-",
                req.target.decode("latin-1")[:200] if req else "-",
                status,
                exc.reason,
            )
        data = session.error_response(status, exc.reason, exc.headers)
        if not data:
            return False  # the response had started: only closing can signal failure
        o.status = status
        keep = not isinstance(exc, ClientError) and session.can_keep_alive
        if not keep and not session.request_complete:
            self.linger = True  # the client may still be sending the request
        await self.send(data)
        return keep

    async def _send_error_quietly(self, exc: ProxyError) -> None:
        try:
            await self.send_error(exc)
        except ClientGone:
            pass

    async def _linger(self) -> None:
        """A lingering close, as nginx's ``lingering_close``: after a refusal the client may
        still be sending its request; closing with those bytes unread makes the kernel send a
        reset that can destroy the response in flight.  So half-close, then read and drop
        what comes, up to ``linger_bytes`` or for ``linger_timeout``, whichever ends first."""
        stream = self.stream
        budget = int(self.limits.linger_bytes)
        with anyio.move_on_after(self.limits.linger_timeout):
            try:
                try:
                    await stream.send_eof()
                except NotImplementedError:  # TLS: no half-close, the draining still helps
                    pass
                while budget > 0:
                    budget -= len(await stream.receive(65536))
            except (anyio.EndOfStream, anyio.ClosedResourceError, *NETWORK_ERRORS):
                pass
