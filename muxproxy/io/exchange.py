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
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import anyio

from ..core.frontend_h11 import Body, RequestHead
from ..core.headers import Header, request_to_h2, response_from_h2, trailers_from_h2
from ..core.relay import StreamState
from ..errors import BackendError, BackendTimeout, BackendUnavailable, ClientError, ProxyError
from ..router import Route
from .backend import BackendConnection, Signal
from .downstream import ClientGone, Downstream

if TYPE_CHECKING:
    from .pool import ClusterPool

# What a tunnel does with a 2xx answer to its extended CONNECT: (conn, stream, news, head).
# It returns True when it took the stream over (it releases it itself).
Upgrade = Callable[[BackendConnection, StreamState, Signal, Sequence[Header]], Awaitable[bool]]


class _Replay(Exception):
    """The stream was never processed by the backend: try again on another connection."""


class _Ids:
    """Request ids: 16 hex digits of os.urandom each, 256 per getrandom call."""

    __slots__ = ("hex", "pos")

    def __init__(self) -> None:
        self.hex = b""
        self.pos = 0

    def next(self) -> bytes:
        pos = self.pos
        if pos >= len(self.hex):
            self.hex, pos = os.urandom(2048).hex().encode(), 0
        self.pos = pos + 16
        return self.hex[pos : pos + 16]


request_id = _Ids().next


class _Stall:
    """The upload's deadline: the backend must take each piece of body within body_timeout."""

    __slots__ = ("deadline", "ex", "news", "timer_bucket")

    def __init__(self, ex: Exchange, news: Signal) -> None:
        self.ex = ex
        self.news = news
        self.deadline = math.inf
        self.timer_bucket: int | None = None

    def on_deadline(self) -> None:
        self.ex.stalled = True
        self.news.set()


class BodySource:
    """The request body, read from the client on demand, remembered for replays while small."""

    __slots__ = ("complete", "down", "kept", "kept_size", "limit", "max_body", "size", "trailers")

    def __init__(self, down: Downstream, replay_limit: int, max_body: int | None = None) -> None:
        self.down = down
        self.limit = replay_limit
        self.max_body = max_body  # a route's own limit, below the listener's
        self.size = 0
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
            ev = await self.down.read_body()
            if type(ev) is Body:
                if self.max_body is not None:
                    self.size += len(ev.data)
                    if self.size > self.max_body:
                        raise ClientError("request body larger than max_body", 413)
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
    """One request relayed to the pool; ``run()`` answers and says whether to keep the client
    connection.  A tunnel passes its own head (``fields``), asks for a backend with RFC 8441
    (``connect_protocol``) and takes a 2xx answer over (``upgrade``)."""

    __slots__ = (
        "_news",
        "cfg",
        "connect_protocol",
        "deadline",
        "down",
        "expired",
        "failure",
        "fields",
        "head",
        "keep",
        "max_replays",
        "outcome",
        "pool",
        "request_timeout",
        "route",
        "sent_whole",
        "stalled",
        "timer_bucket",
        "upgrade",
    )

    def __init__(
        self,
        down: Downstream,
        head: RequestHead,
        route: Route,
        pool: ClusterPool,
        *,
        fields: list[Header] | None = None,
        connect_protocol: bool = False,
        upgrade: Upgrade | None = None,
    ) -> None:
        self.down = down
        self.outcome = down.outcome
        self.head = head
        self.route = route
        self.pool = pool
        self.cfg = cfg = pool.cfg
        rc = route.config  # the route's own timeouts and limits override the cluster's
        self.request_timeout = rc.request_timeout or cfg.request_timeout
        self.max_replays = cfg.max_replays if rc.max_replays is None else rc.max_replays
        self.fields = fields
        self.connect_protocol = connect_protocol
        self.upgrade = upgrade
        self.failure: BaseException | None = None  # set by the upload task
        # A timer-wheel entry (see timers.py): the phase's deadline (upload progress, then
        # request_timeout for the response head, then response-body progress).
        self.deadline = math.inf
        self.timer_bucket: int | None = None
        self.expired = False
        self.sent_whole = False  # the whole request (body included) went to the backend
        self.stalled = False  # the backend gave no credit for the body within body_timeout
        self.keep = True  # the client connection may serve another request afterwards
        self._news: Signal | None = None

    def on_deadline(self) -> None:
        self.expired = True
        if self._news is not None:
            self._news.set()

    async def run(self) -> bool:
        """Relay the request and its response; errors become responses.  Returns whether the
        client connection can be kept alive."""
        down = self.down
        try:
            await self.forward()
        except ClientGone:
            if not self.outcome.reason:
                self.outcome.reason = "client_gone"
            return False
        except ProxyError as exc:
            return await down.send_error(exc)
        finally:
            down.wheel.discard(self)
        return self.keep

    def _fields(self) -> list[Header]:
        """The HTTP/2 head of the request, with an x-request-id (the client's, or a new one)."""
        head = self.head
        fields = self.fields
        if fields is None:
            fields = request_to_h2(
                head.method,
                head.target,
                head.authority,
                head.headers,
                self.down.fwd,
                head.http_version,
            )
        rid = None
        for name, value in head.headers:
            if name == b"x-request-id":
                rid = value
                break
        if rid is None:
            rid = request_id()
            fields.append((b"x-request-id", rid))
        self.outcome.request_id = rid.decode("latin-1")
        route = self.route
        if route.rewrite is not None or route.request_rules is not None:
            fields = self._apply_route(fields)
        return fields

    def _apply_route(self, fields: list[Header]) -> list[Header]:
        """The route's rewrites (on :path and :authority; X-Forwarded-Host keeps what the
        client asked for) and request header rules."""
        route = self.route
        rw = route.rewrite
        if rw is not None:
            for i, (name, value) in enumerate(fields):
                if name == b":path" and rw.rewrites_path:
                    fields[i] = (name, rw.path(value))
                elif name == b":authority":
                    fields[i] = (name, rw.authority(value))
                elif name[:1] != b":":
                    break
        rules = route.request_rules
        if rules is not None:
            n = next((i for i, (name, _) in enumerate(fields) if name[:1] != b":"), len(fields))
            facts = route.facts(self.down.fwd, self.outcome.request_id, self.head)
            fields = fields[:n] + rules.apply(fields[n:], facts)
        return fields

    async def forward(self) -> None:
        """Open a stream and relay, replaying what the backend provably never processed."""
        fields = self._fields()
        body = (
            BodySource(self.down, self.cfg.replay_buffer, self.route.config.max_body)
            if self.head.has_body
            else None
        )
        outcome = self.outcome
        replays = 0
        while True:
            queued = time.monotonic()
            try:
                conn, st = await self.pool.open_stream(
                    fields,
                    body is None and not self.connect_protocol,
                    connect_protocol=self.connect_protocol,
                    replay=replays > 0,  # older than the queue behind it: served first
                )
            except BackendUnavailable as exc:
                outcome.reason = _unavailable(exc)
                raise
            opened = time.monotonic()
            outcome.queue_s = opened - queued
            outcome.backend = conn.label
            outcome.backend_conn = conn.id
            outcome.stream_id = st.stream_id
            try:
                await self._attempt(conn, st, body, opened)
                return
            except _Replay:
                if body is not None and not body.replayable:
                    outcome.reason = "replays_exhausted"
                    raise BackendError(f"{st.error}; request body too large to replay") from None
                if replays >= self.max_replays:
                    outcome.reason = "replays_exhausted"
                    raise BackendError(st.error or "backend refused the stream") from None
                replays += 1
                outcome.replays = replays
                self.pool.counters["replays"] += 1

    async def _attempt(
        self, conn: BackendConnection, st: StreamState, body: BodySource | None, opened: float
    ) -> None:
        news = Signal(conn.loop)
        self._news = news
        self.expired = self.stalled = False
        self.sent_whole = body is None
        conn.news[st.stream_id] = news
        taken = False
        try:
            if body is None:
                taken = await self._download(conn, st, news, opened)
            else:
                # Upload and download run side by side: a backend may answer early.  Errors are
                # carried out of the task group by hand, which would wrap them in a group.
                failed: BaseException | None = None
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._upload, conn, st, body, news)
                    try:
                        taken = await self._download(conn, st, news, opened)
                    except (ProxyError, ClientGone, _Replay) as exc:
                        failed = exc
                    tg.cancel_scope.cancel()
                if failed is not None:
                    raise failed
        finally:
            if not taken:  # (else a tunnel holds the stream and releases it itself)
                conn.release(st)

    async def _upload(
        self, conn: BackendConnection, st: StreamState, body: BodySource, news: Signal
    ) -> None:
        """Client → backend.  While the body flows, ``body_timeout`` bounds each step: the
        client's reads (the connection's timer: 408) and the backend's credit (here: 504).
        Once the body is sent whole, request_timeout runs for the response head."""
        sid = st.stream_id
        core = conn.core
        down = self.down
        wheel = down.wheel
        window = Signal(conn.loop)
        stall = down.body_timeout
        timer = _Stall(self, news)
        try:
            await down.send_continue()
            async for chunk in body.chunks():  # (the client's reads: its own body_timeout)
                wheel.start(timer, stall)  # the backend's credit must come within body_timeout
                sent = await conn.send_body(sid, chunk, window)
                wheel.clear(timer)
                if not sent:
                    return  # reset or failed: the download side reports it
            if sid in core.streams:
                core.end_stream(sid, body.trailers or None)
                conn.schedule_flush()
            self.sent_whole = True
            news.set()  # the response-head deadline starts now
        except (ProxyError, ClientGone) as exc:
            self.failure = exc
            news.set()
        finally:
            wheel.discard(timer)

    async def _download(
        self, conn: BackendConnection, st: StreamState, news: Signal, opened: float
    ) -> bool:
        await self._await_head(conn, st, news)
        assert st.headers is not None
        self.outcome.upstream_s = time.monotonic() - opened
        status, headers = response_from_h2(st.headers)
        if self.upgrade is not None and 200 <= status < 300:
            return await self.upgrade(conn, st, news, headers)
        await self._relay_response(conn, st, news, status, headers)
        return False

    async def _await_head(self, conn: BackendConnection, st: StreamState, news: Signal) -> None:
        """Wait for the response head: within request_timeout of the request having been sent
        whole.  Raises _Replay for a stream the backend never processed, BackendError (502) or
        BackendTimeout (504)."""
        wheel = self.down.wheel
        timing_head = self.sent_whole
        if timing_head:
            wheel.start(self, self.request_timeout)
        while st.headers is None and st.reset_code is None and not self.failure:
            if self.stalled:
                break
            if not timing_head and self.sent_whole:
                timing_head = True
                self.expired = False
                wheel.start(self, self.request_timeout)
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
                self.outcome.reason = "backend_lost" if conn.core.closed else "backend_reset"
                raise BackendError(st.error or "backend failed the stream")
            if self.stalled:
                self.outcome.reason = "body_timeout"
                raise BackendTimeout("backend took no request body within body_timeout")
            self.outcome.reason = "upstream_timeout"
            raise BackendTimeout("backend did not answer within request_timeout")

    async def _relay_response(
        self,
        conn: BackendConnection,
        st: StreamState,
        news: Signal,
        status: int,
        headers: Sequence[Header],
    ) -> None:
        """Relay the response head and body, giving credit back as the client takes it."""
        down = self.down
        wheel = down.wheel
        is_head = self.head.method == b"HEAD"
        rules = self.route.response_rules
        if rules is not None:
            facts = self.route.facts(down.fwd, self.outcome.request_id, self.head)
            headers = rules.apply(headers, facts)
        try:
            down.send_head(status, headers)
        except BackendError:
            self.outcome.reason = "backend_malformed"
            raise
        sid = st.stream_id
        core = conn.core
        chunks = st.chunks
        while True:
            credit = 0
            # Decide from one snapshot: the reader may add chunks or the end during the send.
            finished = st.ended
            for data, n in chunks:
                credit += n
                if not is_head and data and not down.send_data(data):
                    # More than its Content-Length: never relay it as complete.  The chunks
                    # stay (release() returns their credit with the stream).
                    await down.flush()
                    self.keep = False
                    return
            chunks.clear()
            if finished:
                # (the downstream sends trailers only if its framing carries them)
                self.keep = down.end(trailers_from_h2(st.trailers) if st.trailers else None)
            try:
                await down.flush()
            finally:  # written or lost with the client: either way the credit goes back
                if credit:
                    core.consumed(sid, credit)
                    conn.schedule_flush()
            if finished:
                return
            if st.reset_code is not None or self.failure is not None:
                # Truncated: the client must not see a clean end.
                self.outcome.reason = (
                    "backend_reset" if st.reset_code is not None else "client_gone"
                )
                self.keep = down.reset()
                return
            wheel.start(self, self.request_timeout)  # a body stalled this long is dropped
            while not chunks and not st.ended and st.reset_code is None and not self.failure:
                if self.expired:
                    self.outcome.reason = "upstream_timeout"
                    self.keep = down.reset()
                    return
                await news.wait()
            wheel.clear(self)


def _unavailable(exc: BackendUnavailable) -> str:
    """The reason code of a 503 from the pool."""
    code = getattr(exc, "code", "")
    if code:
        return str(code)
    text = exc.reason
    if text.startswith("too many requests"):
        return "queue_full"
    if text.startswith("no backend reachable"):
        return "no_backend"
    return "pending_timeout"


__all__ = ["BodySource", "ClientGone", "Exchange", "request_id"]
