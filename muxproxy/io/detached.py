"""A WebSocket tunnel driven by callbacks, with no task of its own (a plain-TCP FastStream).

An idle WebSocket is most of what an edge proxy holds, and a parked task costs several
kilobytes on either loop (the task, anyio's task handle, cancel scopes, a coroutine frame per
level).
After the ``101``, :class:`~muxproxy.io.tunnel.Tunnel` hands a FastStream client over to a
:class:`DetachedTunnel` and its task ends; from then on the client stream's callbacks
(:class:`~muxproxy.io.fast_stream.StreamSink`: asyncio's protocol callbacks, or on trio the
run's epoll reactor in :mod:`muxproxy.io.trio_stream`), the backend connection's reader (``set``, as
the stream's ``news`` and, while client bytes wait for window, in ``blocked``) and the timer
wheel (``on_deadline``) feed a :class:`~muxproxy.core.tunnel.TunnelCore`, and this driver
carries out its actions on the HTTP/2 or HTTP/3 stream and the client stream.  Every rule
(close handshake, half-close, resets, idle and send timeouts, credit) is the core's.

Backpressure needs no buffer here: client bytes the window cannot take stay in the core while
the client stream is paused; backend DATA is acknowledged when the client stream's buffer is
empty again (write limits are 0), so a client that stops reading holds at most one stream
window.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Protocol

import anyio

from ..core.relay import StreamState
from ..core.tunnel import (
    SEND_TIMEOUT,
    Action,
    ArmDeadline,
    CloseClient,
    CreditBackend,
    EndBackend,
    ResetBackend,
    SendToBackend,
    TunnelCore,
    WriteToClient,
)

if TYPE_CHECKING:
    from .backend import BackendConnection
    from .fast_stream import FastStream
    from .timers import TimerWheel

log = logging.getLogger("muxproxy.tunnel")

_WRITE_ERRORS = (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError)


class Owner(Protocol):
    """The client connection a detached tunnel took over (a ``TunnelDownstream``)."""

    def forget(self) -> None:
        """The tunnel has closed the connection."""


class DetachedTunnel:
    """Drives a :class:`TunnelCore` from a FastStream's callbacks and a backend stream."""

    __slots__ = (
        "conn",
        "core",
        "deadline",
        "owner",
        "st",
        "stream",
        "timer_bucket",
        "wheel",
    )

    def __init__(
        self,
        stream: FastStream,
        conn: BackendConnection,
        st: StreamState,
        *,
        wheel: TimerWheel,
        idle_timeout: float,
        send_timeout: float,
        owner: Owner,
    ) -> None:
        self.stream = stream
        self.conn = conn
        self.st = st
        self.wheel = wheel
        self.core = TunnelCore(idle_timeout, send_timeout)
        # The client connection, told (``forget``) once the tunnel has closed it.  (Kept as
        # the object, not as its bound method: that would be one more object per WebSocket.)
        self.owner: Owner | None = owner
        self.deadline = math.inf  # the wheel's
        self.timer_bucket: int | None = None

    def start(self, first: bytes) -> None:
        """Take over: ``first`` is what the client sent after its handshake."""
        core, stream = self.core, self.stream
        self.conn.news[self.st.stream_id] = self
        self._run(core.start(self.wheel.now))
        queued = stream.attach(self)
        if first or queued:
            self.on_data(first + queued)
        if stream.at_eof:
            self.on_eof()
        elif stream.lost:
            self.on_lost()
        self.set()  # whatever the backend sent already

    # --- inputs: the client stream (StreamSink), the backend connection, the wheel -------------

    def on_data(self, data: bytes) -> None:
        self._run(self.core.client_data(data, self.wheel.now))
        self._offer_window()

    def on_eof(self) -> None:
        self._run(self.core.client_eof(self.wheel.now))

    def on_lost(self) -> None:
        self._run(self.core.client_gone(self.wheel.now))

    def on_drained(self) -> None:
        self._run(self.core.client_drained(self.wheel.now))

    def set(self) -> None:
        """The backend connection has news for the stream (data, end, reset, a window update,
        or it died)."""
        core = self.core
        if core.finished:
            return
        if core.wants_window:
            self._offer_window()
        self._run(core.stream_news(self.st, self.wheel.now))

    def on_deadline(self) -> None:
        self._run(self.core.tick(self.wheel.now))

    def finish(self) -> None:
        """End the tunnel now (the end of a shutdown's grace period, or an internal error)."""
        self._run(self.core.close(self.wheel.now))

    def _offer_window(self) -> None:
        """Offer the stream's send window while client bytes wait for it; the client is read
        only when none wait."""
        core = self.core
        conn, sid = self.conn, self.st.stream_id
        while core.wants_window:
            n = conn.core.send_window(sid)
            if n <= 0:
                conn.blocked[sid] = self
                self.stream.pause_reading()
                return
            self._run(core.window_opened(n, self.wheel.now))
        if not core.finished:
            conn.blocked.pop(sid, None)
            self.stream.resume_reading()

    # --- actions ---------------------------------------------------------------------------

    def _run(self, actions: list[Action]) -> None:
        conn, sid = self.conn, self.st.stream_id
        flush = False
        report = None
        for action in actions:
            if type(action) is ArmDeadline:
                self.wheel.set(self, action.when)
            elif type(action) is SendToBackend:
                conn.core.send_data(sid, action.data)
                flush = True
            elif type(action) is WriteToClient:
                core = self.core
                try:
                    drained = self.stream.write_nowait(action.data)
                except _WRITE_ERRORS:
                    report = core.client_gone
                else:
                    report = core.client_drained if drained else core.client_stalled
            elif type(action) is CreditBackend:
                conn.core.consumed(sid, action.amount)
                flush = True
            elif type(action) is EndBackend:
                conn.core.end_stream(sid)
                flush = True
            elif type(action) is ResetBackend:
                if action.reason == SEND_TIMEOUT:
                    log.info(
                        "WebSocket client read nothing for %.3gs: closing", self.core.send_timeout
                    )
                conn.release(self.st)  # resets the stream if it is still open
            elif type(action) is CloseClient:
                self._close()
        if flush:
            conn.schedule_flush()
        if report is not None:  # once the actions are carried out, in order
            self._run(report(self.wheel.now))

    def _close(self) -> None:
        stream = self.stream
        stream.attach(None)
        self.wheel.discard(self)
        stream.close_nowait()
        owner, self.owner = self.owner, None
        if owner is not None:
            owner.forget()
