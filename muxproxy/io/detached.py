"""A WebSocket tunnel driven by callbacks, with no task of its own (asyncio's FastStream only).

An idle WebSocket is most of what an edge proxy holds, and on asyncio a parked task costs
several kilobytes (the task, anyio's task handle, cancel scopes, a coroutine frame per level).
After the ``101``, :class:`~muxproxy.io.tunnel.Tunnel` hands a FastStream client over to a
:class:`DetachedTunnel` and its task ends; from then on the client transport's protocol and the
backend connection's reader drive the relay:

* **client → backend** (``on_client_data``): bytes go out as DATA as far as the stream's send
  window allows; the rest waits in ``_pending`` and the client transport stops being read until
  a WINDOW_UPDATE lets it drain (the backend connection wakes the tunnel through ``blocked``,
  and ``set`` calls ``set_window``).
* **backend → client** (``set``, woken as ``conn.news``): chunks are written to the transport at
  once; their credit goes back to the backend only when the transport's buffer is empty again
  (write limits are 0), so a client that stops reading holds at most one stream window here,
  and is dropped after ``send_timeout``.
* **ending**, as the task-driven tunnel does: the close handshake passed both ways → RST_STREAM
  (CANCEL); the client half-closes after its close frame → END_STREAM; it vanishes → RST; the
  backend ends or resets → the client connection closes; ``tunnel_idle_timeout`` of silence,
  or the end of a shutdown's grace period → both close.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..core.relay import StreamState
from ..core.websocket import FrameWatcher

if TYPE_CHECKING:
    from .backend import BackendConnection
    from .fast_stream import FastStream
    from .timers import TimerWheel

log = logging.getLogger("muxproxy.tunnel")


class DetachedTunnel:
    __slots__ = (
        "_closing",
        "_down",
        "_pending",
        "_sending",
        "_unacked",
        "_up",
        "conn",
        "deadline",
        "idle_timeout",
        "on_finished",
        "send_timeout",
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
        on_finished: Callable[[], None],
    ) -> None:
        self.stream = stream
        self.conn = conn
        self.st = st
        self.wheel = wheel
        self.idle_timeout = idle_timeout
        self.send_timeout = send_timeout
        self.on_finished: Callable[[], None] | None = on_finished
        self.deadline = math.inf
        self.timer_bucket: int | None = None
        self._up = FrameWatcher()
        self._down = FrameWatcher()
        self._pending = b""  # client bytes waiting for send window
        self._unacked = 0  # credit of bytes written to the client transport, not yet sent
        self._sending = False  # the client transport's buffer is not empty
        self._closing = False

    def start(self, first: bytes) -> None:
        """Take over: ``first`` is what the client sent after its handshake."""
        self.conn.news[self.st.stream_id] = self
        self.wheel.start(self, self.idle_timeout)
        proto = self.stream._proto
        proto.sink = self
        queued = b"".join(proto.chunks)
        proto.chunks.clear()
        proto.buffered = 0
        if first or queued:
            self.on_client_data(first + queued)
        if proto.eof:
            self.on_client_eof()
        elif proto.lost:
            self.on_client_lost()
        self.set()  # whatever the backend sent already

    # --- client → backend --------------------------------------------------------------------

    def on_client_data(self, data: bytes) -> None:
        if self._closing:
            return
        self._touch()
        self._up.feed(data)
        self._pending += data
        self.set_window()

    def set_window(self) -> None:
        """Send what the stream's window allows (also woken by the backend's WINDOW_UPDATE)."""
        if self._closing:
            return
        conn, sid = self.conn, self.st.stream_id
        core = conn.core
        pending = self._pending
        while pending:
            if sid not in core.streams:
                self._pending = b""
                self.finish()
                return
            n = core.send_window(sid)
            if n <= 0:
                break
            core.send_data(sid, pending[:n])
            pending = pending[n:]
        self._pending = pending
        conn.schedule_flush()
        proto = self.stream._proto
        transport = self.stream._transport
        if pending:
            conn.blocked[sid] = self
            if not proto.paused:
                proto.paused = True
                transport.pause_reading()
        else:
            conn.blocked.pop(sid, None)
            if proto.paused and not proto.lost:
                proto.paused = False
                transport.resume_reading()
            if proto.eof:
                self.on_client_eof()
            elif self._up.closed and self._down.closed:
                self.finish()  # close handshake done both ways: RST_STREAM(CANCEL)

    def on_client_eof(self) -> None:
        if self._closing or self._pending:
            return  # the EOF is acted on once the pending bytes are out
        sid = self.st.stream_id
        core = self.conn.core
        if self._up.closed and sid in core.streams:
            core.end_stream(sid)  # half-close after the close frame; the answer still comes
            self.conn.schedule_flush()
        else:
            self.finish()  # vanished without a close handshake

    def on_client_lost(self) -> None:
        if self._closing:
            self._close_transport()
        else:
            self.finish()

    # --- backend → client --------------------------------------------------------------------

    def set(self) -> None:
        """The backend connection has news for the stream (data, end, reset, a window update,
        or it died): registered both as the stream's ``news`` and, while client bytes wait for
        window, in ``blocked``."""
        if self._closing:
            return
        if self._pending:
            self.set_window()
            if self._closing:
                return
        st = self.st
        chunks = st.chunks
        if chunks:
            out = []
            credit = 0
            for data, n in chunks:
                credit += n
                if data:
                    out.append(data)
                    self._down.feed(data)
            chunks.clear()
            if out:
                self._touch()
                self.stream._transport.write(b"".join(out))
            self._unacked += credit
            if self.stream._transport.get_write_buffer_size():
                if not self._sending:
                    self._sending = True
                    self.wheel.start(self, self.send_timeout)
            else:
                self.on_drained()
        handshake_done = self._up.closed and self._down.closed and not self._pending
        if st.ended or st.reset_code is not None or handshake_done:
            self.finish()

    def _touch(self) -> None:
        """Activity: the idle deadline moves, unless a send deadline runs (a client that
        sends but never reads is dropped at send_timeout all the same)."""
        if not self._sending:
            self.wheel.start(self, self.idle_timeout)

    def on_drained(self) -> None:
        """The client transport's buffer is empty: the credit goes back to the backend."""
        if self._sending:
            self._sending = False
            self.wheel.start(self, self.idle_timeout)
        credit, self._unacked = self._unacked, 0
        if credit and not self._closing:
            self.conn.core.consumed(self.st.stream_id, credit)
            self.conn.schedule_flush()
        if self._closing:
            self._close_transport()

    # --- ending ------------------------------------------------------------------------------

    def on_deadline(self) -> None:
        if self._closing:
            self.stream._transport.abort()  # a client that never took the last bytes
            return
        if self._sending:
            log.info("WebSocket client read nothing for %.3gs: closing", self.send_timeout)
        self.finish()

    def finish(self) -> None:
        """End the tunnel (idempotent): the stream is reset if still open, its credit returned,
        and the client connection closed once what was written to it is out."""
        if self._closing:
            return
        self._closing = True
        conn, st = self.conn, self.st
        proto = self.stream._proto
        proto.sink = None
        if self._unacked:
            conn.core.consumed(st.stream_id, self._unacked)
            self._unacked = 0
        conn.release(st)
        if self.stream._transport.get_write_buffer_size() and not proto.lost:
            self._sending = True
            self.wheel.start(self, self.send_timeout)  # on_drained closes; the deadline aborts
            proto.sink = self
        else:
            self._close_transport()

    def _close_transport(self) -> None:
        self.stream._proto.sink = None
        self.wheel.discard(self)
        transport = self.stream._transport
        if not transport.is_closing():
            transport.close()
        done, self.on_finished = self.on_finished, None
        if done is not None:
            done()
