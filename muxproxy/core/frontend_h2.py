"""HTTP/2 from clients (RFC 9113), server side: muxproxy's own sans-IO codec.

Theory of operation.  Bytes from the client go first through
:class:`~muxproxy.core.h2guard.FrameGuard`, which splits them into whole frames and stops the
connection with GOAWAY(ENHANCE_YOUR_CALM) the moment a flood limit is passed, before any
frame is decoded.  Each complete frame is then read here, in order, so a protocol error in
one frame never loses the events of the frames before it.  Frames become muxproxy's events
(:class:`Request`, :class:`Body`, :class:`End`, :class:`Cancelled`, :class:`WindowOpen`,
:class:`Closing`); header blocks are decoded by :mod:`~muxproxy.core.hpack_codec` (which
holds field names and values to RFC 9113 §8.2.1 as it reads them) and request heads checked
by :func:`~muxproxy.core.h2guard.check_request`.  The vocabulary (frame types, flags, error
codes, padding) is :mod:`~muxproxy.core.h2wire`, shared with the backend codec.

Error scope (RFC 9113 §5.4): a malformed request (§8.1.1: a bad field, a pseudo-header out of
place, content-length not matching the DATA, trailers without END_STREAM) is a *stream* error,
RST_STREAM(PROTOCOL_ERROR) for that request alone; a broken connection (framing, HPACK, flow
control of the connection, SETTINGS, a frame on an idle stream, CONTINUATION out of sequence)
is GOAWAY and :class:`Closing`.  ``tests/fuzz/h2server_diff.py`` holds this codec to the
``h2`` library's server role; the differences kept on purpose are listed there with their RFC
sections.

Stream states (§5.1), as a server sees them: a stream is *open* in :attr:`H2Server.streams`
from the client's HEADERS until our side ends it (END_STREAM or RST_STREAM) or the client
resets it; ``remote_closed`` is half-closed (remote). Ending our side while the client is still
sending resets the rest with RST_STREAM(NO_ERROR) (§8.1). A stream id at or below the highest
seen and not open is closed: DATA or HEADERS for it are ignored when we reset it (§5.1: they
may have been in flight; the last ``max(RESET_MEMORY, 2 × max_concurrent_streams)`` resets are
remembered, a few KiB per connection at most), else DATA is answered with
RST_STREAM(STREAM_CLOSED) (§6.1) and HEADERS is a connection error (§5.1.1: a new stream's id
must be above every one used before); WINDOW_UPDATE and RST_STREAM there are ignored. Frames on
an idle stream (§5.1: above the highest, or even) are a connection error. PRIORITY is checked
and ignored (§5.3.2): no state per stream, open or idle.

After a first flood of frames the connection can do without (a per-second rate) the GOAWAY
is graceful (:meth:`H2Server._calm`): the frame is dropped, the streams in flight finish
(bounded by ``calm_timeout`` in the I/O layer), and a new stream or another limit passed then
closes the connection at once.

Every limit is enforced here:

* concurrency: ``max_concurrent_streams`` is announced in our SETTINGS; a request beyond it is
  refused with RST_STREAM(REFUSED_STREAM), never queued; past ``max(100, limit)`` refusals the
  connection gets GOAWAY(ENHANCE_YOUR_CALM), as nginx does;
* rapid reset (CVE-2023-44487): more than ``max_resets_per_second`` RST_STREAM frames from the
  client in a second → GOAWAY(ENHANCE_YOUR_CALM).  A stream opened and reset within the same
  read is never handed on at all, so it never reaches a backend;
* CONTINUATION floods (CVE-2024-27316, CVE-2024-28182): at most ``max_continuation_frames``
  per header block and ``max_header_list_size`` encoded bytes; the decoded size is capped too
  (the HPACK bomb) from the first frame on;
* floods of SETTINGS, PING, PRIORITY (and PRIORITY_UPDATE), WINDOW_UPDATE and empty frames
  (DATA, HEADERS, CONTINUATION without payload or END_STREAM) per second.

Flow control: the stream receive window is ``initial_window`` (65,535 until the client
acknowledges our SETTINGS, §6.9.2); the connection window is ``max(initial_window,
min(streams × initial_window, 1 MiB))`` (Envoy's edge guidance), so a client can make the
proxy hold at most that much of its request bodies.  Received DATA is acknowledged
(WINDOW_UPDATE) only through :meth:`H2Server.acknowledge`, called by the I/O layer once the
bytes went on towards the backend.  Responses are sent only within the client's windows
(:meth:`H2Server.send_data` returns what fitted; SETTINGS_INITIAL_WINDOW_SIZE changes move
every stream's window, §6.9.2); :class:`WindowOpen` says when to try again.  Server push is
never used.  Our header blocks never use the HPACK dynamic table (:class:`~muxproxy.core.
hpack_codec.Encoder`), so the client's SETTINGS_HEADER_TABLE_SIZE needs nothing.

Draining (:meth:`H2Server.drain`) writes GOAWAY(NO_ERROR) with the last stream id seen; the
streams below it finish, newer ones are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .h2guard import FrameGuard, H2Limits, Malformed, Request, check_request
from .h2wire import (
    ACK,
    CANCEL,
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    DEFAULT_WINDOW,
    ENABLE_CONNECT_PROTOCOL,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    INTERNAL_ERROR,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME_SIZE,
    MAX_HEADER_LIST_SIZE,
    MAX_STREAM_ID,
    NO_ERROR,
    PADDED,
    PING,
    PRIORITY,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED,
    RST_STREAM,
    SETTING,
    SETTINGS,
    SETTINGS_MAX_FRAME_SIZE,
    STREAM_CLOSED,
    U32,
    WINDOW_UPDATE,
    ConnectionError_,
    StreamError,
    U32x2,
    check_fields,
    credit_error,
    frame,
    give_credit,
    header_frames,
    read_settings,
    shift_recv_windows,
    shift_send_windows,
    unpad,
    window_increment,
)
from .headers import Header
from .hpack_codec import CLIENT_MEMOS, Decoder, Encoder, HPACKError

__all__ = [
    "Body",
    "Cancelled",
    "Closing",
    "End",
    "H2Limits",
    "H2Server",
    "Request",
    "StreamGone",
    "WindowOpen",
]

# How many reset streams are remembered (at least), to tell frames in flight after our
# RST_STREAM (ignored, RFC 9113 §5.1) from frames on a stream that ended otherwise.  They
# arrive within a round trip: a stream forgotten sooner only costs its client a RST_STREAM.
RESET_MEMORY = 128
_STATUS = {s: b"%d" % s for s in range(100, 600)}


# --- events --------------------------------------------------------------------------------


@dataclass(slots=True)
class Body:
    stream_id: int
    data: bytes
    flow: int  # flow-controlled length (padding included): what acknowledge() gives back


@dataclass(slots=True)
class End:
    stream_id: int
    trailers: list[Header] | None


@dataclass(slots=True)
class Cancelled:
    """The client reset the stream (``by_client``), or we refused or reset it (over the
    limit, malformed): the stream is gone either way."""

    stream_id: int
    code: int
    by_client: bool = True
    reason: str = ""


@dataclass(slots=True)
class WindowOpen:
    """The client's window grew: ``stream_id`` 0 means every stream may send again."""

    stream_id: int


@dataclass(slots=True)
class Closing:
    """The connection is ending: ``code`` NO_ERROR for a client GOAWAY or a clean end, else
    the error we sent GOAWAY with.  No new requests will come; in-flight ones may finish
    when ``graceful``."""

    code: int
    reason: str
    graceful: bool


Event = Request | Body | End | Cancelled | WindowOpen | Closing


class StreamGone(Exception):
    """Output for a stream that is no longer open (the client reset it, or the connection
    ended): the response has nowhere to go."""


class _Stream:
    """An open stream: the windows both ways and what the request body must add up to."""

    __slots__ = ("content_length", "received", "recv_unacked", "recv_window", "remote_closed",
                 "send_window")  # fmt: skip

    def __init__(
        self, send_window: int, recv_window: int, remote_closed: bool, content_length: int | None
    ) -> None:
        self.send_window = send_window  # what we may still send
        self.recv_window = recv_window  # what the client may still send
        self.recv_unacked = 0  # handed on, not yet given back as WINDOW_UPDATE
        self.remote_closed = remote_closed  # the client sent END_STREAM
        self.content_length = content_length
        self.received = 0  # DATA payload bytes


class H2Server:
    """One client connection's HTTP/2 state.  See the module docstring."""

    def __init__(self, limits: H2Limits | None = None, *, connect_protocol: bool = False) -> None:
        limits = limits or H2Limits()
        self.limits = limits
        self.connect_protocol = connect_protocol
        self.guard = FrameGuard(limits)
        self.streams: dict[int, _Stream] = {}  # open streams (handed on, not finished by us)
        self.highest = 0  # highest client stream id seen
        self.refused = 0
        self.draining_at: int | None = None  # last_stream_id of our GOAWAY, once sent
        self.closed = False  # a fatal GOAWAY was sent or received: input is ignored
        self.peer_goaway = False  # the client will open no more streams
        self.calm = False  # GOAWAY(ENHANCE_YOUR_CALM) sent: in-flight streams may finish
        # The client's settings (what our sending obeys).
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame_size = MAX_FRAME_SIZE
        self.send_window_conn = DEFAULT_WINDOW
        # Our receive side.
        self.recv_window_max = limits.connection_window
        self.recv_window_conn = DEFAULT_WINDOW  # until our WINDOW_UPDATE in initiate()
        self._recv_unacked_conn = 0
        self._stream_recv_initial = DEFAULT_WINDOW  # until the client ACKs our SETTINGS
        self._settings_acked = False
        self._preface = False  # the client's preface was read
        self._settings_seen = False  # its first frame, SETTINGS, was read (§3.4)
        self._resets: dict[int, None] = {}  # streams we reset lately (an ordered set)
        self._reset_memory = max(RESET_MEMORY, 2 * limits.max_concurrent_streams)
        self._block: list[bytes] | None = None  # header block fragments awaiting CONTINUATION
        self._block_stream = 0
        self._block_end_stream = False
        self._block_error = ""
        self._encoder = Encoder(CLIENT_MEMOS)
        # Decoded sizes are capped from the first frame on, before any ACK (the HPACK bomb).
        self._decoder = Decoder(
            max_header_list_size=limits.max_header_list_size, memos=CLIENT_MEMOS
        )
        self._out: list[bytes] = []
        self.queued = 0  # DATA payload bytes in _out (what data_to_send has not taken yet)

    @property
    def active(self) -> dict[int, _Stream]:
        """The streams counted against ``max_concurrent_streams``."""
        return self.streams

    @property
    def idle(self) -> bool:
        return not self.streams

    # --- start, input -----------------------------------------------------------------

    def initiate(self) -> None:
        """Queue the server preface: our SETTINGS and the connection window."""
        lim = self.limits
        entries = [
            (MAX_CONCURRENT_STREAMS, lim.max_concurrent_streams),
            (INITIAL_WINDOW_SIZE, lim.initial_window),
            (MAX_HEADER_LIST_SIZE, lim.max_header_list_size),
        ]
        if self.connect_protocol:
            entries.append((ENABLE_CONNECT_PROTOCOL, 1))
        self._out.append(frame(SETTINGS, 0, 0, b"".join(SETTING.pack(k, v) for k, v in entries)))
        grow = self.recv_window_max - DEFAULT_WINDOW
        if grow > 0:
            self._out.append(frame(WINDOW_UPDATE, 0, 0, U32.pack(grow)))
            self.recv_window_conn = self.recv_window_max

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Feed bytes from the client; events out.  After a :class:`Closing` that is not
        graceful, further input is ignored."""
        if self.closed:
            return []
        frames, why = self.guard.feed(data, now)
        events: list[Event] = []
        try:
            for f in frames:
                self._frame(f, events)
                if self.closed:
                    return events
        except ConnectionError_ as exc:
            events.append(self._fail(exc.code, str(exc)))
            return events
        if why is not None and self.guard.recoverable and not self.calm:
            # A first flood: GOAWAY(ENHANCE_YOUR_CALM); what followed the frame dropped goes on.
            events.append(self._calm(why))
            events += self.receive_data(b"", now)
        elif why is not None:
            code = FRAME_SIZE_ERROR if why.startswith("frame of") else ENHANCE_YOUR_CALM
            if why.startswith("not an HTTP/2"):
                code = PROTOCOL_ERROR
            events.append(self._fail(code, why))
        # A request opened and reset by the client within this same read never reaches a
        # backend: the rapid-reset pattern costs the proxy nothing beyond parsing.
        gone = [e.stream_id for e in events if type(e) is Cancelled and e.by_client]
        if gone:
            opened = {e.stream_id for e in events if type(e) is Request}
            drop = opened.intersection(gone)
            if drop:
                for e in events:
                    if type(e) is Body and e.stream_id in drop:
                        self._ack_conn(e.flow)  # (nobody will read it)
                events = [e for e in events if getattr(e, "stream_id", 0) not in drop]
        return events

    def _frame(self, f: bytes, events: list[Event]) -> None:
        if not self._preface:  # (the guard checked it and hands it on as the first "frame")
            self._preface = True
            return
        _, _, type_, flags, sid = FRAME.unpack_from(f)
        sid &= MAX_STREAM_ID
        if self._block is not None and (type_ != CONTINUATION or sid != self._block_stream):
            raise ConnectionError_(PROTOCOL_ERROR, "header block interrupted (§6.10)")
        if not self._settings_seen:
            if type_ != SETTINGS or flags & ACK:
                raise ConnectionError_(PROTOCOL_ERROR, "preface not followed by SETTINGS (§3.4)")
            self._settings_seen = True
        if type_ == HEADERS:
            self._on_headers(flags, sid, f[9:], events)
        elif type_ == DATA:
            self._on_data(flags, sid, f[9:], events)
        elif type_ == WINDOW_UPDATE:
            self._on_window_update(sid, f[9:], events)
        elif type_ == CONTINUATION:
            self._on_continuation(flags, sid, f[9:], events)
        elif type_ == RST_STREAM:
            self._on_rst_stream(sid, f[9:], events)
        elif type_ == SETTINGS:
            self._on_settings(flags, sid, f[9:], events)
        elif type_ == PING:
            if sid:
                raise ConnectionError_(PROTOCOL_ERROR, "PING on a stream")
            if len(f) != 17:
                raise ConnectionError_(FRAME_SIZE_ERROR, "PING of the wrong size")
            if not flags & ACK:
                self._out.append(frame(PING, ACK, 0, f[9:]))
        elif type_ == PRIORITY:
            # Ignored (§5.3.2), but checked (§6.3); no state, whatever the stream's state.
            if not sid:
                raise ConnectionError_(PROTOCOL_ERROR, "PRIORITY on stream 0")
            if self._idle(sid):
                pass  # (a stream error on an idle stream: nothing to reset, §6.4)
            elif len(f) != 14:
                self._stream_error(sid, FRAME_SIZE_ERROR, "PRIORITY of the wrong size", events)
            elif U32.unpack_from(f, 9)[0] & MAX_STREAM_ID == sid:
                self._stream_error(sid, PROTOCOL_ERROR, "stream depends on itself", events)
        elif type_ == GOAWAY:
            if sid:
                raise ConnectionError_(PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(f) < 17:
                raise ConnectionError_(FRAME_SIZE_ERROR, "GOAWAY too short")
            events.append(self._peer_goaway(U32.unpack_from(f, 13)[0]))
        elif type_ == PUSH_PROMISE:
            raise ConnectionError_(PROTOCOL_ERROR, "PUSH_PROMISE from a client (§8.4)")
        # Unknown frame types are ignored (§4.1, §5.5).

    # --- frames ---------------------------------------------------------------------------

    def _idle(self, sid: int) -> bool:
        """Not a stream the client opened yet (§5.1.1: client streams are odd)."""
        return sid > self.highest or not sid & 1

    def _on_headers(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if not sid:
            raise ConnectionError_(PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & PADDED:
            payload = unpad(payload)
        error = ""
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise ConnectionError_(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            if U32.unpack_from(payload)[0] & MAX_STREAM_ID == sid:
                error = "stream depends on itself"  # §5.3.1: a stream error
            payload = payload[5:]
        if flags & END_HEADERS:
            self._on_block(sid, payload, bool(flags & END_STREAM), error, events)
        else:
            self._block = [payload]
            self._block_stream = sid
            self._block_end_stream = bool(flags & END_STREAM)
            self._block_error = error

    def _on_continuation(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        block = self._block
        if block is None:
            raise ConnectionError_(PROTOCOL_ERROR, "CONTINUATION without HEADERS (§6.10)")
        block.append(payload)  # (counted and capped by the guard)
        if flags & END_HEADERS:
            self._block = None
            self._on_block(sid, b"".join(block), self._block_end_stream, self._block_error,
                           events)  # fmt: skip

    def _on_block(
        self, sid: int, block: bytes, end_stream: bool, error: str, events: list[Event]
    ) -> None:
        try:  # always decoded, whatever becomes of the stream: the HPACK state is shared
            decoded, too_large, bad = self._decoder.decode(block)
        except HPACKError as exc:
            raise ConnectionError_(COMPRESSION_ERROR, f"HPACK: {exc}") from None
        fields = list(decoded)  # a request's fields go on to be changed: never the memo's
        if too_large:
            raise ConnectionError_(
                ENHANCE_YOUR_CALM, f"header list over {self.limits.max_header_list_size} bytes"
            )
        if bad is not None and not error:
            error = f"invalid field name or value {bad[:20]!r}"
        st = self.streams.get(sid)
        if st is not None:
            self._on_trailers(sid, st, fields, end_stream, error, events)
            return
        if sid <= self.highest or not sid & 1:
            if sid & 1 and sid in self._resets:
                return  # in flight when we reset the stream (§5.1)
            # §5.1.1: a new stream's id must be above every one used before (even ids are
            # the server's); §5.1: HEADERS after END_STREAM both ways is a connection error.
            raise ConnectionError_(PROTOCOL_ERROR, f"HEADERS on closed or even stream {sid}")
        self.highest = sid
        if self.draining_at is not None and sid > self.draining_at:
            if self.calm:  # told to calm down, and opening streams: closed at once
                events.append(self._fail(ENHANCE_YOUR_CALM, "new stream after GOAWAY"))
                return
            self._reset(sid, REFUSED)
            return
        if len(self.streams) >= self.limits.max_concurrent_streams:
            self._reset(sid, REFUSED)
            self.refused += 1
            events.append(Cancelled(sid, REFUSED, False, "over max_concurrent_streams"))
            if self.refused > max(100, self.limits.max_concurrent_streams) and not self.calm:
                events.append(self._calm("too many refused streams"))
            return
        try:
            if error:
                raise Malformed(error)
            req = check_request(sid, fields, end_stream, self.connect_protocol)
        except Malformed as exc:
            self._reset(sid, PROTOCOL_ERROR)
            events.append(Cancelled(sid, PROTOCOL_ERROR, False, str(exc)))
            return
        self.streams[sid] = _Stream(
            self.peer_initial_window, self._stream_recv_initial, end_stream, req.content_length
        )
        events.append(req)

    def _on_trailers(
        self,
        sid: int,
        st: _Stream,
        fields: list[Header],
        end_stream: bool,
        error: str,
        events: list[Event],
    ) -> None:
        """A second header block on an open stream: the request's trailers (§8.1)."""
        if st.remote_closed:
            self._stream_error(sid, STREAM_CLOSED, "HEADERS after END_STREAM", events)
            return
        if not error and not end_stream:
            error = "trailers without END_STREAM"
        if not error:
            try:
                check_fields(fields, trailers=True)
            except StreamError as exc:  # a pseudo-header or a connection-specific field
                error = f"malformed trailers: {exc}"
        if not error and st.content_length is not None and st.received != st.content_length:
            error = "body length differs from content-length"
        if error:
            self._stream_error(sid, PROTOCOL_ERROR, error, events)
            return
        st.remote_closed = True
        events.append(End(sid, fields))

    def _on_closed(self, sid: int) -> None:
        """DATA for a closed stream: ignored if we reset it (§5.1: it may have been in
        flight), else a stream error STREAM_CLOSED (§6.1)."""
        if sid not in self._resets:
            self._out.append(frame(RST_STREAM, 0, sid, U32.pack(STREAM_CLOSED)))

    def _on_data(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if not sid:
            raise ConnectionError_(PROTOCOL_ERROR, "DATA on stream 0")
        flow = len(payload)
        st = self.streams.get(sid)
        if st is None and self._idle(sid):
            raise ConnectionError_(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
        self.recv_window_conn -= flow
        if self.recv_window_conn < 0:
            raise ConnectionError_(FLOW_CONTROL_ERROR, "client overran the connection window")
        if flags & PADDED:
            payload = unpad(payload)
        if st is None:
            self._ack_conn(flow)  # nobody will read it: the credit comes straight back
            self._on_closed(sid)
            return
        if st.remote_closed:
            self._ack_conn(flow)
            self._stream_error(sid, STREAM_CLOSED, "DATA after END_STREAM", events)
            return
        st.recv_window -= flow
        if st.recv_window < 0:
            raise ConnectionError_(FLOW_CONTROL_ERROR, f"client overran stream {sid}'s window")
        n = st.received = st.received + len(payload)
        cl = st.content_length
        if cl is not None and (n > cl or (flags & END_STREAM and n != cl)):
            self._ack_conn(flow)
            self._stream_error(sid, PROTOCOL_ERROR, "body length differs from content-length",
                               events)  # fmt: skip
            return
        if flow:
            events.append(Body(sid, payload, flow))
        if flags & END_STREAM:
            st.remote_closed = True
            events.append(End(sid, None))

    def _on_window_update(self, sid: int, payload: bytes, events: list[Event]) -> None:
        increment = window_increment(payload)
        if not sid:
            bad = credit_error(self.send_window_conn, increment, "connection")
            if bad is not None:
                raise ConnectionError_(*bad)
            self.send_window_conn += increment
            events.append(WindowOpen(0))
            return
        st = self.streams.get(sid)
        if st is None:
            if self._idle(sid):
                raise ConnectionError_(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            return  # (closed: allowed for a while after END_STREAM, §5.1)
        bad = credit_error(st.send_window, increment, "stream")
        if bad is not None:
            self._stream_error(sid, *bad, events)
            return
        st.send_window += increment
        events.append(WindowOpen(sid))

    def _on_rst_stream(self, sid: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, "RST_STREAM of the wrong size")
        if not sid:
            raise ConnectionError_(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if self.streams.pop(sid, None) is None:
            if self._idle(sid):
                raise ConnectionError_(PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
            return
        events.append(Cancelled(sid, U32.unpack(payload)[0]))

    def _on_settings(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if sid:
            raise ConnectionError_(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            if not self._settings_acked:  # our initial_window applies from now (§6.9.2)
                self._settings_acked = True
                delta = self.limits.initial_window - DEFAULT_WINDOW
                self._stream_recv_initial = self.limits.initial_window
                shift_recv_windows(self.streams.values(), delta)
            return
        window_changed = False
        for key, value in read_settings(payload):
            if key == INITIAL_WINDOW_SIZE:
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                shift_send_windows(self.streams.values(), delta)
                window_changed = True
            elif key == SETTINGS_MAX_FRAME_SIZE:
                self.peer_max_frame_size = value
            # HEADER_TABLE_SIZE: our encoder uses no dynamic table.  MAX_CONCURRENT_STREAMS
            # limits pushes (never made).  MAX_HEADER_LIST_SIZE is advisory.  Unknown
            # settings are ignored (§6.5.2).
        self._out.append(frame(SETTINGS, ACK, 0))
        if window_changed:
            events.append(WindowOpen(0))

    def _peer_goaway(self, code: int) -> Closing:
        """The client will open no more streams; with NO_ERROR the ones in flight go on."""
        self.peer_goaway = True
        if code != NO_ERROR:
            self.closed = True
        return Closing(code, "client sent GOAWAY", graceful=code == NO_ERROR)

    # --- stream and connection errors ----------------------------------------------------

    def _remember(self, sid: int) -> None:
        resets = self._resets
        resets[sid] = None
        if len(resets) > self._reset_memory:
            del resets[next(iter(resets))]

    def _reset(self, sid: int, code: int) -> None:
        """RST_STREAM from us; the stream is closed (if it was open)."""
        self.streams.pop(sid, None)
        self._remember(sid)
        self._out.append(frame(RST_STREAM, 0, sid, U32.pack(code)))

    def _stream_error(self, sid: int, code: int, reason: str, events: list[Event]) -> None:
        """§5.4.2: reset this stream alone (and say so if it had been handed on)."""
        if sid in self.streams:
            events.append(Cancelled(sid, code, False, reason))
        self._reset(sid, code)

    def _calm(self, reason: str) -> Closing:
        """A flood limit was passed: GOAWAY(ENHANCE_YOUR_CALM) with the last stream id seen.
        The streams in flight finish (the I/O layer bounds them with ``calm_timeout``); a
        new stream or another limit passed after it closes the connection at once."""
        self.calm = True
        last = self.highest if self.draining_at is None else min(self.draining_at, self.highest)
        self.draining_at = last
        debug = reason[:64].encode()
        self._out.append(frame(GOAWAY, 0, 0, U32x2.pack(last, ENHANCE_YOUR_CALM) + debug))
        return Closing(ENHANCE_YOUR_CALM, reason, graceful=True)

    def _fail(self, code: int, reason: str) -> Closing:
        """Stop the connection with GOAWAY(code) (§5.4.1)."""
        self.closed = True
        debug = reason[:64].encode()
        last = self.highest if self.draining_at is None else self.draining_at  # (§6.8)
        self._out.append(frame(GOAWAY, 0, 0, U32x2.pack(last, code) + debug))
        return Closing(code, reason, graceful=False)

    # --- output -------------------------------------------------------------------------

    def _open(self, sid: int) -> _Stream:
        st = self.streams.get(sid)
        if st is None or self.closed:
            raise StreamGone(sid)
        return st

    def _send_block(self, sid: int, headers: list[Header], flags: int) -> None:
        try:
            block = self._encoder.encode(headers)
        except ValueError:  # a field HTTP/2 forbids: never put on the wire
            self.reset(sid, INTERNAL_ERROR)
            raise StreamGone(sid) from None
        header_frames(self._out, sid, block, flags, self.peer_max_frame_size)

    def send_informational(self, stream_id: int, headers: list[Header]) -> None:
        """A 1xx head (e.g. ``[(b":status", b"100")]``, 100-continue), before the response."""
        self._open(stream_id)
        status = headers[0][1] if headers and headers[0][0] == b":status" else b""
        if len(status) != 3 or status[:1] != b"1" or status == b"101":
            raise ValueError(f"not an informational head: {status!r}")
        self._send_block(stream_id, headers, 0)

    def send_head(self, sid: int, status: int, headers: Sequence[Header], end: bool) -> None:
        self._open(sid)
        self._send_block(sid, [(b":status", _STATUS.get(status) or b"%d" % status), *headers],
                         END_STREAM if end else 0)  # fmt: skip
        if end:
            self._finish(sid)

    def send_window(self, sid: int) -> int:
        """How many body bytes may be sent on ``sid`` now: the smaller of the stream's and
        the connection's windows (0 if the stream is gone)."""
        st = self.streams.get(sid)
        if st is None or self.closed:
            return 0
        n = min(st.send_window, self.send_window_conn)
        return n if n > 0 else 0

    def send_data(self, sid: int, data: bytes, end: bool = False) -> int:
        """Send as much of ``data`` as the windows allow; returns the bytes sent.  ``end`` is
        honoured only when all of it went."""
        st = self._open(sid)
        n = len(data)
        room = min(st.send_window, self.send_window_conn, n)
        if room <= 0 and n:
            return 0
        out = self._out
        size = self.peer_max_frame_size
        if room < n:
            end = False
        flags = END_STREAM if end else 0
        if room <= size:  # the common case: one frame
            out.append(FRAME.pack(room >> 8, room & 0xFF, DATA, flags, sid))
            out.append(data if room == n else data[:room])
        else:
            for pos in range(0, room, size):
                chunk = data[pos : min(pos + size, room)]
                k = len(chunk)
                last = flags if pos + k == room else 0
                out.append(FRAME.pack(k >> 8, k & 0xFF, DATA, last, sid))
                out.append(chunk)
        st.send_window -= room
        self.send_window_conn -= room
        self.queued += room
        if end:
            self._finish(sid)
        return room

    def send_trailers(self, sid: int, trailers: list[Header]) -> None:
        self._open(sid)
        self._send_block(sid, trailers, END_STREAM)
        self._finish(sid)

    def reset(self, sid: int, code: int = CANCEL) -> None:
        """RST_STREAM(code) on an open stream; nothing for one already closed."""
        if sid in self.streams and not self.closed:
            self._reset(sid, code)

    def acknowledge(self, sid: int, n: int) -> None:
        """``n`` flow-controlled bytes of ``sid``'s request body went on: open the windows.
        (For a stream already closed only the connection window is given back.)  Updates go
        out once half a window is due, or sooner when the client's window is empty."""
        if not n or self.closed:
            return
        self._ack_conn(n)
        st = self.streams.get(sid)
        if st is not None and not st.remote_closed:
            st.recv_window, st.recv_unacked, update = give_credit(
                sid, st.recv_unacked + n, st.recv_window, self._stream_recv_initial
            )
            if update is not None:
                self._out.append(update)

    def _ack_conn(self, n: int) -> None:
        self.recv_window_conn, self._recv_unacked_conn, update = give_credit(
            0, self._recv_unacked_conn + n, self.recv_window_conn, self.recv_window_max
        )
        if update is not None:
            self._out.append(update)

    def _finish(self, sid: int) -> None:
        """Our side of ``sid`` ended.  If the client's request is still open (a response
        before the whole body), RFC 9113 §8.1 lets us stop it with RST_STREAM(NO_ERROR)."""
        st = self.streams.pop(sid, None)
        if st is not None and not st.remote_closed:
            self._remember(sid)
            self._out.append(frame(RST_STREAM, 0, sid, U32.pack(NO_ERROR)))

    def drain(self) -> None:
        """Graceful GOAWAY: streams up to the last one seen finish, newer ones are refused."""
        if self.draining_at is None and not self.closed:
            self.draining_at = self.highest
            self._out.append(frame(GOAWAY, 0, 0, U32x2.pack(self.highest, NO_ERROR)))

    @property
    def has_output(self) -> bool:
        """Frames are queued for ``data_to_send``."""
        return bool(self._out)

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self.queued = 0
        return data
