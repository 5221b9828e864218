"""One pooled HTTP/2 backend connection: a reader task, a batching writer task.

The reader never awaits anything but the socket: it feeds bytes to the sans-IO core and wakes
the exchanges whose streams changed (a ``Signal.set()``, which never blocks).  Exchanges queue
frames on the core and call :meth:`BackendConnection.schedule_flush`; the writer wakes once per
loop turn and writes everything queued in one ``send`` — one syscall for many streams.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count
from typing import Protocol

import anyio
import anyio.abc
from anyio.streams.tls import TLSAttribute

from ..config import Address, ClusterConfig
from ..core.backend_h2 import H2Backend
from ..core.relay import BackendCore, StreamState, Update
from ..errors import BackendUnavailable
from .fast_stream import EventLoop, Future, asyncio_loop, fast_stream
from .timers import TimerWheel

log = logging.getLogger("muxproxy.backend")

_serial = count(1)

# What a dead socket looks like, whichever loop runs it.
NETWORK_ERRORS = (
    OSError,
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    ssl.SSLError,
)


@dataclass(frozen=True, slots=True)
class ConnectionStatistics:
    id: int
    backend: str
    streams_open: int
    streams_opened: int
    max_concurrent_streams: int  # min(backend's SETTINGS, our cap); 0 before SETTINGS
    draining: bool
    goaway_last_stream_id: int | None
    resets_received: int
    refused_received: int
    ping_timeouts: int


class Waker(Protocol):
    """What the reader wakes for a stream: a :class:`Signal`, or a detached tunnel."""

    def set(self) -> None: ...


class Signal:
    """A level-triggered wake-up for one waiting task: ``set()`` never blocks.

    Set before the wait, the wait returns at once.  On asyncio the waiter is a bare future of
    ``loop`` (found on the first wait if not given; an anyio Event per wait, with its backend
    lookup, was measurable per request); on trio it is an anyio Event.
    """

    __slots__ = ("_flag", "_loop", "_waiter")

    def __init__(self, loop: EventLoop | None = None) -> None:
        self._flag = False
        self._loop = loop
        self._waiter: Future | anyio.Event | None = None

    def set(self) -> None:
        self._flag = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if isinstance(waiter, anyio.Event):
                waiter.set()
            elif not waiter.done():
                waiter.set_result(None)

    async def wait(self) -> None:
        if not self._flag:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio_loop()
            if loop is not None:
                fut = loop.create_future()
                self._waiter = fut
                try:
                    await fut
                finally:
                    if self._waiter is fut:
                        self._waiter = None
            else:
                event = anyio.Event()
                self._waiter = event
                try:
                    await event.wait()
                finally:
                    if self._waiter is event:
                        self._waiter = None
        self._flag = False


def client_tls_context(cfg: ClusterConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cfg.tls.ca)
    if not cfg.tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    return ctx


class BackendConnection:
    """A persistent HTTP/2 connection to one backend, shared by many exchanges."""

    def __init__(
        self,
        address: Address,
        cfg: ClusterConfig,
        *,
        tls: ssl.SSLContext | None,
        on_capacity: Callable[[BackendConnection], None],
        wheel: TimerWheel,
    ) -> None:
        self.id = next(_serial)
        self.address = address
        self.cfg = cfg
        self.tls = tls
        self.core: BackendCore = self._make_core()
        self.on_capacity = on_capacity
        self.news: dict[int, Waker] = {}  # stream id → the exchange waiting on it
        self.blocked: dict[int, Waker] = {}  # stream id → exchange waiting for send window
        self.retired = anyio.Event()  # no new streams: draining or dead
        self.closed = anyio.Event()  # socket closed, every stream failed or finished
        self._stream: anyio.abc.ByteStream | None = None
        self.loop = asyncio_loop()  # None under trio; Signals of this connection's exchanges
        self._flush = Signal(self.loop)
        self._writer_done = anyio.Event()
        self.streams_opened = 0
        # Liveness (timer wheel entry): PING after ping_interval without a frame; dead when no
        # frame at all arrives within ping_timeout after it.
        self.wheel = wheel
        self.deadline = math.inf
        self.timer_bucket: int | None = None
        self._awaiting_ack = False
        self._scope: anyio.CancelScope | None = None
        self.ping_timeouts = 0

    def _make_core(self) -> BackendCore:
        return H2Backend(
            stream_window=self.cfg.stream_window, max_streams=self.cfg.max_streams_per_connection
        )

    # What the pool's scheduler reads (muxproxy.core.scheduler.Slots).
    @property
    def free(self) -> int:
        return self.core.free_streams()

    @property
    def open(self) -> int:
        return len(self.core.streams)

    @property
    def h2core(self) -> H2Backend:
        assert isinstance(self.core, H2Backend)
        return self.core

    def __repr__(self) -> str:
        return f"<conn #{self.id} {self.address} streams={len(self.core.streams)}>"

    # --- setup -------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the socket and exchange SETTINGS, within ``connect_timeout``.

        Raises BackendUnavailable with the reason.
        """
        addr = self.address
        try:
            with anyio.fail_after(self.cfg.connect_timeout):
                if self.tls is not None:
                    stream: anyio.abc.ByteStream = await anyio.connect_tcp(
                        addr.host,
                        addr.port,
                        ssl_context=self.tls,
                        tls_hostname=self.cfg.tls.server_name or addr.host,
                        tls_standard_compatible=False,
                    )
                    if stream.extra(TLSAttribute.alpn_protocol, None) != "h2":
                        await stream.aclose()
                        raise BackendUnavailable(f"backend {addr} did not negotiate h2 (ALPN)")
                else:
                    stream = fast_stream(await anyio.connect_tcp(addr.host, addr.port))
                self._stream = stream
                core = self.h2core
                core.initiate()
                await stream.send(core.data_to_send())
                while not core.settings_received:
                    data = await stream.receive(65536)
                    up = core.receive_data(data)
                    if up.closed:
                        raise BackendUnavailable(f"backend {addr}: {core.close_reason}")
                    out = core.data_to_send()
                    if out:
                        await stream.send(out)
        except TimeoutError:
            await self._abort()
            raise BackendUnavailable(f"backend {addr} connect timed out") from None
        except NETWORK_ERRORS as exc:
            await self._abort()
            raise BackendUnavailable(f"backend {addr} unreachable: {_describe(exc)}") from None
        except BaseException:
            await self._abort()
            raise

    async def _abort(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._aclose_transport()

    async def _aclose_transport(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()

    # --- running -----------------------------------------------------------------------

    def on_deadline(self) -> None:
        if self.core.closed:
            return
        if self._awaiting_ack:
            self.ping_timeouts += 1
            log.warning(
                "%r: no PING ACK within %.3gs: connection dead", self, self.cfg.ping_timeout
            )
            self.core.abort("backend connection dead (no PING ACK)")
            self.retired.set()
            self._wake_all()
            if self._scope is not None:
                self._scope.cancel()
            return
        self._awaiting_ack = True
        self.core.ping()
        self.schedule_flush()
        self.wheel.start(self, self.cfg.ping_timeout)

    async def serve(self) -> None:
        """Run until the connection is closed; every stream is finished or failed then."""
        try:
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                self.wheel.start(self, self.cfg.ping_interval)
                tg.start_soon(self._writer)
                await self._reader()
                # Closing: the writer sends what is queued (our GOAWAY) and closes the socket.
                # Only the writer ever sends, so there is never a second sender.
                self.schedule_flush()
                with anyio.move_on_after(1.0):
                    await self._writer_done.wait()
                tg.cancel_scope.cancel()
        finally:
            self.wheel.discard(self)
            self.retired.set()
            self._fail_all()
            with anyio.CancelScope(shield=True):
                await self._aclose_transport()
            self.closed.set()
            self.on_capacity(self)

    async def _reader(self) -> None:
        assert self._stream is not None
        receive = self._stream.receive
        core = self.h2core
        while True:
            try:
                data = await receive(65536)
            except NETWORK_ERRORS:
                data = b""
            up = core.receive_data(data)
            if self._dispatch(up, alive=bool(data)):
                return

    def _dispatch(self, up: Update, *, alive: bool) -> bool:
        """Wake the exchanges the update concerns; True once the connection is finished."""
        core = self.core
        if alive:  # any frame proves the peer alive: the next PING is ping_interval away
            self._awaiting_ack = False
            self.wheel.start(self, self.cfg.ping_interval)
        news = self.news
        for st in up.streams:
            sig = news.get(st.stream_id)
            if sig is not None:
                sig.set()
            sig = self.blocked.get(st.stream_id)
            if sig is not None:
                sig.set()
        if up.window_opened and self.blocked:
            for sig in list(self.blocked.values()):
                sig.set()
        self.schedule_flush()
        if up.goaway or up.closed:
            if not self.retired.is_set():
                log.info("%r retiring: %s", self, core.close_reason or "GOAWAY received")
            self.retired.set()
        if up.capacity_changed:
            self.on_capacity(self)
        if core.closed or (core.draining and not core.streams):
            if not core.closed:
                core.close()  # drained: say GOAWAY
            return True
        return False

    async def _writer(self) -> None:
        assert self._stream is not None
        send = self._stream.send
        core = self.h2core
        try:
            while True:
                await self._flush.wait()
                data = core.data_to_send()
                if data:
                    try:
                        await send(data)
                    except NETWORK_ERRORS:
                        core.abort("backend connection lost")  # fail every stream
                        self.retired.set()
                        self._wake_all()
                        return
                if core.closed:
                    # Our GOAWAY is out (or the peer is gone): closing the socket ends the reader.
                    await self._stream.aclose()
                    return
        finally:
            self._writer_done.set()

    def _fail_all(self) -> None:
        if not self.core.closed:
            self.core.abort("backend connection lost")
        self._wake_all()

    def _wake_all(self) -> None:
        for sig in list(self.news.values()):
            sig.set()
        for sig in list(self.blocked.values()):
            sig.set()

    # --- used by exchanges ---------------------------------------------------------------

    def schedule_flush(self) -> None:
        """Write whatever the core queued, once, at the writer's next turn."""
        self._flush.set()

    def open_stream(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> StreamState:
        st = self.core.open_stream(headers, end_stream)
        self.streams_opened += 1
        self.schedule_flush()
        if self.core.draining and not self.retired.is_set():
            log.info("%r: stream ids running out: draining, replacement opening", self)
            self.retired.set()  # the pool opens the replacement now; this one drains
        return st

    def statistics(self) -> ConnectionStatistics:
        core = self.core
        return ConnectionStatistics(
            id=self.id,
            backend=str(self.address),
            streams_open=len(core.streams),
            streams_opened=self.streams_opened,
            max_concurrent_streams=core.stream_limit() if core.settings_received else 0,
            draining=core.draining,
            goaway_last_stream_id=core.goaway_last_stream_id,
            resets_received=core.resets_received,
            refused_received=core.refused_received,
            ping_timeouts=self.ping_timeouts,
        )

    async def send_body(self, sid: int, data: bytes, window: Signal) -> bool:
        """Send ``data`` on a stream as fast as its send window (stream and connection) opens.

        Returns False if the stream ended or failed first (its exchange learns why from the
        stream state).  Waits only for credit, so a request body is read from the client no
        faster than the backend takes it.
        """
        core = self.core
        view = memoryview(data)
        try:
            while view:
                if sid not in core.streams:
                    return False
                n = core.send_window(sid)
                if n <= 0:
                    self.blocked[sid] = window
                    await window.wait()
                    continue
                core.send_data(sid, bytes(view[:n]))
                view = view[n:]
                self.schedule_flush()
        finally:
            self.blocked.pop(sid, None)
        return True

    def release(self, st: StreamState) -> None:
        """The exchange is done with the stream: reset it if still open, return its credit."""
        sid = st.stream_id
        self.news.pop(sid, None)
        self.blocked.pop(sid, None)
        if sid in self.core.streams:
            self.core.reset_stream(sid)
        else:
            self.core.discard(st)
        if self.core.draining and not self.core.streams and not self.core.closed:
            self.core.close()  # drained: GOAWAY; the writer closes the socket after it
        self.schedule_flush()
        self.on_capacity(self)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
