"""WebSocket tunnels driven by two tasks: for TLS and HTTP/2 clients, and over backend sockets.

:class:`TaskTunnel` feeds a :class:`~muxproxy.core.tunnel.TunnelCore` from an upstream task
(client → backend) and a downstream task (backend → client), and carries out its actions; every
rule is the core's.  The backend side is a :class:`BackendPort`:

* :class:`StreamPort`: an extended CONNECT stream on a pooled HTTP/2 connection (RFC 8441) or
  HTTP/3 connection (RFC 9220); bytes go out as the stream's send window allows, DATA is
  acknowledged once written to the client;
* :class:`SocketPort`: a dedicated byte stream (an HTTP/1.1 connection after its ``101``):
  its ``send`` blocks instead of a window, and the next bytes are read only once the last were
  written to the client, so TCP carries the backpressure.

:func:`relay_socket` is the entry point for the latter, for whoever made the connection.
With a plain-TCP client (asyncio or trio), pooled streams use the task-free
:class:`~muxproxy.io.detached.DetachedTunnel` instead (an idle WebSocket costs far less).
"""

from __future__ import annotations

import math
from typing import Protocol

import anyio
import anyio.abc

from ..core.relay import StreamState
from ..core.tunnel import (
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
from ..errors import ClientGone
from .backend import NETWORK_ERRORS, BackendConnection, Signal
from .timers import TimerWheel

# What a socket offers as its "window": everything (its send waits for the kernel instead).
UNLIMITED = 1 << 30


class TunnelClient(Protocol):
    """What a task-driven tunnel needs of the client connection."""

    async def receive(self) -> bytes:
        """The next bytes, b"" at EOF; raises ClientGone."""

    async def send(self, data: bytes) -> None:
        """Write, within the client's send timeout; raises ClientGone."""


class BackendPort(Protocol):
    """The backend side of a task-driven tunnel."""

    def window(self) -> int:
        """Bytes that may be sent now."""

    async def wait_window(self) -> None:
        """Until the window may have opened (or the stream changed)."""

    async def send(self, data: bytes) -> None: ...
    async def end(self) -> None: ...
    def credit(self, amount: int) -> None: ...
    def reset(self) -> None: ...
    async def news(self, core: TunnelCore, wheel: TimerWheel) -> list[Action]:
        """Wait for the backend's next news and feed it to ``core``: its actions."""


class StreamPort:
    """An extended CONNECT stream on a pooled HTTP/2 or HTTP/3 connection."""

    __slots__ = ("_news", "_window", "conn", "st")

    def __init__(self, conn: BackendConnection, st: StreamState, news: Signal) -> None:
        self.conn = conn
        self.st = st
        self._news = news  # registered as conn.news[stream id] by the caller
        self._window = Signal(conn.loop)

    def window(self) -> int:
        return self.conn.core.send_window(self.st.stream_id)

    async def wait_window(self) -> None:
        sid = self.st.stream_id
        self.conn.blocked[sid] = self._window
        try:
            await self._window.wait()
        finally:
            self.conn.blocked.pop(sid, None)

    async def send(self, data: bytes) -> None:
        self.conn.core.send_data(self.st.stream_id, data)
        self.conn.schedule_flush()

    async def end(self) -> None:
        self.conn.core.end_stream(self.st.stream_id)
        self.conn.schedule_flush()

    def credit(self, amount: int) -> None:
        self.conn.core.consumed(self.st.stream_id, amount)
        self.conn.schedule_flush()

    def reset(self) -> None:
        self.conn.release(self.st)  # resets the stream if it is still open

    async def news(self, core: TunnelCore, wheel: TimerWheel) -> list[Action]:
        while True:
            actions = core.stream_news(self.st, wheel.now)
            if actions or core.finished:
                return actions
            await self._news.wait()


class SocketPort:
    """A dedicated byte stream to the backend; its owner closes it."""

    __slots__ = ("_first", "stream")

    def __init__(self, stream: anyio.abc.ByteStream, first: bytes = b"") -> None:
        self.stream = stream
        self._first = first  # what the backend sent right after its handshake

    def window(self) -> int:
        return UNLIMITED

    async def wait_window(self) -> None:
        """Never needed: the window never closes."""

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def end(self) -> None:
        try:
            await self.stream.send_eof()
        except NotImplementedError:  # (TLS before 1.3 cannot half-close)
            pass

    def credit(self, amount: int) -> None:
        """Nothing to acknowledge: the next read waits for the last write instead."""

    def reset(self) -> None:
        """Nothing to send: the owner closes the socket when the tunnel returns."""

    async def news(self, core: TunnelCore, wheel: TimerWheel) -> list[Action]:
        data, self._first = self._first, b""
        if not data:
            try:
                data = await self.stream.receive()
            except anyio.EndOfStream:
                return core.backend_end(wheel.now)
            except NETWORK_ERRORS:
                return core.backend_reset(wheel.now)
        return core.backend_data(((data, len(data)),), wheel.now)


class TaskTunnel:
    """Drives a :class:`TunnelCore` with an upstream and a downstream task."""

    __slots__ = ("_scope", "client", "core", "deadline", "port", "timer_bucket", "wheel")

    def __init__(
        self,
        client: TunnelClient,
        port: BackendPort,
        *,
        wheel: TimerWheel,
        idle_timeout: float,
        send_timeout: float,
    ) -> None:
        self.client = client
        self.port = port
        self.wheel = wheel
        self.core = TunnelCore(idle_timeout, send_timeout)
        self.deadline = math.inf  # the wheel's
        self.timer_bucket: int | None = None
        self._scope: anyio.CancelScope | None = None

    async def run(self, first: bytes = b"") -> str:
        """Relay until the tunnel ends; ``first`` is what the client sent after its handshake.
        Returns why it ended (a code of ``core.outcome.REASONS``)."""
        try:
            with anyio.CancelScope() as self._scope:
                await self._run(self.core.start(self.wheel.now))
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._upstream, first)
                    await self._downstream()
                    tg.cancel_scope.cancel()
        finally:
            core = self.core
            if not core.closed:  # cancelled from outside: the client connection is going away
                for action in core.client_gone(self.wheel.now):  # (its send_timeout, a shutdown)
                    self._apply(action)
            self._scope = None
            self.wheel.discard(self)
        return core.reason

    def on_deadline(self) -> None:
        for action in self.core.tick(self.wheel.now):
            self._apply(action)

    async def _upstream(self, first: bytes) -> None:
        core, port, client, wheel = self.core, self.port, self.client, self.wheel
        try:
            if first:
                await self._run(core.client_data(first, wheel.now))
            while True:
                while core.wants_window:
                    n = port.window()
                    if n > 0:
                        await self._run(core.window_opened(n, wheel.now))
                    else:
                        await port.wait_window()
                if not core.reading:
                    return
                data = await client.receive()
                if data:
                    await self._run(core.client_data(data, wheel.now))
                else:
                    await self._run(core.client_eof(wheel.now))
        except ClientGone:
            await self._run(core.client_gone(wheel.now))

    async def _downstream(self) -> None:
        core, port, wheel = self.core, self.port, self.wheel
        while not core.finished:
            await self._run(await port.news(core, wheel))

    async def _run(self, actions: list[Action]) -> None:
        core = self.core
        report = None
        for action in actions:
            if type(action) is WriteToClient:
                try:
                    await self.client.send(action.data)
                except ClientGone:
                    report = core.client_gone
                else:
                    report = core.client_drained
            elif type(action) is SendToBackend:
                try:
                    await self.port.send(action.data)
                except NETWORK_ERRORS:
                    report = core.backend_reset
            elif type(action) is EndBackend:
                try:
                    await self.port.end()
                except NETWORK_ERRORS:
                    report = core.backend_reset
            else:
                self._apply(action)
        if report is not None:  # once the actions are carried out, in order
            await self._run(report(self.wheel.now))

    def _apply(self, action: Action) -> None:
        """The actions that never wait (all that a tick, a loss or a reset can give)."""
        if type(action) is ArmDeadline:
            self.wheel.set(self, action.when)
        elif type(action) is CreditBackend:
            self.port.credit(action.amount)
        elif type(action) is ResetBackend:
            self.port.reset()
        elif type(action) is CloseClient:
            if self._scope is not None:
                self._scope.cancel()
        else:
            raise AssertionError(f"{action!r} needs the task path")


async def relay_socket(
    client: TunnelClient,
    stream: anyio.abc.ByteStream,
    *,
    wheel: TimerWheel,
    idle_timeout: float,
    send_timeout: float,
    client_first: bytes = b"",
    backend_first: bytes = b"",
) -> str:
    """Relay a WebSocket between ``client`` and a dedicated backend connection that answered
    its HTTP/1.1 Upgrade with ``101``, by the rules of :class:`TunnelCore`, until it ends.

    ``client_first``/``backend_first``: bytes each side sent right after the handshake.
    ``stream`` stays the caller's to close.  Returns why the tunnel ended (a REASONS code)."""
    tunnel = TaskTunnel(
        client,
        SocketPort(stream, backend_first),
        wheel=wheel,
        idle_timeout=idle_timeout,
        send_timeout=send_timeout,
    )
    return await tunnel.run(client_first)


__all__ = ["BackendPort", "SocketPort", "StreamPort", "TaskTunnel", "TunnelClient", "relay_socket"]
