"""One pooled backend connection, whatever its protocol: a reader task, a batching writer task.

The driver is parameterised by a :class:`~muxproxy.io.protocols.BackendProtocol` from the
registry: a sans-IO core implementing :class:`~muxproxy.core.relay.BackendCore` (HTTP/2,
HTTP/3, HTTP/1.1) and a connector returning the :class:`~muxproxy.io.transport.Transport` it
runs over (a byte stream, or datagrams for QUIC).

The reader never awaits anything but the transport: it feeds input to the core and wakes the
exchanges whose streams changed (a ``Signal.set()``, which never blocks).  Exchanges queue
frames on the core and call :attr:`BackendConnection.schedule_flush`; the writer wakes once per
loop turn and writes everything queued at once — one syscall for many streams.

Written once here for every protocol: connect errors (one ``BackendUnavailable`` reason),
liveness and write progress, one rule: only input that answers what we sent (news on our
streams, send credit, a PING ACK: :meth:`Update.answers`) proves the peer alive and reading.
Without it for ``ping_interval`` a PING goes out; a connection whose PING is unanswered, or whose
send has not completed, for ``stall_after`` (half of ``ping_timeout``, at most ``WRITE_STALL``)
takes no new streams; after ``ping_timeout`` it is dead, whatever it sends meanwhile (a stuck
send is seen where the kernel's buffers fill; the unanswered PING where a peer's autotuned
receive buffer swallows everything, as on uvloop over loopback),
and termination: a stream whose bytes never reached the transport was provably not processed
and is failed as *refused* (replayable); every other open stream fails (502).
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from itertools import count
from typing import TYPE_CHECKING, Protocol

import anyio

from ..config import Address, ClusterConfig
from ..core.relay import BackendCore, StreamState, Update
from ..errors import BackendUnavailable
from .fast_stream import EventLoop, Future, asyncio_loop
from .timers import TimerWheel
from .transport import NETWORK_ERRORS, Transport, describe

if TYPE_CHECKING:
    from .protocols import BackendProtocol
    from .trio_stream import Parked

log = logging.getLogger("muxproxy.backend")

_serial = count(1)

# A send that has not completed, or a PING unanswered, for this long (at most half of
# ping_timeout) means the backend is not reading: the connection takes no new streams until it
# drains or answers.
WRITE_STALL = 1.0


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
    write_stalls: int = 0  # declared dead for not reading what we sent


class Waker(Protocol):
    """What the reader wakes for a stream: a :class:`Signal`, or a detached tunnel."""

    def set(self) -> None: ...


@cache
def _parked() -> type[Parked]:
    """trio's waiter class, imported on the first wait (trio is imported only when it runs;
    an import statement per wait cost 0.6 µs)."""
    from .trio_stream import Parked

    return Parked


class Signal:
    """A level-triggered wake-up for one waiting task: ``set()`` never blocks.

    Set before the wait, the wait returns at once.  On asyncio the waiter is a bare future of
    ``loop`` (found on the first wait if not given; an anyio Event per wait, with its backend
    lookup, was measurable per request); on trio the task parks itself
    (:class:`~muxproxy.io.trio_stream.Parked`).
    """

    __slots__ = ("_flag", "_loop", "_waiter")

    def __init__(self, loop: EventLoop | None = None) -> None:
        self._flag = False
        self._loop = loop
        self._waiter: Future | Parked | None = None

    def set(self) -> None:
        self._flag = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
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
                parked = _parked()()
                self._waiter = parked
                try:
                    await parked.wait()
                finally:
                    if self._waiter is parked:
                        self._waiter = None
        self._flag = False


class BackendConnection:
    """A persistent connection to one backend, shared by many exchanges."""

    def __init__(
        self,
        address: Address,
        cfg: ClusterConfig,
        protocol: BackendProtocol,
        *,
        tls: ssl.SSLContext | None,
        on_capacity: Callable[[BackendConnection], None],
        wheel: TimerWheel,
    ) -> None:
        self.id = next(_serial)
        self.address = address
        self.label = str(address)  # as the access log and outcomes name it
        self.cfg = cfg
        self.protocol = protocol
        self.tls = tls
        self.core: BackendCore = protocol.make_core(address, cfg)
        self.on_capacity = on_capacity
        self.news: dict[int, Waker] = {}  # stream id → the exchange waiting on it
        self.blocked: dict[int, Waker] = {}  # stream id → exchange waiting for send window
        self.retired = anyio.Event()  # no new streams: draining or dead
        self.closed = anyio.Event()  # socket closed, every stream failed or finished
        self._transport: Transport | None = None
        self.loop = asyncio_loop()  # None under trio; Signals of this connection's exchanges
        self._flush = Signal(self.loop)
        # Write whatever the core queued, once, at the writer's next turn.  (The Signal's own
        # set, not a method around it: called several times per request.)
        self.schedule_flush: Callable[[], None] = self._flush.set
        self._writer_done = anyio.Event()
        self.streams_opened = 0
        # Write progress: streams up to ``handed`` have left the core for the transport;
        # ``send_since`` is the wheel time the writer's pending send began (None when idle).
        self.last_opened = 0
        self.handed = 0
        self.send_since: float | None = None
        self.stall_after = min(WRITE_STALL, cfg.ping_timeout / 2)
        # Liveness (timer wheel entry): PING after ping_interval without an answer to what we
        # sent; dead when none arrives within ping_timeout after it.  ``ping_since`` is the
        # wheel time of the unanswered PING (None when answered); ``talked`` whether the peer
        # sent frames meanwhile (then it is not reading: a write stall, not a silent peer).
        self.wheel = wheel
        self.deadline = math.inf
        self.timer_bucket: int | None = None
        self.ping_since: float | None = None
        self._talked = False
        self._scope: anyio.CancelScope | None = None
        self.ping_timeouts = 0
        self.write_stalls = 0
        self.streams_lost_at_close: int | None = None  # set when the peer ends it (pool logs)

    # What the pool's pick reads (muxproxy.core.pool_policy.Slots).
    @property
    def free(self) -> int:
        since = self.send_since  # (an HTTP/1.1 connection is busy while it sends: free is 0)
        if since is None:
            since = self.ping_since
        if since is not None and self.wheel.now - since >= self.stall_after:
            return 0  # the backend is not reading: a new stream would hang
        return self.core.free_streams()

    @property
    def open(self) -> int:
        return len(self.core.streams)

    def __repr__(self) -> str:
        return f"<conn #{self.id} {self.protocol.name} {self.address} streams={self.open}>"

    # --- setup -------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the transport and complete the protocol's opening (SETTINGS, the QUIC
        handshake), within ``connect_timeout``.  Raises BackendUnavailable with the reason."""
        addr, core, proto = self.address, self.core, self.protocol
        try:
            with anyio.fail_after(self.cfg.connect_timeout):
                transport = await proto.connect(addr, self.cfg, self.tls, proto.alpn, core)
                self._transport = transport
                transport.start(anyio.current_time())
                await transport.flush()
                while not core.settings_received:
                    up, _ = await transport.receive()
                    if up.closed:
                        raise BackendUnavailable(f"backend {addr}: {core.close_reason}")
                    await transport.flush()
        except TimeoutError:
            await self._abort()
            raise BackendUnavailable(f"backend {addr} {proto.opening} timed out") from None
        except NETWORK_ERRORS as exc:
            await self._abort()
            raise BackendUnavailable(f"backend {addr} unreachable: {describe(exc)}") from None
        except BaseException:
            await self._abort()
            raise

    async def _abort(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._aclose_transport()

    async def _aclose_transport(self) -> None:
        if self._transport is not None:
            await self._transport.aclose()

    # --- running -----------------------------------------------------------------------

    def on_deadline(self) -> None:
        if self.core.closed:
            return
        since = self.send_since
        if since is not None and self.wheel.now - since >= self.cfg.ping_timeout:
            self.write_stalls += 1
            log.warning(
                "%r: send buffer not drained for %.3gs: connection dead",
                self,
                self.cfg.ping_timeout,
            )
            self._terminate("backend connection dead (not reading)", cancel=True)
            return
        if self.ping_since is not None:
            if self._talked:  # it sends, but does not read what we send
                self.write_stalls += 1
                log.warning(
                    "%r: frames but no answer (PING ACK) within %.3gs: not reading: "
                    "connection dead",
                    self,
                    self.cfg.ping_timeout,
                )
                self._terminate("backend connection dead (not reading)", cancel=True)
                return
            self.ping_timeouts += 1
            log.warning(
                "%r: no PING ACK within %.3gs: connection dead", self, self.cfg.ping_timeout
            )
            self._terminate("backend connection dead (no PING ACK)", cancel=True)
            return
        self.ping_since = self.wheel.now
        self._talked = False
        self.core.ping()
        self.schedule_flush()
        self.wheel.start(self, self.cfg.ping_timeout)

    async def serve(self) -> None:
        """Run until the connection is closed; every stream is finished or failed then."""
        try:
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                if self.protocol.multiplexed:  # (HTTP/1.1 has no PING and one stream at most)
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
            self._terminate("backend connection lost")
            with anyio.CancelScope(shield=True):
                await self._aclose_transport()
            self.closed.set()
            self.on_capacity(self)

    async def _reader(self) -> None:
        assert self._transport is not None
        receive = self._transport.receive
        while True:
            up, alive = await receive()
            if self._dispatch(up, alive=alive):
                return

    def _dispatch(self, up: Update, *, alive: bool) -> bool:
        """Wake the exchanges the update concerns; True once the connection is finished."""
        core = self.core
        if alive:  # (never for a protocol without PING: see PacedStreamTransport)
            # An answer to what we sent proves the peer alive (the next PING is ping_interval
            # away) — unless our send is stuck: then only draining proves anything.  Frames of
            # its own (a PING flood) prove nothing.
            since = self.send_since
            if up.answers() and (since is None or self.wheel.now - since < self.stall_after):
                if self.ping_since is not None:
                    self.ping_since = None
                    self.on_capacity(self)  # (it may have been skipped meanwhile)
                self.wheel.start(self, self.cfg.ping_interval)
            else:
                self._talked = True
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
        if up.closed and self.streams_lost_at_close is None:
            self.streams_lost_at_close = len(up.streams)
        if up.goaway or up.closed:
            if up.closed:
                self._never_sent(up.streams)
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
        assert self._transport is not None
        transport = self._transport
        flush = transport.flush
        core = self.core
        wheel = self.wheel
        try:
            while True:
                await self._flush.wait()
                self.handed = self.last_opened  # what flush() takes from the core from here
                since = self.send_since = wheel.now
                try:
                    opened = await flush()
                except NETWORK_ERRORS:  # (the reader may be paused: it is cancelled too)
                    self._terminate("backend connection lost", cancel=True)
                    return
                self.send_since = None
                if opened and self.blocked:  # senders waiting for room in the write buffer
                    for sig in list(self.blocked.values()):
                        sig.set()
                if wheel.now - since >= self.stall_after and self.protocol.multiplexed:
                    # Drained after a stall: the peer reads, so it is alive (frames it sent
                    # meanwhile were not counted), and the connection takes streams again.
                    self.ping_since = None
                    wheel.start(self, self.cfg.ping_interval)
                    self.on_capacity(self)
                if core.closed:
                    # Our GOAWAY is out (or the peer is gone): closing the socket ends the reader.
                    await transport.aclose()
                    return
        finally:
            self._writer_done.set()

    def _terminate(self, reason: str, *, cancel: bool = False) -> None:
        """The connection is dead: fail every stream (those never sent as refused)."""
        core = self.core
        if not core.closed:
            self._never_sent(core.abort(reason).streams)
        self.retired.set()
        self._wake_all()
        if cancel and self._scope is not None:
            self._scope.cancel()

    def _never_sent(self, streams: Iterable[StreamState]) -> None:
        """Streams whose bytes never left the core were provably not processed: replayable."""
        handed = self.handed
        for st in streams:
            if st.stream_id > handed and st.headers is None and not st.ended:
                st.refused = True
                st.error = "backend connection lost before the request was sent"

    def _wake_all(self) -> None:
        for sig in list(self.news.values()):
            sig.set()
        for sig in list(self.blocked.values()):
            sig.set()

    # --- used by exchanges ---------------------------------------------------------------

    def open_stream(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> StreamState:
        st = self.core.open_stream(headers, end_stream)
        self.last_opened = st.stream_id
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
            write_stalls=self.write_stalls,
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


# NETWORK_ERRORS lives in .transport; the rest of the I/O layer has always taken it from here.
__all__ = [
    "NETWORK_ERRORS",
    "BackendConnection",
    "ConnectionStatistics",
    "Signal",
    "Waker",
]
