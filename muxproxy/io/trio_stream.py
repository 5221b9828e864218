"""The lean stream on trio: plain TCP sockets driven through ``trio.lowlevel``.

anyio's trio ``SocketStream`` wraps trio's socket, which passes two checkpoints around every
``recv`` and ``send`` that succeeds at once (a scheduler trip each) and holds resource guards;
and a read that finds nothing costs a failed ``recv`` (an exception), an ``epoll_ctl`` (trio
arms the descriptor one-shot per wait) and a second ``recv``.  :class:`TrioStream` reads the
way an asyncio transport does for its protocol, through the run's :class:`Reactor`: one epoll
instance of our own, watched by one system task (an epoll descriptor is readable while any
socket in it is ready, so trio's I/O manager sees one file descriptor for all of them).  A
socket stays in that set from its first ``receive`` to its close, its interest following its
state (reading unless paused or at EOF); when it is readable the reactor calls ``recv()`` once
and queues the bytes, up to ``READ_AHEAD`` before it stops reading, and wakes the task parked
in ``receive`` (:class:`Parked`).  Writes go straight to the kernel; only what it did not take
waits (``wait_writable``), never more than that one piece, as on asyncio with write limits
of 0.  The rest of the proxy sees the same :class:`~muxproxy.io.fast_stream.FastStream`
interface as :class:`~muxproxy.io.fast_stream.AsyncioStream`.

**Callbacks without a task.**  A parked task per idle WebSocket costs kilobytes.  An attached
TrioStream (:meth:`TrioStream.attach`, a :class:`~muxproxy.io.detached.DetachedTunnel` on it)
hands what the reactor reads to its sink instead of the queue, has the reactor write what the
kernel could not take at once as the socket drains, and reports EOF and loss; a paused tunnel
costs no wake-ups, and stays registered with no interest so that a hang-up is still reported.

:func:`serve_trio` accepts in batches (``ACCEPT_BATCH`` per readiness, as ``serve_fast`` does
on asyncio) and gives each connection a task running the handler with a TrioStream.

This is the one module of the I/O layer that touches trio directly; it is imported only while
trio runs, and only on Linux (``select.epoll``).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import trio

from .fast_stream import (
    ACCEPT_RETRY_DELAY,
    READ_AHEAD,
    FastStream,
    StreamSink,
    accept_some,
    nothing_to_read,
)

log = logging.getLogger("muxproxy.server")

READ_SIZE = 65536
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_BROKEN = select.EPOLLERR | select.EPOLLHUP
_EVENTS_PER_POLL = 256


class TrioStream(FastStream):
    """A plain TCP socket on trio, read by the run's :class:`Reactor`, written directly."""

    def __init__(self, sock: socket.socket, peer: Any = None) -> None:
        sock.setblocking(False)
        self._sock = sock
        self.peer = peer
        self._closed = False
        self._eof = False
        self._lost = False
        self._exc: OSError | None = None
        self._chunks: list[bytes] = []  # read, waiting for ``receive`` (a task reads)
        self._buffered = 0
        self._reader: Parked | None = None  # the task waiting in ``receive``
        self._out: memoryview | None = None  # what the kernel has not taken yet
        self._sink: StreamSink | None = None
        self._reading = False  # in the reactor since the first receive or attach
        self._paused = False
        self._mask: int | None = None  # the reactor's interest (None: not in its epoll set)

    # --- a task reads and writes -------------------------------------------------------------

    async def receive(self, max_bytes: int = READ_SIZE) -> bytes:
        chunks = self._chunks
        while not chunks:
            nothing_to_read(
                self._closed, self._eof, self._lost, self._exc, self._reader is not None
            )
            if not self._reading:
                self._reading = True
                self._watch()
            parked = self._reader = Parked()
            try:
                await parked.wait()
            finally:
                if self._reader is parked:
                    self._reader = None
        chunk = chunks[0]
        if len(chunk) > max_bytes:
            chunk, chunks[0] = chunk[:max_bytes], chunk[max_bytes:]
        else:
            del chunks[0]
        self._buffered -= len(chunk)
        if self._paused and self._buffered <= READ_AHEAD // 2:
            self._paused = False
            self._watch()
        return chunk

    def write_nowait(self, item: bytes) -> bool:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._lost:
            raise anyio.BrokenResourceError from self._exc
        if self._out is not None:  # behind what is still waiting: after it, in order
            self._out = memoryview(bytes(self._out) + bytes(item))
            return False
        try:
            sent = self._sock.send(item)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._gone(exc)
            raise anyio.BrokenResourceError from exc
        if sent == len(item):
            return True
        self._out = memoryview(bytes(item[sent:]))  # a copy: the caller may reuse its buffer
        if self._sink is not None:
            self._watch()
        return False

    async def drained(self) -> None:
        while self._out is not None:
            try:
                await trio.lowlevel.wait_writable(self._sock)
            except trio.ClosedResourceError:
                raise anyio.ClosedResourceError from None
            if self._closed:  # (closed while this task was being woken)
                raise anyio.ClosedResourceError
            try:
                self._push()
            except OSError as exc:
                raise anyio.BrokenResourceError from exc
        if self._closed:
            raise anyio.ClosedResourceError
        if self._lost:
            raise anyio.BrokenResourceError from self._exc

    async def send_eof(self) -> None:
        try:
            await self.drained()
            self._sock.shutdown(socket.SHUT_WR)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    def _push(self) -> None:
        """Write what waits, as far as the kernel takes it.  Raises OSError (connection gone)."""
        out = self._out
        if out is None:
            return
        try:
            sent = self._sock.send(out)
        except BlockingIOError:
            return
        except OSError as exc:
            self._gone(exc)
            raise
        self._out = out[sent:] if sent < len(out) else None

    def _gone(self, exc: OSError | None) -> None:
        self._lost = True
        self._exc = exc
        self._out = None

    def _wake_reader(self) -> None:
        parked = self._reader
        if parked is not None:
            self._reader = None
            parked.set_result(None)

    # --- callbacks instead of a task (see StreamSink) ----------------------------------------

    def attach(self, sink: StreamSink | None) -> bytes:
        self._sink = sink
        self._reading = True
        queued = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        self._watch()
        return queued

    @property
    def at_eof(self) -> bool:
        return self._eof

    @property
    def lost(self) -> bool:
        return self._lost

    @property
    def read_paused(self) -> bool:
        return self._paused

    @property
    def buffered(self) -> int:
        return self._buffered

    def pause_reading(self) -> None:
        if not self._paused:
            self._paused = True
            self._watch()

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self._watch()

    def write_buffer_size(self) -> int:
        out = self._out
        return 0 if out is None else len(out)

    def close_nowait(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sink = None
        self._watch()  # out of the reactor before the descriptor goes
        self._out = None  # (a peer that stopped reading: dropped, as asyncio's abort does)
        sock = self._sock
        trio.lowlevel.notify_closing(sock)  # a task waiting to write gets ClosedResourceError
        sock.close()
        self._wake_reader()

    def _watch(self) -> None:
        """Tell the reactor what this stream waits for now.  A stream stays in the epoll set
        even with no interest (paused, at EOF, nothing to write): epoll still reports an error
        or hang-up then, so a paused tunnel learns that its client is gone."""
        want: int | None = None
        if self._reading and not (self._lost or self._closed):
            want = 0 if self._paused or self._eof else _IN
            if self._out is not None and self._sink is not None:
                want |= _OUT
        if want != self._mask:
            reactor().watch(self._sock.fileno(), self, self._mask, want)
            self._mask = want

    def ready(self, events: int) -> None:
        """The reactor saw ``events`` on the socket."""
        sink = self._sink
        if sink is not None and self._out is not None and events & (_OUT | _BROKEN):
            try:
                self._push()
            except OSError:
                self._watch()
                self._lost_or_eof(sink)
                return
            if self._out is None:
                self._watch()
                sink.on_drained()
                if self._sink is not sink:
                    return
        if (self._mask or 0) & _IN and events & (_IN | _BROKEN):
            try:
                data = self._sock.recv(READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                self._gone(exc)
                self._watch()
                self._lost_or_eof(sink)
                return
            if not data:
                self._eof = True
                self._watch()
                self._lost_or_eof(sink)
            elif sink is not None:
                sink.on_data(data)
            else:
                self._chunks.append(data)
                self._buffered += len(data)
                if self._buffered > READ_AHEAD:  # the task is behind: leave it in the kernel
                    self._paused = True
                    self._watch()
                self._wake_reader()
        elif events & _BROKEN and self._out is None and not self._lost:
            # (Not reading, nothing to write, and the socket died: that is loss, reported
            # once; epoll would report it on every poll.)
            self._gone(None)
            self._watch()
            self._lost_or_eof(sink)

    def _lost_or_eof(self, sink: StreamSink | None) -> None:
        """Report what ``_lost``/``_eof`` now say: to the sink, or to a task in ``receive``."""
        if sink is None:
            self._wake_reader()
        elif self._lost:
            sink.on_lost()
        else:
            sink.on_eof()

    @property
    def _raw_socket(self) -> socket.socket:
        return self._sock


class Parked:
    """One task parked until :meth:`set_result`: on trio, what a bare future is to
    :class:`~muxproxy.io.backend.Signal` on asyncio (an anyio Event per wait costs a backend
    lookup, an Event and a parking lot)."""

    __slots__ = ("_done", "_task")

    def __init__(self) -> None:
        self._task = trio.lowlevel.current_task()
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, _: None) -> None:
        if not self._done:
            self._done = True
            trio.lowlevel.reschedule(self._task)

    async def wait(self) -> None:
        def abort(_: object) -> trio.lowlevel.Abort:
            self._done = True  # cancelled: a later set_result must not wake the task
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


class Reactor:
    """One epoll instance of attached :class:`TrioStream` sockets, and the task that waits
    on it (a system task of the trio run: it ends with the run)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._streams: dict[int, TrioStream] = {}

    def watch(self, fd: int, stream: TrioStream, old: int | None, new: int | None) -> None:
        """``stream``'s interest goes from ``old`` to ``new`` (None: not in the set)."""
        if old is None:
            assert new is not None
            self._epoll.register(fd, new)
            self._streams[fd] = stream
        elif new is None:
            del self._streams[fd]
            with contextlib.suppress(OSError):  # (gone from the set already if it was closed)
                self._epoll.unregister(fd)
        else:
            self._epoll.modify(fd, new)

    async def run(self) -> None:
        epoll, streams = self._epoll, self._streams
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, events in epoll.poll(0, _EVENTS_PER_POLL):
                    stream = streams.get(fd)
                    if stream is None:
                        continue
                    try:
                        stream.ready(events)
                    except Exception as exc:  # a bug costs that connection, never the others
                        log.error("attached stream: internal error: %r", exc, exc_info=True)
                        stream.close_nowait()
        finally:
            epoll.close()


_REACTOR: trio.lowlevel.RunVar[Reactor] = trio.lowlevel.RunVar("muxproxy_reactor")


def reactor() -> Reactor:
    """This trio run's reactor, started on first use."""
    try:
        return _REACTOR.get()
    except LookupError:
        r = Reactor()
        _REACTOR.set(r)
        trio.lowlevel.spawn_system_task(r.run, name="muxproxy reactor")
        return r


async def serve_trio(
    sock: socket.socket,
    handler: Callable[[FastStream], Awaitable[object]],
    tg: anyio.abc.TaskGroup,
) -> None:
    """Accept on a listening socket until cancelled; each connection gets a task in ``tg``
    running ``handler`` with a TrioStream (anyio's listener accepts one per scheduler turn)."""
    sock.setblocking(False)

    async def serve_one(conn: socket.socket, peer: Any) -> None:
        await handler(TrioStream(conn, peer))

    def start(conn: socket.socket, peer: Any) -> None:
        tg.start_soon(serve_one, conn, peer)

    while True:
        await trio.lowlevel.wait_readable(sock)
        if not accept_some(sock, start):
            await trio.sleep(ACCEPT_RETRY_DELAY)


def trio_stream(stream: anyio.abc.ByteStream) -> anyio.abc.ByteStream:
    """``stream`` (anyio's, on trio) as a :class:`TrioStream` when it is a plain socket stream;
    anyio's stream object is dropped, the socket lives on in ours."""
    if not isinstance(stream, anyio.abc.SocketStream):
        return stream
    return TrioStream(stream.extra(anyio.abc.SocketAttribute.raw_socket))
