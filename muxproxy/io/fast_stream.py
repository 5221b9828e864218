"""A leaner byte stream for plain TCP sockets: :class:`FastStream`, and its asyncio (and
uvloop) implementation :class:`AsyncioStream`; trio's is in :mod:`muxproxy.io.trio_stream`.

anyio's asyncio ``SocketStream`` pauses the transport after every ``receive`` and resumes it
before the next (two ``epoll_ctl`` calls per read under uvloop), yields to the event loop twice
on every ``send`` and takes resource guards on both: profiled, that was the largest single cost
of the I/O layer per proxied request.  :class:`AsyncioStream` takes over the same transport
with a protocol of its own:

* Reading stays on; received chunks queue up to ``READ_AHEAD`` bytes, then the transport is
  paused until the consumer catches up, so a client that sends faster than we forward is held
  to that much, as before.
* ``send`` writes and returns at once when the kernel took everything; otherwise it waits until
  the transport's buffer is empty again (write-buffer limits of 0, as anyio sets them): the
  proxy never holds more of a response than the chunk being written, so backpressure still
  reaches the backend through HTTP/2 flow control.
* ``aclose`` closes gracefully when nothing is left to write and aborts otherwise (a client
  that stopped reading must not keep its socket forever).

Errors are anyio's (``EndOfStream``, ``BrokenResourceError``, ``ClosedResourceError``), so the
rest of the proxy cannot tell the two streams apart.

A FastStream can also be handed to callbacks instead of a task (:meth:`FastStream.attach`): a
:class:`StreamSink` then gets the transport's events as they happen (bytes, EOF, loss, write
buffer drained), and drives the stream with the non-blocking methods (``write_nowait``,
``pause_reading``/``resume_reading``, ``close_nowait``).  That is how a WebSocket tunnel holds
no task at all, on asyncio and on trio (``muxproxy.io.detached``).  For TLS, anyio's own streams are
used unchanged.  This is the one module of the I/O layer that touches asyncio directly:
everything here is a fast path taken only when asyncio (or uvloop) runs, with anyio behind it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import select
import socket
from abc import abstractmethod
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

import anyio
import anyio.abc

log = logging.getLogger("muxproxy.server")

READ_AHEAD = 256 * 1024
# Whether trio's lean stream (io/trio_stream.py, an epoll reactor) can run here: Linux.
# Elsewhere trio keeps anyio's streams.
TRIO_STREAMS = hasattr(select, "epoll")


class StreamSink(Protocol):
    """What :meth:`FastStream.attach` delivers the transport's events to, as they happen."""

    def on_data(self, data: bytes) -> None: ...
    def on_eof(self) -> None: ...
    def on_lost(self) -> None: ...
    def on_drained(self) -> None:
        """The write buffer is empty again (only after a write that did not go out at once)."""


class _Protocol(asyncio.Protocol):
    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.chunks: list[bytes] = []  # few at a time; an empty deque would cost ~600 bytes
        self.buffered = 0
        self.eof = False
        self.lost = False
        self.exception: BaseException | None = None
        self.paused = False
        self.reader: asyncio.Future[None] | None = None
        self.writer: asyncio.Future[None] | None = None
        self.write_paused = False
        # Set by FastStream.attach: the events go there directly, with no task.
        self.sink: StreamSink | None = None

    def _wake_reader(self) -> None:
        fut = self.reader
        if fut is not None:
            self.reader = None
            if not fut.done():
                fut.set_result(None)

    def _wake_writer(self) -> None:
        fut = self.writer
        if fut is not None:
            self.writer = None
            if not fut.done():
                fut.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink.on_data(data)
            return
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > READ_AHEAD and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self.eof = True
        if self.sink is not None:
            self.sink.on_eof()
        self._wake_reader()
        return True  # keep the write side open: a half-closed client still gets its response

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.exception = exc
        self._wake_reader()
        self._wake_writer()
        if self.sink is not None:
            self.sink.on_lost()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_writer()
        if self.sink is not None:
            self.sink.on_drained()


class _Accepted(_Protocol):
    """The protocol of a connection accepted by :func:`serve_fast`: FastStream's from the start."""

    def __init__(self) -> None:
        super().__init__(None)  # type: ignore[arg-type]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]


# accept(2) errors that say "not now" about the process, not about one connection: stop
# accepting for a moment (as asyncio's own server does) rather than spin on a ready socket.
_ACCEPT_LATER = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BATCH = 128
ACCEPT_RETRY_DELAY = 1.0


async def serve_fast(
    sock: socket.socket,
    handler: Callable[[FastStream], Awaitable[object]],
    tg: anyio.abc.TaskGroup,
) -> None:
    """Accept on a listening socket until cancelled; each connection gets a task in ``tg``
    running ``handler`` with a FastStream.

    anyio's listener awaits once per accepted connection (one event-loop turn each); uvloop's
    server was measured draining a backlog of 512 new connections at about one per loop turn
    while the loop was busy (≈ 60 a second: the last clients of a burst waited 5 s for their
    first byte).  So we accept ourselves, up to ``ACCEPT_BATCH`` connections per readiness of
    the listening socket, as asyncio's server, nginx (``multi_accept``) and HAProxy do."""
    loop = asyncio.get_running_loop()
    fd = sock.fileno()
    sock.setblocking(False)

    async def serve_one(conn: socket.socket, peer: Any) -> None:
        try:
            transport, proto = await loop.connect_accepted_socket(_Accepted, conn)
        except OSError:
            conn.close()
            return
        await handler(AsyncioStream(transport, proto, peer))

    retry: asyncio.TimerHandle | None = None

    def start(conn: socket.socket, peer: Any) -> None:
        tg.start_soon(serve_one, conn, peer)

    def resume() -> None:
        nonlocal retry
        retry = None
        if sock.fileno() != -1:
            loop.add_reader(fd, accept_ready)

    def accept_ready() -> None:
        nonlocal retry
        if not accept_some(sock, start):
            loop.remove_reader(fd)
            retry = loop.call_later(ACCEPT_RETRY_DELAY, resume)

    loop.add_reader(fd, accept_ready)
    try:
        await anyio.sleep_forever()
    finally:  # (a pause in progress must not re-arm accepting after shutdown)
        loop.remove_reader(fd)
        if retry is not None:
            retry.cancel()


def accept_some(sock: socket.socket, start: Callable[[socket.socket, Any], object]) -> bool:
    """Accept up to ``ACCEPT_BATCH`` connections waiting on the listening ``sock`` and hand
    each to ``start(conn, peer)``, TCP_NODELAY set, ``peer`` as anyio's ``remote_address``
    gives it.  False when accept(2) said "not now" about the whole process (``_ACCEPT_LATER``):
    the caller stops accepting for ``ACCEPT_RETRY_DELAY``.  (serve_fast and serve_trio.)"""
    for _ in range(ACCEPT_BATCH):
        try:
            conn, peer = sock.accept()
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as exc:
            if exc.errno in _ACCEPT_LATER:
                log.warning("accept: %s; pausing for %.0f s", exc.strerror, ACCEPT_RETRY_DELAY)
                return False
            continue  # that one connection failed (ECONNABORTED and the like)
        try:
            if conn.family in _TCP:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            conn.close()
            continue
        start(conn, _sockaddr(peer))
    return True


def nothing_to_read(
    closed: bool, eof: bool, lost: bool, exc: BaseException | None, busy: bool
) -> None:
    """What ``receive`` raises when nothing is queued, if it must not wait (both streams)."""
    if closed:
        raise anyio.ClosedResourceError
    if eof:
        raise anyio.EndOfStream
    if lost:
        if exc is not None:
            raise anyio.BrokenResourceError from exc
        raise anyio.EndOfStream
    if busy:
        raise anyio.BusyResourceError("reading from")


class FastStream(anyio.abc.SocketStream):
    """A plain TCP stream the proxy drives itself: what both lean streams offer, on top of
    anyio's ``SocketStream``.  :class:`AsyncioStream` (here) is one, over an asyncio
    transport; :class:`~muxproxy.io.trio_stream.TrioStream` is the other, over a non-blocking
    socket with ``trio.lowlevel``.  The rest of the proxy sees only this interface."""

    peer: Any  # the client's address as accept() gave it (None: not accepted by us)

    async def send(self, item: bytes) -> None:
        if not self.write_nowait(item):
            await self.drained()

    async def aclose(self) -> None:
        self.close_nowait()

    @abstractmethod
    def write_nowait(self, item: bytes) -> bool:
        """Write ``item``: True when the kernel took all of it, False when the caller must
        still ``await drained()`` (the bytes are queued either way).  Raises as send() does."""

    @abstractmethod
    async def drained(self) -> None:
        """Wait until everything written was taken by the kernel."""

    @abstractmethod
    def attach(self, sink: StreamSink | None) -> bytes:
        """Deliver the stream's events to ``sink`` from now on, with no task (None: back to
        ``receive``).  Returns the bytes received but not yet read, which the sink takes over;
        an EOF or loss that already happened is not replayed: see :attr:`at_eof` and
        :attr:`lost`."""

    @property
    @abstractmethod
    def at_eof(self) -> bool:
        """The peer half-closed (sent FIN)."""

    @property
    @abstractmethod
    def lost(self) -> bool:
        """The connection is gone (reset, closed or aborted)."""

    @property
    @abstractmethod
    def read_paused(self) -> bool:
        """Reading is paused (by the sink, or because ``READ_AHEAD`` bytes wait)."""

    @property
    @abstractmethod
    def buffered(self) -> int:
        """Bytes read and queued for ``receive``."""

    @abstractmethod
    def pause_reading(self) -> None:
        """Stop reading the socket until :meth:`resume_reading` (idempotent)."""

    @abstractmethod
    def resume_reading(self) -> None:
        """Read the socket again (idempotent; nothing once the connection is lost)."""

    @abstractmethod
    def write_buffer_size(self) -> int:
        """Bytes written and not yet taken by the kernel."""

    @abstractmethod
    def close_nowait(self) -> None:
        """Close now: gracefully when everything written went out, else by aborting (a peer
        that stopped reading must not keep its socket: nothing to wait for).  Idempotent."""


class AsyncioStream(FastStream):
    """An anyio socket stream over an asyncio transport, without per-call pause/resume.

    anyio's stream and protocol objects are dropped once the transport is taken over (an idle
    connection would otherwise keep two Events and three deques alive for nothing)."""

    def __init__(
        self, transport: asyncio.Transport, accepted: _Protocol | None = None, peer: Any = None
    ) -> None:
        self._transport = transport
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self.peer = peer  # the client's address, as accept() gave it (serve_fast), else None
        if accepted is not None:  # ours from the start (serve_fast)
            self._proto = accepted
            transport.set_write_buffer_limits(0)
            return
        proto = _Protocol(transport)
        old: Any = transport.get_protocol()
        # Whatever anyio's protocol already received moves over, in order.
        for chunk in getattr(old, "read_queue", ()):
            proto.chunks.append(chunk)
            proto.buffered += len(chunk)
        proto.eof = bool(getattr(old, "is_at_eof", False))
        proto.exception = getattr(old, "exception", None)
        transport.set_protocol(proto)
        transport.set_write_buffer_limits(0)
        self._proto = proto
        if transport.is_closing():
            proto.lost = True
        else:
            transport.resume_reading()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        proto = self._proto
        while not proto.chunks:
            nothing_to_read(
                self._closed, proto.eof, proto.lost, proto.exception, proto.reader is not None
            )
            fut = proto.reader = self._loop.create_future()
            try:
                await fut
            finally:
                if proto.reader is fut:
                    proto.reader = None
        chunk = proto.chunks[0]
        if len(chunk) > max_bytes:
            chunk, proto.chunks[0] = chunk[:max_bytes], chunk[max_bytes:]
        else:
            del proto.chunks[0]
        proto.buffered -= len(chunk)
        if proto.paused and proto.buffered <= READ_AHEAD // 2 and not proto.lost:
            proto.paused = False
            self._transport.resume_reading()
        return chunk

    def write_nowait(self, item: bytes) -> bool:
        proto = self._proto
        if self._closed:
            raise anyio.ClosedResourceError
        if proto.lost or self._transport.is_closing():
            raise anyio.BrokenResourceError from proto.exception
        self._transport.write(item)
        return not proto.write_paused and not proto.lost

    async def drained(self) -> None:
        """Wait until the transport's buffer is empty (write limits are 0)."""
        proto = self._proto
        while proto.write_paused:
            if proto.lost:
                raise anyio.BrokenResourceError from proto.exception
            if proto.writer is not None:
                raise anyio.BusyResourceError("writing to")
            fut = proto.writer = self._loop.create_future()
            try:
                await fut
            finally:
                if proto.writer is fut:
                    proto.writer = None
        if proto.lost:
            raise anyio.BrokenResourceError from proto.exception

    async def send_eof(self) -> None:
        try:
            self._transport.write_eof()
        except OSError:
            pass

    # --- callbacks instead of a task (see StreamSink) ----------------------------------------

    def attach(self, sink: StreamSink | None) -> bytes:
        proto = self._proto
        proto.sink = sink
        if sink is None:
            return b""
        queued = b"".join(proto.chunks)
        proto.chunks.clear()
        proto.buffered = 0
        return queued

    @property
    def at_eof(self) -> bool:
        return self._proto.eof

    @property
    def lost(self) -> bool:
        return self._proto.lost

    @property
    def read_paused(self) -> bool:
        return self._proto.paused

    @property
    def buffered(self) -> int:
        return self._proto.buffered

    def pause_reading(self) -> None:
        proto = self._proto
        if not proto.paused:
            proto.paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        proto = self._proto
        if proto.paused and not proto.lost:
            proto.paused = False
            self._transport.resume_reading()

    def write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def close_nowait(self) -> None:
        if self._closed:
            return
        self._closed = True
        transport = self._transport
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()
        self._proto._wake_reader()
        self._proto._wake_writer()

    @property
    def _raw_socket(self) -> socket.socket:
        sock: socket.socket = self._transport.get_extra_info("socket")
        return sock


Future = asyncio.Future[None]
EventLoop = asyncio.AbstractEventLoop


def asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio (or uvloop) loop, or None under trio.  Callers keep it: on Python
    3.11 each lookup costs a getpid() system call."""
    return asyncio._get_running_loop()


def start_task(
    loop: EventLoop,
    coro: Coroutine[Any, Any, None],
    done: Callable[[BaseException | None], None],
) -> Callable[[], object]:
    """Run ``coro`` as a bare task of ``loop``, outside any task group (the caller owns its
    lifetime: it cancels and awaits it itself).  ``done`` gets the exception it ended with
    (None when it returned or was cancelled).  Returns the task's ``cancel``."""

    def report(task: asyncio.Task[None]) -> None:
        done(None if task.cancelled() else task.exception())

    task = loop.create_task(coro)
    task.add_done_callback(report)
    return task.cancel


_TCP = (socket.AF_INET, socket.AF_INET6)


def _sockaddr(addr: Any) -> Any:
    """accept()'s address as anyio's ``remote_address`` gives it: (host, port), an IPv6
    scope id kept as ``host%scope``."""
    if isinstance(addr, tuple) and len(addr) == 4:
        host, port, _flowinfo, scope = addr
        return (f"{host}%{scope}" if scope else host, port)
    return addr


def accepted_peer(stream: anyio.abc.ByteStream) -> Any:
    """The peer address of a connection just accepted, with TCP_NODELAY set.  Raises as
    ``extra()`` does when the peer is gone already.  A FastStream from :func:`serve_fast`
    had both done at accept(): no getpeername() and none of anyio's attribute tables per
    connection (those were ~6 % of the CPU at one request per connection, py-spy)."""
    if isinstance(stream, FastStream) and stream.peer is not None:
        return stream.peer
    peer = stream.extra(anyio.abc.SocketAttribute.remote_address)
    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
    if sock is not None and sock.family in _TCP:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return peer


def asyncio_running() -> bool:
    """Whether the running loop is asyncio's (or uvloop), not trio."""
    return asyncio_loop() is not None


def fast_stream(stream: anyio.abc.ByteStream) -> anyio.abc.ByteStream:
    """``stream`` as an :class:`AsyncioStream` when it is anyio's plain TCP stream on asyncio
    (trio's counterpart: :func:`muxproxy.io.trio_stream.trio_stream`)."""
    transport = getattr(stream, "_transport", None)
    if (
        type(stream).__module__ == "anyio._backends._asyncio"
        and hasattr(transport, "set_protocol")  # asyncio's or uvloop's (not a subclass)
        and not transport.is_closing()  # type: ignore[union-attr]
    ):
        return AsyncioStream(transport)  # type: ignore[arg-type]
    return stream
