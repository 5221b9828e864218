"""One client request relayed over one backend stream: the only code that knows both sides.

Flow control runs end to end through here:

* request body: a chunk is read from the client only after the previous one fitted the
  stream's send window, so at most one read (64 KiB) waits beyond the window;
* response body: DATA is acknowledged to the backend (WINDOW_UPDATE) only after it was written
  to the client, so a slow client holds at most the stream window W in the proxy and the
  backend sends no faster than the client reads; other streams are unaffected because the
  connection window is ``max_streams × W``.

A stream the backend provably never processed (REFUSED_STREAM, or above GOAWAY's
last-stream-id) is replayed on another connection, at most ``max_replays`` times, body included
while it fits ``replay_buffer``.  Any other failure is a 502/504 and never a silent resend.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import anyio

from ..config import RouteConfig
from ..core.frontend_h11 import Body, RequestHead, ResponseFramingError
from ..core.headers import Header, request_to_h2, response_from_h2, trailers_from_h2
from ..core.relay import StreamState
from ..errors import BackendError, BackendTimeout, ClientGone, ProxyError
from .backend import BackendConnection, Signal

if TYPE_CHECKING:
    from .client import ClientConnection
    from .pool import ClusterPool


class _Replay(Exception):
    """The stream was never processed by the backend: try again on another connection."""


class BodySource:
    """The request body, read from the client on demand, remembered for replays while small."""

    def __init__(self, client: ClientConnection, replay_limit: int) -> None:
        self.client = client
        self.limit = replay_limit
        self.kept: list[bytes] | None = []  # None once the body outgrew the replay buffer
        self.kept_size = 0
        self.complete = False
        self.trailers: list[Header] = []

    @property
    def replayable(self) -> bool:
        return self.kept is not None

    async def chunks(self) -> AsyncIterator[bytes]:
        if self.kept is None:
            raise BackendError("request body too large to replay after the backend refused it")
        for chunk in list(self.kept):
            yield chunk
        while not self.complete:
            ev = await self.client.read_body()
            if type(ev) is Body:
                if self.kept is not None:
                    self.kept_size += len(ev.data)
                    if self.kept_size <= self.limit:
                        self.kept.append(ev.data)
                    else:
                        self.kept = None
                yield ev.data
            else:
                self.complete = True
                self.trailers = ev.trailers  # type: ignore[union-attr]


class Exchange:
    def __init__(
        self, client: ClientConnection, head: RequestHead, route: RouteConfig, pool: ClusterPool
    ) -> None:
        self.client = client
        self.head = head
        self.route = route
        self.pool = pool
        self.cfg = pool.cfg
        self.failure: BaseException | None = None  # set by the upload task
        # A timer-wheel entry (see timers.py): request_timeout, then the body-stall timeout.
        self.deadline = math.inf
        self.timer_bucket: int | None = None
        self.expired = False
        self._news: Signal | None = None

    def on_deadline(self) -> None:
        self.expired = True
        if self._news is not None:
            self._news.set()

    connect_protocol = False  # a tunnel needs a backend with RFC 8441

    async def run(self) -> None:
        """Relay the request and its response.  Errors become responses; a failure after the
        response head was sent closes the client connection (``client.must_close``)."""
        client = self.client
        try:
            await self._forward()
        except ClientGone:
            client.must_close = True
        except ProxyError as exc:
            await client.send_error(exc)
        finally:
            client.wheel.discard(self)

    def _fields(self) -> list[Header]:
        """The HTTP/2 head of the request."""
        head = self.head
        return request_to_h2(
            head.method,
            head.target,
            head.authority,
            head.headers,
            self.client.fwd,
            head.http_version,
        )

    async def _forward(self) -> None:
        """Open a stream and relay, replaying what the backend provably never processed."""
        fields = self._fields()
        body = BodySource(self.client, self.cfg.replay_buffer) if self.head.has_body else None
        replays = 0
        while True:
            conn, st = await self.pool.open_stream(
                fields,
                body is None and not self.connect_protocol,
                connect_protocol=self.connect_protocol,
                replay=replays > 0,  # older than the queue behind it: served first
            )
            try:
                await self._attempt(conn, st, body)
                return
            except _Replay:
                if body is not None and not body.replayable:
                    raise BackendError(f"{st.error}; request body too large to replay") from None
                if replays >= self.cfg.max_replays:
                    raise BackendError(st.error or "backend refused the stream") from None
                replays += 1
                self.pool.counters["replays"] += 1

    async def _attempt(
        self, conn: BackendConnection, st: StreamState, body: BodySource | None
    ) -> None:
        news = Signal(conn.loop)
        self._news = news
        self.expired = False
        conn.news[st.stream_id] = news
        try:
            if body is None:
                await self._download(conn, st, news)
            else:
                # Upload and download run side by side: a backend may answer early.  Errors are
                # carried out of the task group by hand, which would wrap them in a group.
                failed: BaseException | None = None
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._upload, conn, st, body, news)
                    try:
                        await self._download(conn, st, news)
                    except (ProxyError, ClientGone, _Replay) as exc:
                        failed = exc
                    tg.cancel_scope.cancel()
                if failed is not None:
                    raise failed
        finally:
            conn.release(st)

    async def _upload(
        self, conn: BackendConnection, st: StreamState, body: BodySource, news: Signal
    ) -> None:
        sid = st.stream_id
        core = conn.core
        window = Signal(conn.loop)
        try:
            cont = self.client.session.continue_bytes()
            if cont:
                await self.client.send(cont)
            async for chunk in body.chunks():
                if not await conn.send_body(sid, chunk, window):
                    return  # reset or failed: the download side reports it
            if sid in core.streams:
                core.end_stream(sid, body.trailers or None)
                conn.schedule_flush()
        except (ProxyError, ClientGone) as exc:
            self.failure = exc
            news.set()

    async def _download(self, conn: BackendConnection, st: StreamState, news: Signal) -> None:
        await self._await_head(st, news)
        assert st.headers is not None
        status, headers = response_from_h2(st.headers)
        await self._relay_response(conn, st, news, status, headers)

    async def _await_head(self, st: StreamState, news: Signal) -> None:
        """Wait for the response head within request_timeout.  Raises _Replay for a stream
        the backend never processed, BackendError (502) or BackendTimeout (504)."""
        wheel = self.client.wheel
        wheel.start(self, self.cfg.request_timeout)
        while st.headers is None and st.reset_code is None and not self.failure:
            if self.expired:
                break
            await news.wait()
        wheel.clear(self)
        if self.failure is not None:
            raise self.failure
        if st.headers is None:
            if st.reset_code is not None:
                if st.refused:
                    raise _Replay
                raise BackendError(st.error or "backend failed the stream")
            raise BackendTimeout("backend did not answer within request_timeout")

    async def _relay_response(
        self,
        conn: BackendConnection,
        st: StreamState,
        news: Signal,
        status: int,
        headers: list[Header],
    ) -> None:
        """Relay the response head and body, giving credit back as the client takes it."""
        client = self.client
        session = client.session
        wheel = client.wheel
        is_head = self.head.method == b"HEAD"
        try:
            out = [session.response_head(status, headers)]
        except ResponseFramingError as exc:
            raise BackendError(f"backend response cannot be relayed: {exc}") from None
        if client.outcome is not None:
            client.outcome.status = status
        sid = st.stream_id
        core = conn.core
        chunks = st.chunks
        while True:
            credit = 0
            # Decide from one snapshot: the reader may add chunks or the end during the send.
            finished = st.ended
            try:
                for data, n in chunks:
                    credit += n
                    if not is_head and data:
                        out.append(session.response_body(data))
                chunks.clear()  # (left whole on a framing error: release() returns that credit)
                if finished:
                    # (the session sends trailers only if it chose chunked framing)
                    trailers = trailers_from_h2(st.trailers) if st.trailers else None
                    out.append(session.response_end(trailers))
            except ResponseFramingError:
                # Body longer or shorter than its Content-Length: never relay it as complete.
                await self._send(out)
                client.must_close = True
                return
            try:
                await self._send(out)
            finally:  # written or lost with the client: either way the credit goes back
                if credit:
                    core.consumed(sid, credit)
                    conn.schedule_flush()
            out = []
            if finished:
                return
            if st.reset_code is not None or self.failure is not None:
                client.must_close = True  # truncated: the client must not see a clean end
                return
            wheel.start(self, self.cfg.request_timeout)  # a body stalled this long is dropped
            while not chunks and not st.ended and st.reset_code is None and not self.failure:
                if self.expired:
                    client.must_close = True
                    return
                await news.wait()
            wheel.clear(self)

    async def _send(self, parts: list[bytes]) -> None:
        data = b"".join(parts) if len(parts) != 1 else parts[0]
        if data:
            await self.client.send(data)


__all__ = ["BodySource", "ClientGone", "Exchange"]
