"""One HTTP/2 client stream: the :class:`~.downstream.Downstream` (and ``TunnelDownstream``)
of the request it carries, over the connection driven by ``client_h2.py``.

* Output is queued (``send_head``/``send_data``/``end``) and written by :meth:`H2Stream.flush`,
  which hands the bytes to ``H2Server`` only as the client's windows allow, waits (at most
  ``send_timeout``) for its WINDOW_UPDATE, and then for the connection's writer to have sent
  them: the exchange gives the backend its credit back only after that.  The head waits for
  the first flush, so a response with no body goes out as one HEADERS with END_STREAM (gRPC's
  trailers-only answers), and the last DATA carries END_STREAM when there are no trailers.
* Input: request-body pieces wait in the stream's inbox (bounded by the stream window the
  client must respect); their window is given back when the next piece is asked for, that
  is once the previous one went on to the backend.
* ``reset()`` is RST_STREAM: the connection and its other streams live on.
* An extended CONNECT (RFC 8441) stream is a WebSocket tunnel: ``receive``/``send`` carry
  the DATA frames, and the same :class:`~.tunnel.Tunnel` as for HTTP/1.1 upgrades relays it.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn, Protocol

import anyio

from ..config import Limits, ListenerConfig
from ..core.frontend_h2 import Body as H2Body
from ..core.frontend_h2 import H2Server, Request, StreamGone
from ..core.frontend_h11 import Body, EndOfRequest, RequestHead
from ..core.h2wire import CANCEL, INTERNAL_ERROR
from ..core.headers import Forwarding, Header
from ..core.outcome import Outcome
from ..errors import ClientError, ProxyError
from .dispatch import dispatch
from .downstream import ClientGone
from .timers import TimerWheel

if TYPE_CHECKING:
    from ..router import Router
    from .detached import DetachedTunnel
    from .fast_stream import FastStream
    from .pool import ClusterPool

log = logging.getLogger("muxproxy.client")

__all__ = ["H2Stream", "StreamHost"]


class Dispatcher(Protocol):
    """What routing a request needs of the proxy."""

    @property
    def router(self) -> Router: ...
    @property
    def pools(self) -> dict[str, ClusterPool]: ...
    def internal_error(self, what: str, exc: BaseException) -> None: ...


class StreamHost(Protocol):
    """What a stream needs of its connection (``client_h2.H2ClientConnection``)."""

    server: H2Server
    limits: Limits
    listener: ListenerConfig
    peer: tuple[str, int]
    direct: str
    fwd: Forwarding
    wheel: TimerWheel
    streams: dict[int, H2Stream]

    @property
    def dispatcher(self) -> Dispatcher: ...
    def kick(self) -> None: ...
    async def settle(self) -> None: ...
    def finished(self, st: H2Stream) -> None: ...


class H2Stream:
    """One request stream: the :class:`~.downstream.Downstream` of its exchange."""

    __slots__ = (
        "_acked",
        "_closed",
        "_continue",
        "_end",
        "_ended",
        "_head",
        "_head_sent",
        "_pending",
        "_received",
        "_trailers",
        "_unacked",
        "_wake",
        "_window",
        "conn",
        "fwd",
        "inbox",
        "outcome",
        "req",
        "sid",
        "stop",
        "wheel",
    )

    def __init__(self, conn: StreamHost, req: Request, start: float) -> None:
        self.conn = conn
        self.req = req
        self.sid = req.stream_id
        self.fwd: Forwarding = conn.fwd  # (the connection's, as attributes: read per request)
        self.wheel: TimerWheel = conn.wheel
        peer = conn.peer
        self.outcome = Outcome(
            0.0, start, conn.listener.name, peer[0], peer[1], conn.direct, protocol="HTTP/2"
        )
        self.inbox: deque[Body | EndOfRequest] = deque()
        self._wake: anyio.Event | None = None  # read_body waiting for the inbox
        self._window: anyio.Event | None = None  # flush waiting for the client's window
        self._unacked = 0  # flow-controlled bytes handed out, not yet given back
        self._acked = 0
        self._received = 0  # request-body bytes handed out (the listener's max_body)
        self._continue = False  # a 100 is owed when the body is first asked for
        self._head: tuple[int, Sequence[Header]] | None = None
        self._head_sent = False
        self._pending: list[bytes] = []
        self._end = False
        self._ended = False  # END_STREAM (or RST_STREAM) sent
        self._trailers: list[Header] | None = None
        self._closed = False
        # Cancels the stream's task (set by the connection as it starts it; see client_h2).
        self.stop: Callable[[], object] = _nothing

    # --- fed by the reader -----------------------------------------------------------------

    def body(self, ev: H2Body) -> None:
        self.inbox.append(Body(ev.data))
        self._unacked += ev.flow
        self._poke()

    def end_of_request(self, trailers: list[Header] | None) -> None:
        self.inbox.append(EndOfRequest(trailers or []))
        self._poke()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def window_open(self) -> None:
        if self._window is not None:
            self._window.set()

    # --- the downstream interface ----------------------------------------------------------

    @property
    def body_timeout(self) -> float:
        return self.conn.limits.body_timeout

    async def read_body(self) -> Body | EndOfRequest:
        ev = await self._next(self.conn.limits.body_timeout)
        if type(ev) is Body:
            self._received += len(ev.data)
            if self._received > self.conn.limits.max_body:  # (a route's own: BodySource)
                raise ClientError("request body too large", 413)
        return ev

    async def _next(self, timeout: float) -> Body | EndOfRequest:
        # The piece handed out last went on to the backend: its window goes back now.
        self._give_back()
        inbox = self.inbox
        if not inbox:
            with anyio.move_on_after(timeout):
                while not inbox:
                    self._wake = anyio.Event()
                    await self._wake.wait()
            self._wake = None
            if not inbox:
                self.outcome.reason = "body_timeout"
                raise ClientError("request body not received in time", 408)
        ev = inbox.popleft()
        if type(ev) is Body:
            self.outcome.bytes_in += len(ev.data)
        return ev

    # --- a WebSocket over extended CONNECT: the TunnelDownstream part -----------------------

    @property
    def send_timeout(self) -> float:
        return self.conn.limits.send_timeout

    @property
    def fast_stream(self) -> FastStream | None:
        return None  # a stream is never detached: its tunnel runs in the stream's task

    async def receive(self) -> bytes:
        """DATA from the client; b"" once it ended the stream.  (The tunnel's own idle
        timeout bounds the wait.)"""
        ev = await self._next(math.inf)
        return ev.data if type(ev) is Body else b""

    async def send(self, data: bytes) -> None:
        self.send_data(data)
        await self.flush()

    def leftover(self) -> bytes:
        return b""

    def detach(self, tunnel: DetachedTunnel) -> NoReturn:
        raise AssertionError("HTTP/2 streams are never detached")

    def forget(self) -> None:
        return None

    def _give_back(self) -> None:
        n = self._unacked - self._acked
        # (the bytes still in the inbox are given back only once handed out)
        inbox = self.inbox
        held = sum([len(e.data) for e in inbox if type(e) is Body]) if inbox else 0
        n -= held
        if n > 0:
            self._acked += n
            self.conn.server.acknowledge(self.sid, n)
            self.conn.kick()

    async def send_continue(self) -> None:
        """``Expect: 100-continue``: the body is asked for now, so a 100 (an interim HEADERS
        frame, RFC 9113 §8.1) tells the client to send it; once, and only before the head and
        while no body came (as ``ClientSession.continue_bytes`` on HTTP/1.1)."""
        if self._continue and not self._head_sent and not self._ended and not self._unacked:
            self._continue = False
            self.conn.server.send_informational(self.sid, [(b":status", b"100")])
            self.conn.kick()

    def send_head(self, status: int, headers: Sequence[Header]) -> None:
        self._head = (status, headers)
        self.outcome.status = status

    def send_data(self, data: bytes) -> bool:
        if data:
            self._pending.append(data)
        return True

    def end(self, trailers: list[Header] | None) -> bool:
        self._end = True
        self._trailers = trailers or None
        return True

    def reset(self) -> bool:
        """RST_STREAM: this response is cut, the connection lives on."""
        if not self._ended:
            self._ended = True
            self._pending.clear()
            self.conn.server.reset(self.sid, INTERNAL_ERROR)
            self.conn.kick()
        return True

    async def flush(self) -> None:
        server = self.conn.server
        sid = self.sid
        try:
            if self._head is not None and not self._head_sent:
                status, headers = self._head
                self._head_sent = True
                only = self._end and not self._pending and self._trailers is None
                server.send_head(sid, status, headers, only)
                self._ended = only
            pending = self._pending
            while pending:
                data = pending[0]
                last = len(pending) == 1 and self._end and self._trailers is None
                n = server.send_data(sid, data, last)
                self.outcome.bytes_out += n
                if n == len(data):
                    pending.pop(0)
                    self._ended = last
                    continue
                pending[0] = data[n:]
                await self._await_window()
            if self._end and not self._ended:
                self._ended = True
                if self._trailers is not None:
                    server.send_trailers(sid, self._trailers)
                else:
                    server.send_data(sid, b"", True)
        except StreamGone:
            raise ClientGone from None
        await self.conn.settle()

    async def _await_window(self) -> None:
        """Wait for the client's window to open; nothing within send_timeout: the stream is
        reset (the client stopped reading it)."""
        conn = self.conn
        conn.kick()  # what fitted goes out meanwhile
        with anyio.move_on_after(conn.limits.send_timeout):
            while conn.server.send_window(self.sid) <= 0:
                if self.sid not in conn.streams or conn.server.closed:
                    raise ClientGone
                self._window = anyio.Event()
                await self._window.wait()
            self._window = None
            return
        self._window = None
        self.outcome.reason = "send_timeout"
        self.reset()
        raise ClientGone

    async def send_error(self, exc: ProxyError) -> bool:
        o = self.outcome
        if not o.reason:
            o.reason = _reason(exc)
        o.detail = exc.reason
        if self._head_sent or self._ended:
            return self.reset()
        status = exc.status_hint
        if status >= 500:
            r = self.req
            log.info(
                "%s %s -> %d %s",
                r.method.decode(),
                r.path[:200].decode("latin-1"),
                status,
                exc.reason,
            )
        body = exc.reason.encode() + b"\n"
        self._pending = [body]
        self.send_head(
            status,
            [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", b"%d" % len(body)),
                *exc.headers,
            ],
        )
        self._end = True
        self._trailers = None
        await self.flush()
        return True

    # --- the stream's life -----------------------------------------------------------------

    async def run(self) -> None:
        req = self.req
        ws = req.protocol == b"websocket"
        has_body = not req.end_stream and not ws  # (a tunnel's DATA is no body)
        length = None
        expect = b""
        for name, value in req.headers:
            if name == b"content-length":  # (digits, one value: h2 checked it)
                length = int(value)
            elif name == b"expect":
                expect = value.lower()
        head = RequestHead(
            method=req.method,
            target=req.path,
            authority=req.authority,
            headers=req.headers,
            http_version=b"2",
            has_body=has_body,
            content_length=length if has_body else None,
            keep_alive=True,
            expects_continue=has_body and expect == b"100-continue",
        )
        self._continue = head.expects_continue
        conn = self.conn
        try:
            proxy = conn.dispatcher
            try:
                if req.method == b"CONNECT" and req.protocol is None:
                    raise ClientError("CONNECT is not served here", 501)  # as on HTTP/1.1
                if has_body and (length or 0) > conn.limits.max_body:
                    raise ClientError("request body too large", 413)
                route = proxy.router.route(head, conn.listener)  # normalises head.target
            except ClientError as exc:
                await self.send_error(exc)
                return
            await dispatch(self, head, route, proxy.pools, websocket=ws)
            if ws and self._head_sent and not self._ended:
                self.end(None)  # the tunnel is over: END_STREAM (its failures reset)
                await self.flush()
        except ClientGone:
            if not self.outcome.reason:
                self.outcome.reason = "client_gone"
        finally:
            self._close()

    def _close(self) -> None:
        """The stream is over: reset if its response was not ended, its window given back,
        its outcome recorded by the connection.  Once."""
        if self._closed:
            return
        self._closed = True
        conn = self.conn
        if not self._ended:  # cancelled or cut: the client must not take it as whole
            self._ended = True
            conn.server.reset(self.sid, CANCEL)
        self.inbox.clear()
        self._give_back()
        conn.finished(self)

    def ended_task(self, failure: BaseException | None) -> None:
        """The task that ran ``run`` is done.  One cancelled before it ever ran skipped
        run's ``finally``; one that failed (a bug) costs this stream alone, on every loop:
        it is reset, counted and logged, and the connection's other streams go on."""
        if failure is not None:
            self.conn.dispatcher.internal_error(f"HTTP/2 stream {self.sid}", failure)
        self._close()

    def cancel(self, reason: str = "") -> None:
        """The client reset the stream (or we did, as malformed: ``reason``)."""
        self._ended = True
        if not self.outcome.reason:
            self.outcome.reason = reason or "client_gone"
        self.stop()


def _nothing() -> None:
    return None


def _reason(exc: ProxyError) -> str:
    code = getattr(exc, "code", "")
    if code:
        return str(code)
    status = exc.status_hint
    if status == 404:
        return "no_route"
    if status in (413, 414, 431):
        return "refused_limit"
    if isinstance(exc, ClientError):
        return "refused_malformed"
    return {504: "upstream_timeout", 503: "no_backend"}.get(status, "backend_lost")
