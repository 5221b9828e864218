"""One HTTP/2 client connection: a reader feeding :class:`~muxproxy.core.frontend_h2.H2Server`,
a writer, and one task per request stream, all owned by the connection's task group.

* The reader turns client bytes into events: a :class:`Request` starts an :class:`H2Stream`
  task that runs the same :func:`~.dispatch.dispatch` as an HTTP/1.1 request (routes, header
  rules, queue, replays, error statuses); body pieces wait in the stream's inbox, which the
  client cannot overfill (its stream window is ``initial_window``); a client RST_STREAM cancels
  the stream's task, and with it the backend stream (the exchange releases it as it unwinds).
* The writer sends ``data_to_send()`` once per loop turn, so the frames queued by every stream
  during that turn go out in one write.  A stream's :meth:`H2Stream.flush` goes on at once
  while the writer keeps up (its last write was taken whole and at most ``WRITE_BEHIND`` body
  bytes wait for the next); otherwise it waits until a turn that started after its frames were
  queued has ended.  So backend credit runs at most ``WRITE_BEHIND`` ahead of what the client
  takes, per connection, and a client that stops reading stops every stream at its next flush.
* Response bodies are sent within the client's windows; a stream waits for its WINDOW_UPDATE
  for at most ``send_timeout`` (then RST_STREAM), stalling neither the other streams nor the
  other clients.  Request-body windows are given back (:meth:`H2Server.acknowledge`) only once
  the previous piece went on to the backend.
* Draining (SIGTERM): GOAWAY with the last stream id; the streams in flight finish (the proxy
  bounds them with ``grace_period``), then the connection closes.  After a flood,
  GOAWAY(ENHANCE_YOUR_CALM) does the same for this connection alone, bounded by
  ``calm_timeout``.
"""

from __future__ import annotations

import functools
import logging
import math
import time

import anyio
import anyio.abc
import anyio.lowlevel

from ..config import Limits, ListenerConfig
from ..core.frontend_h2 import (
    Body as H2Body,
)
from ..core.frontend_h2 import (
    Cancelled,
    Closing,
    End,
    Event,
    H2Limits,
    H2Server,
    Request,
    WindowOpen,
)
from ..core.h2wire import ENHANCE_YOUR_CALM, PREFACE, REFUSED
from ..core.headers import Forwarding
from ..core.outcome import Outcome
from .backend import NETWORK_ERRORS, Signal
from .downstream import ProxyHost
from .fast_stream import EventLoop, FastStream, asyncio_loop, start_task
from .h2stream import H2Stream

log = logging.getLogger("muxproxy.client")


__all__ = ["PREFACE", "H2ClientConnection", "H2Stream", "sniff_preface"]

# Body bytes the streams of one connection may leave queued for the writer's next turn
# without waiting for it (a wait per response costs ~15 Python calls; measured).
WRITE_BEHIND = 64 * 1024


@functools.cache
def h2_limits(lim: Limits) -> H2Limits:
    """One H2Limits per listener's ``[listeners.limits]``."""
    return H2Limits(
        max_concurrent_streams=lim.max_concurrent_streams,
        max_header_list_size=int(lim.max_header_list_size),
        initial_window=int(lim.initial_window),
        max_resets_per_second=lim.max_resets_per_second,
        max_continuation_frames=lim.max_continuation_frames,
        max_settings_per_second=lim.max_settings_per_second,
        max_pings_per_second=lim.max_pings_per_second,
        max_priority_per_second=lim.max_priority_per_second,
        max_window_updates_per_second=lim.max_window_updates_per_second,
        max_empty_frames_per_second=lim.max_empty_frames_per_second,
    )


async def sniff_preface(
    stream: anyio.abc.ByteStream, timeout: float, got: bytes = b""
) -> tuple[bool, bytes]:
    """On a plain listener speaking both: read until the bytes (starting with ``got``) are,
    or cannot be, the HTTP/2 connection preface.  Returns (is HTTP/2, the bytes read)."""
    with anyio.move_on_after(timeout):
        while len(got) < len(PREFACE) and PREFACE.startswith(got):
            try:
                data = await stream.receive(65536)
            except (anyio.EndOfStream, *NETWORK_ERRORS):
                break
            got += data
    return got.startswith(PREFACE), got


class H2ClientConnection:
    """One HTTP/2 client connection; see the module docstring."""

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        listener: ListenerConfig,
        proxy: ProxyHost,
        peer: tuple[str, int],
        first: bytes = b"",
        *,
        websockets: bool = False,
        direct: str = "",
    ) -> None:
        self.stream = stream
        self.listener = listener
        self.proxy = proxy
        self.wheel = proxy.wheel
        self.peer = peer
        self.direct = direct  # the TCP peer (an L4 balancer) when it is not the client
        self.limits = listener.limits
        self.first = first
        ip = peer[0]
        self.fwd = Forwarding(
            client_ip=ip,
            scheme=b"https" if listener.tls else b"http",
            trusted=proxy.is_trusted(listener, ip),
            mode=listener.forwarded,
        )
        # RFC 8441 is announced when some route allows WebSockets.
        self.server = H2Server(h2_limits(self.limits), connect_protocol=websockets)
        self.streams: dict[int, H2Stream] = {}
        self.idle = False  # (a shutdown drains HTTP/2 connections instead: see drain())
        self.detached = None  # (never: tunnels stay streams)
        self.scope: anyio.CancelScope | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._loop: EventLoop | None = None  # asyncio's: streams are bare tasks of it
        self._read_scope: anyio.CancelScope | None = None
        self._wake = Signal()
        self._turn_waiters: list[Signal] = []  # sync() callers, woken after each turn
        self._done: Signal | None = None  # _all_done waiting for the last stream to finish
        self._writing = False
        self._stuck = False  # the writer waits for the client to take its last write
        self.turns = 0
        self.draining = False
        self.open_here: set[object] = set()

    # --- output ----------------------------------------------------------------------------

    @property
    def dispatcher(self) -> ProxyHost:
        return self.proxy

    def kick(self) -> None:
        """Something may have been queued: if so, the writer's next turn sends it."""
        if self.server.has_output:
            self._wake.set()

    @property
    def waiting_streams(self) -> int:
        """Streams waiting for the client to take what is queued (the writer is behind)."""
        return len(self._turn_waiters)

    async def settle(self) -> None:
        """A stream queued part of its response: go on while the writer keeps up, else wait
        like :meth:`sync` (this is the back-pressure from the client to the backend)."""
        if not self._stuck and self.server.queued <= WRITE_BEHIND:
            self.kick()
        else:
            await self.sync()

    async def sync(self) -> None:
        """Wait until everything queued so far has been written to the client."""
        if not self._writing:
            if not self.server.has_output:
                return  # (nothing queued, no write under way: all of it went)
            target = self.turns + 1
        else:  # (what was queued during this turn's write goes with the next)
            target = self.turns + 2
        self._wake.set()
        while self.turns < target:
            turn = Signal(self._loop)
            self._turn_waiters.append(turn)
            await turn.wait()

    async def _writer(self) -> None:
        server = self.server
        stream = self.stream
        send_timeout = self.limits.send_timeout
        fast = stream if isinstance(stream, FastStream) else None
        while True:
            await self._wake.wait()
            self._writing = True
            await anyio.lowlevel.checkpoint()  # let the other streams of this turn queue too
            data = server.data_to_send()
            if data:
                ok = False
                try:
                    # (a deadline only when the kernel did not take it all at once)
                    ok = fast is not None and fast.write_nowait(data)
                except NETWORK_ERRORS:
                    pass
                else:
                    if not ok:
                        self._stuck = True
                        with anyio.move_on_after(send_timeout):
                            try:
                                if fast is not None:
                                    await fast.drained()
                                else:
                                    await stream.send(data)
                                ok = True
                            except NETWORK_ERRORS:
                                pass
                        self._stuck = False
                if not ok:  # gone, or not reading: everything on this connection ends
                    for st in self.streams.values():
                        if not st.outcome.reason:
                            st.outcome.reason = "send_timeout"
                    self._stop()
                    return
            self._writing = False
            self.turns += 1
            waiters = self._turn_waiters
            if waiters:
                self._turn_waiters = []
                for turn in waiters:
                    turn.set()

    # --- the connection's life -----------------------------------------------------------

    def drain(self) -> None:
        """Graceful shutdown: GOAWAY(last stream id); close once the streams are done."""
        if not self.draining:
            self.draining = True
            self.server.drain()
            self.kick()
            if not self.streams and self._read_scope is not None:
                self._read_scope.cancel()

    def _stop(self) -> None:
        if self.scope is not None:
            self.scope.cancel()

    async def run(self) -> None:
        self._loop = asyncio_loop()
        try:
            with anyio.CancelScope() as self.scope:
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    tg.start_soon(self._writer)
                    self.server.initiate()
                    if self.proxy.draining:
                        self.drain()
                    self.kick()
                    await self._read()
                    # Graceful end: the streams in flight finish, then the last frames go.
                    if not self.server.closed:
                        await self._all_done()
                    with anyio.move_on_after(1.0):
                        await self.sync()
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._end_streams()
                await self.stream.aclose()

    async def _all_done(self) -> None:
        """Until no stream is left (``finished`` wakes it)."""
        while self.streams:
            done = self._done = Signal(self._loop)
            await done.wait()

    def _start(self, st: H2Stream) -> None:
        """Run a new stream: on asyncio a bare task of the loop (a task group's child and its
        cancel scope cost ~50 µs per request, measured); on trio the connection's task group's
        child in a cancel scope of its own.  Either way ``st.stop`` cancels it."""
        loop = self._loop
        if loop is not None:
            st.stop = start_task(loop, st.run(), st.ended_task)
        else:
            assert self._tg is not None
            self._tg.start_soon(self._run_scoped, st)

    @staticmethod
    async def _run_scoped(st: H2Stream) -> None:
        with anyio.CancelScope() as scope:
            st.stop = scope.cancel
            try:
                await st.run()
            except* Exception as bugs:  # as a bare task's: the stream's, not the group's
                st.ended_task(bugs)

    async def _end_streams(self) -> None:
        """The connection is over: bare stream tasks (asyncio) still running are cancelled,
        and awaited briefly, so each records its outcome and releases its backend stream.
        (On trio the task group did this already.)"""
        if self.streams:
            for st in list(self.streams.values()):
                st.stop()
            with anyio.move_on_after(5.0):
                await self._all_done()

    async def _read(self) -> None:
        """Read and handle client frames until the client leaves, the connection closes or
        winds down with no stream left, or it stays idle (no stream open) for
        ``idle_timeout``.  One cancel scope for the whole loop (one per read cost as much as
        the read): its deadline is armed only while no stream is open."""
        server = self.server
        stream = self.stream
        data = self.first
        self.first = b""
        idle_timeout = self.limits.idle_timeout
        with anyio.CancelScope() as scope:
            self._read_scope = scope
            try:
                while True:
                    if data:
                        self._handle(server.receive_data(data, time.monotonic()))
                        self.kick()
                        if server.closed:
                            return
                    if self.winding_down and not self.streams:
                        return
                    if not self.streams:
                        scope.deadline = anyio.current_time() + idle_timeout
                    elif scope.deadline != math.inf:
                        scope.deadline = math.inf
                    try:
                        data = await stream.receive(65536)
                    except (anyio.EndOfStream, *NETWORK_ERRORS):
                        data = b""
                    if not data:  # the client went away: so did its streams
                        self._stop()
                        return
            finally:
                self._read_scope = None
        if scope.cancelled_caught and not self.draining:  # idle: a graceful GOAWAY, then close
            self.server.drain()

    def _handle(self, events: list[Event]) -> None:
        streams = self.streams
        for ev in events:
            if isinstance(ev, H2Body):
                st = streams.get(ev.stream_id)
                if st is not None:
                    st.body(ev)
                else:
                    self.server.acknowledge(ev.stream_id, ev.flow)
            elif isinstance(ev, Request):
                st = H2Stream(self, ev, time.monotonic())
                streams[ev.stream_id] = st
                if ev.end_stream:
                    st.end_of_request(None)
                self._start(st)
            elif isinstance(ev, End):
                st = streams.get(ev.stream_id)
                if st is not None:
                    st.end_of_request(ev.trailers)
            elif isinstance(ev, WindowOpen):
                if ev.stream_id == 0:
                    for st in streams.values():
                        st.window_open()
                else:
                    st = streams.get(ev.stream_id)
                    if st is not None:
                        st.window_open()
            elif isinstance(ev, Cancelled):
                st = streams.get(ev.stream_id)
                if st is not None:  # reset by the client, or by us as malformed
                    st.cancel("" if ev.by_client else "refused_malformed")
                elif not ev.by_client and self.proxy.recorders:
                    self._refused(ev)
            elif isinstance(ev, Closing) and not ev.graceful:
                log.info("client %s: HTTP/2 connection closed: %s", self.peer[0], ev.reason)
                for st in streams.values():
                    st.cancel()
            elif isinstance(ev, Closing) and ev.code == ENHANCE_YOUR_CALM:
                log.info("client %s: HTTP/2 GOAWAY: %s", self.peer[0], ev.reason)
                assert self._tg is not None
                self._tg.start_soon(self._calm_down)

    async def _calm_down(self) -> None:
        """GOAWAY(ENHANCE_YOUR_CALM) was sent: the streams in flight have ``calm_timeout``
        to finish, then the connection closes (theirs alone: other clients never notice)."""
        await anyio.sleep(self.limits.calm_timeout)
        for st in self.streams.values():
            if not st.outcome.reason:
                st.outcome.reason = "refused_limit"
        self._stop()

    @property
    def winding_down(self) -> bool:
        """No new stream will be served: once the streams in flight are done, close."""
        server = self.server
        return self.draining or server.peer_goaway or server.calm

    def _refused(self, ev: Cancelled) -> None:
        """A request refused before it became a stream (over the limit, malformed) is
        recorded too: no response, a reason."""
        now = time.monotonic()
        peer = self.peer
        o = Outcome(
            time.time(), now, self.listener.name, peer[0], peer[1], self.direct, protocol="HTTP/2"
        )
        o.reason = "refused_limit" if ev.code == REFUSED else "refused_malformed"
        o.detail = ev.reason
        o.end = now
        self.proxy.record(o)

    def finished(self, st: H2Stream) -> None:
        """A stream's task ended: record its outcome."""
        self.streams.pop(st.sid, None)
        self.kick()
        o = st.outcome
        proxy = self.proxy
        if proxy.recorders:
            o.end = now = time.monotonic()
            if proxy.describe:
                r = st.req
                o.method = r.method.decode("latin-1")
                o.authority = r.authority.decode("latin-1")
                o.path = r.path.decode("latin-1")
                o.wall_start = time.time() - (now - o.start)
            proxy.record(o)
        if not self.streams:
            if self._done is not None:
                self._done.set()
            if self.winding_down and self._read_scope is not None:
                self._read_scope.cancel()
