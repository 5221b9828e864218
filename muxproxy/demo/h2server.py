"""A small HTTP/2 (h2c) origin server on anyio, for ``muxproxy demo`` and for tests.

It is a real h2 peer — the same ``h2`` state machine, real sockets, real flow control — whose
behaviour is a coroutine per request, so tests can script what a backend does: answer, stream
slowly, stall, reset, send GOAWAY, refuse streams.  It counts the TCP connections it accepted
and every request it processed.
"""

from __future__ import annotations

import logging
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import anyio
import anyio.abc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from anyio.streams.tls import TLSListener

from ..io.transport import NETWORK_ERRORS

log = logging.getLogger("muxproxy.h2server")

Handler = Callable[["OriginRequest"], Awaitable[None]]


class _GracefulServerStateMachine(h2.connection.H2ConnectionStateMachine):
    """Like nginx: after sending GOAWAY, keep serving the streams at or below last_stream_id
    (h2 alone would refuse every further frame)."""

    _transitions = {
        **h2.connection.H2ConnectionStateMachine._transitions,
        (h2.connection.ConnectionState.SERVER_OPEN, h2.connection.ConnectionInputs.SEND_GOAWAY): (
            None,
            h2.connection.ConnectionState.SERVER_OPEN,
        ),
    }


class OriginRequest:
    """One request stream on the origin: read the body, answer, or misbehave on purpose."""

    def __init__(self, conn: OriginConnection, stream_id: int, headers: list[tuple[bytes, bytes]]):
        self.conn = conn
        self.stream_id = stream_id
        self.headers = headers
        pseudo = {k: v for k, v in headers if k.startswith(b":")}
        self.method = pseudo.get(b":method", b"")
        self.path = pseudo.get(b":path", b"")
        self.authority = pseudo.get(b":authority", b"")
        self.protocol = pseudo.get(b":protocol")
        self._chunks: deque[bytes] = deque()
        self.body_complete = False
        self.reset_by_peer: int | None = None
        self.flow_blocked = anyio.Event()  # set the first time a send waits for credit
        self._news = anyio.Event()

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def _wake(self) -> None:
        self._news.set()
        self._news = anyio.Event()

    async def read_chunk(self) -> bytes | None:
        """The next piece of the request body (acknowledged to the peer now), None at its end."""
        while not self._chunks:
            if self.body_complete or self.reset_by_peer is not None:
                return None
            await self._news.wait()
        data = self._chunks.popleft()
        self.conn.ack(self.stream_id, len(data))
        return data

    async def read_body(self) -> bytes:
        parts = []
        while (chunk := await self.read_chunk()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    async def respond(
        self,
        status: int = 200,
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes = b"",
        *,
        end: bool = True,
    ) -> None:
        head = [(b":status", str(status).encode()), *(headers or [])]
        if end and body and not any(k == b"content-length" for k, _ in head):
            head.append((b"content-length", str(len(body)).encode()))
        await self.conn.send_headers(self.stream_id, head, end_stream=end and not body)
        if body:
            await self.send_data(body, end=end)

    async def send_data(self, data: bytes, *, end: bool = False) -> None:
        """Send body bytes, waiting for flow-control credit as a real server must."""
        await self.conn.send_data(self.stream_id, data, end)

    async def end(self) -> None:
        await self.conn.send_data(self.stream_id, b"", True)

    async def reset(self, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        await self.conn.reset(self.stream_id, code)


class OriginConnection:
    def __init__(self, server: H2Origin, stream: anyio.abc.ByteStream) -> None:
        self.server = server
        self.stream = stream
        cfg = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(cfg)
        self.h2.state_machine = _GracefulServerStateMachine()
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: server.max_concurrent_streams,
                h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: int(server.connect_protocol),
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: server.initial_window,
            },
        )
        self.requests: dict[int, OriginRequest] = {}
        self.processed = 0
        self.last_stream_id: int | None = None  # set once GOAWAY was sent
        self._window = anyio.Event()
        self._lock = anyio.Lock()
        self.closed = False
        self.frozen = False  # a black hole: reads nothing, answers nothing (not even PING)

    async def flush(self) -> None:
        async with self._lock:
            data = self.h2.data_to_send()
            if data and not self.closed:
                try:
                    await self.stream.send(data)
                except NETWORK_ERRORS:
                    self.closed = True

    def ack(self, stream_id: int, n: int) -> None:
        try:
            self.h2.acknowledge_received_data(n, stream_id)
        except h2.exceptions.ProtocolError:
            return
        self.server.spawn(self.flush)

    async def send_headers(
        self, sid: int, headers: list[tuple[bytes, bytes]], end_stream: bool
    ) -> None:
        self.h2.send_headers(sid, headers, end_stream=end_stream)
        await self.flush()

    async def send_data(self, sid: int, data: bytes, end: bool) -> None:
        view = memoryview(data)
        while True:
            req = self.requests.get(sid)
            if (req is not None and req.reset_by_peer is not None) or self.closed:
                return
            window = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            if view and window <= 0:
                if req is not None:
                    req.flow_blocked.set()
                event = self._window
                await event.wait()
                continue
            piece, view = view[:window], view[window:]
            self.h2.send_data(sid, bytes(piece), end_stream=end and not view)
            await self.flush()
            if not view:
                return

    async def reset(self, sid: int, code: int) -> None:
        try:
            self.h2.reset_stream(sid, code)
        except h2.exceptions.StreamClosedError:
            return
        await self.flush()

    def goaway(self, last_stream_id: int | None = None, error_code: int = 0) -> None:
        """Queue GOAWAY (by default naming the highest stream seen); streams above it are
        ignored from now on, as nginx does, and the connection closes when the rest finish."""
        self.h2.close_connection(error_code=error_code, last_stream_id=last_stream_id)
        if last_stream_id is None:
            last_stream_id = self.h2.highest_inbound_stream_id
        if last_stream_id < 2**31 - 1:
            self.last_stream_id = last_stream_id

    def update_settings(self, **settings: int) -> None:
        """Change SETTINGS mid-flight, e.g. ``max_concurrent_streams=0``."""
        codes = {k: getattr(h2.settings.SettingCodes, k.upper()) for k in settings}
        self.h2.update_settings({codes[k]: v for k, v in settings.items()})
        self.server.spawn(self.flush)

    async def abort(self) -> None:
        """Drop the TCP connection without a word (a crash, from the peer's view)."""
        self.closed = True
        await self.stream.aclose()

    async def run(self) -> None:
        first = b""
        if self.server.http1_handler is not None:
            # Tests' stand-in for a server that also speaks HTTP/1.1 on its port.
            try:
                first = await self.stream.receive(65536)
            except NETWORK_ERRORS:
                return
            if not first.startswith(b"PRI * HTTP/2.0"[: len(first)]):
                await self.server.http1_handler(self.stream, first)
                return
        self.h2.initiate_connection()
        await self.flush()
        if first:
            for ev in self.h2.receive_data(first):
                self._handle(ev)
            await self.flush()
        try:
            while not self.closed:
                if self.frozen:
                    await anyio.sleep_forever()
                try:
                    data = await self.stream.receive(65536)
                except NETWORK_ERRORS:
                    break
                if self.frozen:
                    await anyio.sleep_forever()
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError:
                    await self.flush()
                    break
                for ev in events:
                    self._handle(ev)
                await self.flush()
        finally:
            self.closed = True
            for req in self.requests.values():
                if req.reset_by_peer is None:
                    req.reset_by_peer = -1
                req._wake()
            self._window.set()
            with anyio.CancelScope(shield=True):
                await self.stream.aclose()

    def _handle(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            if self.last_stream_id is not None and ev.stream_id > self.last_stream_id:
                return  # after GOAWAY: never processed, as the client will learn
            refuse = self.server.refuse_every
            if refuse and (self.server.requests_received + 1) % refuse == 0:
                rid = dict(ev.headers).get(b"x-request-id")
                if not self.server.refuse_once_per_id or rid not in self.server.refused_ids:
                    self.server.requests_received += 1
                    if rid is not None:
                        self.server.refused_ids.add(rid)
                    self.h2.reset_stream(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                    return
            self.processed += 1
            after = self.server.goaway_after
            if after and self.processed == after:
                if self.server.two_step_goaway:
                    self.goaway(2**31 - 1)
                self.goaway(ev.stream_id)
            req = OriginRequest(self, ev.stream_id, ev.headers)
            self.requests[ev.stream_id] = req
            self.server.requests_received += 1
            if ev.stream_ended:
                req.body_complete = True
            self.server.spawn(self._run_handler, req)
        elif isinstance(ev, h2.events.DataReceived):
            got = self.requests.get(ev.stream_id)
            if got is not None:
                got._chunks.append(ev.data)
                got._wake()
                padding = ev.flow_controlled_length - len(ev.data)
                if padding:
                    self.h2.acknowledge_received_data(padding, ev.stream_id)
            elif ev.flow_controlled_length:
                # Nobody will read it (a stream we stopped tracking): its bytes still count
                # against the connection window and must be given back (RFC 9113 §6.9), or
                # every stream that carries data stalls once the window is spent.
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            ended = self.requests.get(ev.stream_id)
            if ended is not None:
                ended.body_complete = True
                ended._wake()
        elif isinstance(ev, h2.events.StreamReset):
            reset = self.requests.get(ev.stream_id)
            if reset is not None:
                reset.reset_by_peer = ev.error_code
                reset._wake()
            self.server.resets_received += 1
            self._wake_senders()
        elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._wake_senders()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.closed = True

    def _wake_senders(self) -> None:
        self._window.set()
        self._window = anyio.Event()

    async def _run_handler(self, req: OriginRequest) -> None:
        try:
            await self.server.handler(req)
        except h2.exceptions.StreamClosedError:
            pass
        except Exception:
            log.exception("origin handler failed")
            await self.reset(req.stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
        finally:
            self.requests.pop(req.stream_id, None)
            if self.last_stream_id is not None and not self.requests:
                self.closed = True  # drained after our GOAWAY: hang up, as nginx does
                with anyio.CancelScope(shield=True):
                    await self.stream.aclose()


class H2Origin:
    """An h2c server; ``handler(request)`` answers each request stream."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_concurrent_streams: int = 128,
        connect_protocol: bool = False,
        initial_window: int = 65535,
        goaway_after: int = 0,
        two_step_goaway: bool = False,
        refuse_every: int = 0,
        refuse_once_per_id: bool = True,
        http1_handler: Callable[[anyio.abc.ByteStream, bytes], Awaitable[None]] | None = None,
    ) -> None:
        self.handler = handler
        self.http1_handler = http1_handler  # serves connections that do not start with h2
        self.goaway_after = goaway_after  # GOAWAY once a connection has processed this many
        self.two_step_goaway = two_step_goaway
        self.refuse_every = refuse_every  # RST_STREAM(REFUSED_STREAM) every n-th request
        self.refused_ids: set[bytes] = set()  # x-request-id values refused already
        self.refuse_once_per_id = refuse_once_per_id  # (else a replay is refused again)
        self.max_concurrent_streams = max_concurrent_streams
        self.connect_protocol = connect_protocol
        self.initial_window = initial_window
        self.connections_accepted = 0
        self.requests_received = 0
        self.resets_received = 0
        self.connections: set[OriginConnection] = set()
        self._tg: anyio.abc.TaskGroup | None = None

    def spawn(self, fn: Callable[..., Coroutine[Any, Any, object]], *args: object) -> None:
        assert self._tg is not None
        self._tg.start_soon(fn, *args)

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ssl_context: ssl.SSLContext | None = None,
        task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve h2c, or TLS h2 when given an ``ssl_context`` (ALPN is set to h2 here)."""
        tcp = await anyio.create_tcp_listener(local_host=host, local_port=port)
        bound = tcp.extra(anyio.abc.SocketAttribute.local_port)
        listener: anyio.abc.Listener[Any] = tcp
        if ssl_context is not None:
            ssl_context.set_alpn_protocols(["h2"])
            listener = TLSListener(tcp, ssl_context, standard_compatible=False)
        async with listener, anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started(bound)
            await listener.serve(self._accept, task_group=tg)

    async def _accept(self, stream: anyio.abc.ByteStream) -> None:
        self.connections_accepted += 1
        conn = OriginConnection(self, stream)
        self.connections.add(conn)
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)


async def hello_handler(req: OriginRequest) -> None:
    """The demo's answer: which stream of which connection served the request."""
    body = await req.read_body()
    text = f"hello from the demo backend: {req.method.decode()} {req.path.decode()}"
    if body:
        text += f" ({len(body)} body bytes)"
    await req.respond(200, [(b"content-type", b"text/plain")], (text + "\n").encode())
