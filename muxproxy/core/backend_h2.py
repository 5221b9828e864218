"""The client role of one pooled HTTP/2 backend connection (RFC 9113), sans-IO.

Theory of operation
-------------------
:class:`H2Backend` is a purpose-built HTTP/2 client: it frames requests, parses responses and
keeps the per-stream state the proxy relays (the response head, body chunks not yet written to
the client, the end or reset of the stream).  The I/O layer feeds it bytes
(:meth:`receive_data`), asks it for bytes to write (:meth:`data_to_send`) and wakes the
exchanges whose streams changed, as listed in the returned :class:`Update`.

It does only what a client needs — no server role, no push, no priority tree — which is what
makes it several times cheaper per request than a general HTTP/2 library (``bench/
protocol_floor.py``); ``tests/unit/test_backend_h2.py`` drives it against h2's server role as
the reference peer.

Invariants:

* **Credit, not buffering.**  Each stream's receive window is ``stream_window`` (W); response
  DATA is acknowledged (:meth:`consumed`) only once the exchange has written it to the client,
  so a stream never buffers more than W.  The connection window is ``max_streams × W``, so one
  slow stream never starves the others.
* **Capacity is exact.**  ``streams`` holds exactly the streams that count against the peer's
  SETTINGS_MAX_CONCURRENT_STREAMS (open or half-closed, RFC 9113 §5.1.2): an entry leaves when
  both sides ended it or either side reset it.
* **GOAWAY means drain.**  After GOAWAY no stream is opened; streams above ``last_stream_id``
  are failed as *refused* (never processed, so replayable whatever the method).
* **Errors are scoped** (RFC 9113 §5.4): a malformed response fails its stream alone (RST_STREAM
  PROTOCOL_ERROR, the client gets a 502); only a broken connection (bad framing, HPACK, flow
  control, SETTINGS) fails every stream.  Peer-caused problems are reported in :class:`Update`
  and on the streams, never raised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .h2wire import (
    ACK,
    CANCEL,
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    DEFAULT_WINDOW,
    ENABLE_CONNECT_PROTOCOL,
    ENABLE_PUSH,
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
    MAX_WINDOW,
    NO_ERROR,
    PADDED,
    PING,
    PREFACE,
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
    STREAM_ID_RESERVE,
    U32,
    WINDOW_UPDATE,
    ConnectionError_,
    StreamError,
    U32x2,
    check_fields,
    code_name,
    credit_error,
    frame,
    give_credit,
    header_frames,
    max_continuations,
    read_settings,
    shift_recv_windows,
    shift_send_windows,
    unpad,
    window_increment,
)
from .headers import Header
from .hpack_codec import Decoder, Encoder, HPACKError
from .memo import ByIdentity
from .relay import StreamState, Update, fail_streams


class StreamLimitError(Exception):
    """open_stream() beyond the peer's SETTINGS_MAX_CONCURRENT_STREAMS, or while draining
    (callers check :meth:`H2Backend.free_streams` first)."""


@dataclass(slots=True)
class _H2Stream(StreamState):
    """A stream's relay state plus what HTTP/2 needs to know of it."""

    send_window: int = DEFAULT_WINDOW  # bytes we may still send
    recv_window: int = DEFAULT_WINDOW  # bytes the backend may still send
    recv_unacked: int = 0  # consumed by the client, not yet given back as WINDOW_UPDATE
    local_closed: bool = False  # we sent END_STREAM
    head_request: bool = False  # a response to HEAD has no content whatever content-length says
    content_length: int | None = None
    received: int = 0  # DATA payload bytes


class H2Backend:
    """Sans-IO HTTP/2 client connection with per-stream relay state."""

    def __init__(
        self,
        *,
        stream_window: int = 256 * 1024,
        max_streams: int = 1000,
        max_header_list_size: int = 256 * 1024,
    ) -> None:
        self.streams: dict[int, _H2Stream] = {}
        self.stream_window = stream_window
        self.max_streams = max_streams
        self.max_header_list_size = max_header_list_size
        self.settings_received = False
        self.goaway_last_stream_id: int | None = None
        self.goaway_error: int | None = None
        self.closed = False
        self.close_reason = ""
        self.resets_received = 0
        self.refused_received = 0
        self.highest_stream_id = 0  # the last stream we opened
        # The backend's settings.
        self.peer_max_concurrent_streams = 2**31 - 1  # unlimited until it says (RFC 9113 §6.5.2)
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame_size = 16384
        self.peer_connect_protocol = False
        # Flow control, connection level.
        self.send_window_conn = DEFAULT_WINDOW
        self.recv_window_max = max(DEFAULT_WINDOW, min(MAX_WINDOW, max_streams * stream_window))
        self.recv_window_conn = DEFAULT_WINDOW  # until our WINDOW_UPDATE in initiate()
        self._recv_unacked_conn = 0
        # A stream's receive window is the protocol default until the backend acknowledges
        # our SETTINGS (RFC 9113 §6.9.2), then ``stream_window``.
        self._stream_recv_initial = DEFAULT_WINDOW
        self._settings_acked = False
        self._out: list[bytes] = []
        self._in = b""
        self._block: list[bytes] | None = None  # header block fragments awaiting CONTINUATION
        self._block_stream = 0
        self._block_end_stream = False
        self._block_size = 0
        self._block_frames = 0  # CONTINUATION frames in the block awaiting END_HEADERS
        self._encoder = Encoder()
        self._decoder = Decoder(max_header_list_size=max_header_list_size)

    # --- lifecycle ---------------------------------------------------------------------

    def initiate(self) -> None:
        """Queue the preface, our SETTINGS and the connection window (max_streams × W)."""
        settings = b"".join(
            SETTING.pack(k, v)
            for k, v in (
                (ENABLE_PUSH, 0),
                (MAX_CONCURRENT_STREAMS, 100),
                (INITIAL_WINDOW_SIZE, self.stream_window),
                (MAX_HEADER_LIST_SIZE, self.max_header_list_size),
            )
        )
        self._out.append(PREFACE + frame(SETTINGS, 0, 0, settings))
        if self.recv_window_max > DEFAULT_WINDOW:
            increment = self.recv_window_max - DEFAULT_WINDOW
            self._out.append(frame(WINDOW_UPDATE, 0, 0, U32.pack(increment)))
            self.recv_window_conn = self.recv_window_max

    @property
    def enable_connect_protocol(self) -> bool:
        return self.peer_connect_protocol

    @property
    def draining(self) -> bool:
        """No new streams may be opened here (GOAWAY, ids running out, or closed)."""
        return (
            self.closed
            or self.goaway_last_stream_id is not None
            or self.highest_stream_id >= MAX_STREAM_ID - 2 * STREAM_ID_RESERVE
        )

    def stream_limit(self) -> int:
        return min(self.peer_max_concurrent_streams, self.max_streams)

    def free_streams(self) -> int:
        """How many more streams may be opened now (0 while draining).  Asked for every
        connection on every pick: :attr:`draining` and :meth:`stream_limit`, inlined."""
        if (
            not self.settings_received
            or self.closed
            or self.goaway_last_stream_id is not None
            or self.highest_stream_id >= MAX_STREAM_ID - 2 * STREAM_ID_RESERVE
        ):
            return 0
        free = min(self.peer_max_concurrent_streams, self.max_streams) - len(self.streams)
        return free if free > 0 else 0

    def unacknowledged(self) -> int:
        """Connection-level bytes received and not yet consumed or discarded by anyone: zero
        once every exchange is done (what a leak would make grow)."""
        return self.recv_window_max - self.recv_window_conn - self._recv_unacked_conn

    # --- actions -----------------------------------------------------------------------

    def open_stream(self, headers: list[Header], end_stream: bool) -> StreamState:
        """Send a request head on a new stream."""
        if self.draining or len(self.streams) >= self.stream_limit():
            raise StreamLimitError("no stream may be opened on this connection now")
        block = self._encoder.encode(headers)  # ValueError before any state changes
        sid = self.highest_stream_id + 2 if self.highest_stream_id else 1
        self.highest_stream_id = sid
        self._send_block(sid, block, end_stream)
        method = headers[0][1] if headers and headers[0][0] == b":method" else b""
        st = _H2Stream(
            sid,
            send_window=self.peer_initial_window,
            recv_window=self._stream_recv_initial,
            local_closed=end_stream,
            head_request=method == b"HEAD",
        )
        self.streams[sid] = st
        return st

    def _send_block(self, sid: int, block: bytes, end_stream: bool) -> None:
        flags = END_STREAM if end_stream else 0
        header_frames(self._out, sid, block, flags, self.peer_max_frame_size)

    def send_window(self, stream_id: int) -> int:
        """Bytes that may be sent on the stream now (stream and connection windows)."""
        st = self.streams.get(stream_id)
        if st is None or st.local_closed:
            return 0
        return max(0, min(st.send_window, self.send_window_conn, self.peer_max_frame_size))

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Send body bytes; ``len(data)`` must not exceed :meth:`send_window`."""
        st = self.streams.get(stream_id)
        if st is None or st.local_closed:
            return
        n = len(data)
        if n > min(st.send_window, self.send_window_conn, self.peer_max_frame_size):
            raise ValueError("send_data beyond the send window")
        st.send_window -= n
        self.send_window_conn -= n
        self._out.append(frame(DATA, END_STREAM if end_stream else 0, stream_id, data))
        if end_stream:
            st.local_closed = True
            self._maybe_forget(st)

    def end_stream(self, stream_id: int, trailers: list[Header] | None = None) -> None:
        st = self.streams.get(stream_id)
        if st is None or st.local_closed:
            return
        if trailers:
            self._send_block(stream_id, self._encoder.encode(trailers), True)
        else:
            self._out.append(frame(DATA, END_STREAM, stream_id))
        st.local_closed = True
        self._maybe_forget(st)

    def reset_stream(self, stream_id: int, code: int = CANCEL) -> None:
        """Abandon a stream: RST_STREAM, and give back the credit of unconsumed data."""
        st = self.streams.pop(stream_id, None)
        if st is None:
            return
        if not self.closed:
            self._out.append(frame(RST_STREAM, 0, stream_id, U32.pack(code)))
        self._discard(st)

    def discard(self, st: StreamState) -> None:
        """The exchange is done with a stream: return credit for what it never consumed."""
        self._discard(st)

    def _discard(self, st: StreamState) -> None:
        chunks = st.chunks
        if chunks:
            pending = sum([n for _, n in chunks])
            chunks.clear()
            if pending:
                self._ack_conn(pending)

    def consumed(self, stream_id: int, flow_length: int) -> None:
        """The exchange wrote ``flow_length`` bytes of this stream to its client."""
        if not flow_length or self.closed:
            return
        self._ack_conn(flow_length)
        st = self.streams.get(stream_id)
        if st is not None and not st.ended:
            st.recv_window, st.recv_unacked, update = give_credit(
                stream_id, st.recv_unacked + flow_length, st.recv_window, self.stream_window
            )
            if update is not None:
                self._out.append(update)

    def _ack_conn(self, n: int) -> None:
        if self.closed:
            return
        self.recv_window_conn, self._recv_unacked_conn, update = give_credit(
            0, self._recv_unacked_conn + n, self.recv_window_conn, self.recv_window_max
        )
        if update is not None:
            self._out.append(update)

    def ping(self, opaque: bytes = b"muxproxy") -> None:
        self._out.append(frame(PING, 0, 0, opaque[:8].ljust(8, b"\0")))

    def abort(self, reason: str) -> Update:
        """The connection is dead (e.g. no PING ACK): fail every stream with ``reason``."""
        up = Update()
        if not self.closed:
            self._terminate(reason, up)
        return up

    def close(self, code: int = NO_ERROR) -> None:
        if not self.closed:
            self._terminate("closed by the proxy", None, frame(GOAWAY, 0, 0, U32x2.pack(0, code)))

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    # --- input -------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> Update:
        """Feed bytes from the backend; ``b""`` means it closed the connection."""
        up = Update()
        if self.closed:
            return up
        if not data:
            self._terminate("backend closed the connection", up)
            return up
        buf = self._in + data if self._in else data
        pos = 0
        end = len(buf)
        try:
            while end - pos >= 9:
                hi, lo, type_, flags, sid = FRAME.unpack_from(buf, pos)
                if not self.settings_received and type_ != SETTINGS:
                    # RFC 9113 §3.4: the server's first frame is SETTINGS.  An HTTP/1.1 server
                    # answering our preface would otherwise look like a huge frame.
                    raise ConnectionError_(
                        PROTOCOL_ERROR, "backend did not answer with HTTP/2 SETTINGS"
                    )
                length = hi << 8 | lo
                if length > MAX_FRAME_SIZE:
                    raise ConnectionError_(FRAME_SIZE_ERROR, f"frame of {length} bytes")
                if end - pos - 9 < length:
                    break
                payload = buf[pos + 9 : pos + 9 + length]
                pos += 9 + length
                self._frame(type_, flags, sid & MAX_STREAM_ID, payload, up)
                if self.closed:
                    return up
        except ConnectionError_ as exc:
            goaway = frame(GOAWAY, 0, 0, U32x2.pack(0, exc.code))
            self._terminate(f"backend protocol error: {exc}", up, goaway)
            return up
        self._in = buf[pos:] if pos < end else b""
        return up

    def _frame(self, type_: int, flags: int, sid: int, payload: bytes, up: Update) -> None:
        if self._block is not None and type_ != CONTINUATION:
            raise ConnectionError_(PROTOCOL_ERROR, "header block interrupted")
        if type_ == DATA:
            self._on_data(flags, sid, payload, up)
        elif type_ == HEADERS:
            self._on_headers(flags, sid, payload, up)
        elif type_ == CONTINUATION:
            self._on_continuation(flags, sid, payload, up)
        elif type_ == WINDOW_UPDATE:
            self._on_window_update(sid, payload, up)
        elif type_ == SETTINGS:
            self._on_settings(flags, sid, payload, up)
        elif type_ == RST_STREAM:
            self._on_rst_stream(sid, payload, up)
        elif type_ == PING:
            if sid:
                raise ConnectionError_(PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise ConnectionError_(FRAME_SIZE_ERROR, "PING of the wrong size")
            if flags & ACK:
                up.ping_acked = True
            else:
                self._out.append(frame(PING, ACK, 0, payload))
        elif type_ == GOAWAY:
            if sid:
                raise ConnectionError_(PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                raise ConnectionError_(FRAME_SIZE_ERROR, "GOAWAY too short")
            last, code = U32x2.unpack_from(payload)
            self._goaway(last & MAX_STREAM_ID, code, up)
        elif type_ == PUSH_PROMISE:
            raise ConnectionError_(PROTOCOL_ERROR, "PUSH_PROMISE with push disabled")
        elif type_ == PRIORITY:
            self._on_priority(sid, payload, up)
        # Unknown frame types are ignored (RFC 9113 §4.1).

    def _on_priority(self, sid: int, payload: bytes, up: Update) -> None:
        """Ignored (no priority tree), but checked: RFC 9113 §6.3."""
        if not sid:
            raise ConnectionError_(PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            st = self.streams.get(sid)
            if st is not None:
                self._stream_error(st, StreamError(FRAME_SIZE_ERROR, "PRIORITY size"), up)

    def _stream_for(self, sid: int, what: str) -> _H2Stream | None:
        """The open stream a frame is for; None if it is gone (reset or ended)."""
        if not sid:
            raise ConnectionError_(PROTOCOL_ERROR, f"{what} on stream 0")
        if not sid & 1 or sid > self.highest_stream_id:
            raise ConnectionError_(PROTOCOL_ERROR, f"{what} on idle stream {sid}")
        return self.streams.get(sid)

    def _on_data(self, flags: int, sid: int, payload: bytes, up: Update) -> None:
        flow = len(payload)
        st = self._stream_for(sid, "DATA")
        self.recv_window_conn -= flow
        if self.recv_window_conn < 0:
            raise ConnectionError_(FLOW_CONTROL_ERROR, "backend overran the connection window")
        if flags & PADDED:
            payload = unpad(payload)
        if st is None:
            self._ack_conn(flow)  # a stream we reset or finished: the credit comes straight back
            return
        try:
            if st.ended:
                raise StreamError(STREAM_CLOSED, "DATA after END_STREAM")
            if st.headers is None:
                raise StreamError(PROTOCOL_ERROR, "DATA before the response head")
            st.recv_window -= flow
            if st.recv_window < 0:
                raise StreamError(FLOW_CONTROL_ERROR, "backend overran the stream window")
            st.received += len(payload)
            cl = st.content_length
            if cl is not None and st.received > cl:
                raise StreamError(PROTOCOL_ERROR, "more DATA than content-length")
            if flags & END_STREAM:
                self._check_length(st)
        except StreamError as exc:
            self._ack_conn(flow)
            self._stream_error(st, exc, up)
            return
        if flow:
            st.chunks.append((payload, flow))
        up.streams.append(st)
        if flags & END_STREAM:
            self._ended(st, up)

    def _check_length(self, st: _H2Stream) -> None:
        cl = st.content_length
        if cl is not None and st.received != cl and not st.head_request:
            status = st.headers[0][1] if st.headers else b""
            if status not in (b"204", b"304"):
                raise StreamError(PROTOCOL_ERROR, "body shorter than content-length")

    def _ended(self, st: _H2Stream, up: Update) -> None:
        st.ended = True
        up.capacity_changed = True
        self._maybe_forget(st)

    def _on_headers(self, flags: int, sid: int, payload: bytes, up: Update) -> None:
        if not sid:
            raise ConnectionError_(PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & PADDED:
            payload = unpad(payload)
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise ConnectionError_(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            payload = payload[5:]
        if flags & END_HEADERS:
            self._on_block(sid, payload, bool(flags & END_STREAM), up)
        else:
            self._block = [payload]
            self._block_stream = sid
            self._block_end_stream = bool(flags & END_STREAM)
            self._block_size = len(payload)
            self._block_frames = 0

    def _on_continuation(self, flags: int, sid: int, payload: bytes, up: Update) -> None:
        if self._block is None or sid != self._block_stream:
            raise ConnectionError_(PROTOCOL_ERROR, "unexpected CONTINUATION")
        self._block.append(payload)
        self._block_size += len(payload)
        self._block_frames += 1
        if self._block_size > self.max_header_list_size + MAX_FRAME_SIZE:
            # A CONTINUATION flood: bounded, whatever the peer means to send.
            raise ConnectionError_(ENHANCE_YOUR_CALM, "header block too large")
        if self._block_frames > max_continuations(self.max_header_list_size):
            # Empty or tiny frames pass the byte cap; counting them bounds the work and the
            # fragment list (CVE-2024-28182, as nghttp2 counts them).
            raise ConnectionError_(ENHANCE_YOUR_CALM, "too many CONTINUATION frames")
        if flags & END_HEADERS:
            block = b"".join(self._block)
            self._block = None
            self._on_block(sid, block, self._block_end_stream, up)

    def _on_block(self, sid: int, block: bytes, end_stream: bool, up: Update) -> None:
        try:  # always decoded, even for a stream that is gone: HPACK state is shared
            fields, too_large, bad = self._decoder.decode(block)
        except HPACKError as exc:
            raise ConnectionError_(COMPRESSION_ERROR, f"HPACK: {exc}") from None
        st = self._stream_for(sid, "HEADERS")
        if st is None:
            return
        try:
            if st.ended:
                raise StreamError(STREAM_CLOSED, "HEADERS after END_STREAM")
            if too_large:
                raise StreamError(PROTOCOL_ERROR, "response head too large")
            if bad is not None:
                raise StreamError(PROTOCOL_ERROR, f"invalid header field {bad[:20]!r}")
            if st.headers is None:
                self._on_head(st, fields, end_stream, up)
            else:  # trailers
                if not end_stream:
                    raise StreamError(PROTOCOL_ERROR, "trailers without END_STREAM")
                check_fields(fields, trailers=True)
                st.trailers = fields
                self._check_length(st)
        except StreamError as exc:
            self._stream_error(st, exc, up)
            return
        if end_stream:
            up.streams.append(st)
            self._ended(st, up)

    def _on_head(
        self, st: _H2Stream, fields: Sequence[Header], end_stream: bool, up: Update
    ) -> None:
        known = _FINAL_HEADS.get(fields)  # the same decoded block as before: checked then
        if known is None:
            cl = _final_head(fields, end_stream)
            if cl is _INFORMATIONAL:
                return  # 1xx: never relayed
            if type(fields) is tuple:
                _FINAL_HEADS.put(fields, (cl,))
        else:
            (cl,) = known
        st.content_length = cl
        st.headers = fields
        if end_stream:
            self._check_length(st)
        else:
            up.streams.append(st)

    def _stream_error(self, st: _H2Stream, exc: StreamError, up: Update) -> None:
        """RFC 9113 §5.4.2: reset this stream alone; its client gets a 502."""
        self.streams.pop(st.stream_id, None)
        self._out.append(frame(RST_STREAM, 0, st.stream_id, U32.pack(exc.code)))
        self._discard(st)
        st.reset_code = exc.code
        st.error = f"backend sent a malformed response: {exc}"
        up.streams.append(st)
        up.capacity_changed = True

    def _on_rst_stream(self, sid: int, payload: bytes, up: Update) -> None:
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, "RST_STREAM of the wrong size")
        st = self._stream_for(sid, "RST_STREAM")
        (code,) = U32.unpack(payload)
        self.resets_received += 1
        if code == REFUSED:
            self.refused_received += 1
        if st is None:
            return
        del self.streams[sid]
        st.reset_code = code
        st.refused = code == REFUSED and st.headers is None
        st.error = f"backend reset the stream ({code_name(code)})"
        up.streams.append(st)
        up.capacity_changed = True

    def _on_window_update(self, sid: int, payload: bytes, up: Update) -> None:
        increment = window_increment(payload)
        if not sid:
            bad = credit_error(self.send_window_conn, increment, "connection")
            if bad is not None:
                raise ConnectionError_(*bad)
            self.send_window_conn += increment
            up.window_opened = True
            return
        st = self._stream_for(sid, "WINDOW_UPDATE")
        if st is None:
            return
        bad = credit_error(st.send_window, increment, "stream")
        if bad is not None:
            self._stream_error(st, StreamError(*bad), up)
            return
        st.send_window += increment
        up.window_opened = True

    def _on_settings(self, flags: int, sid: int, payload: bytes, up: Update) -> None:
        if sid:
            raise ConnectionError_(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            if not self._settings_acked:
                self._settings_acked = True
                delta = self.stream_window - DEFAULT_WINDOW
                self._stream_recv_initial = self.stream_window
                shift_recv_windows(self.streams.values(), delta)
            return
        # Only the first SETTINGS, or a larger initial window, gives send credit: repeated
        # SETTINGS are no answer to anything we sent (relay.Update.answers).
        credit = not self.settings_received
        for key, value in read_settings(payload):  # (ranges checked there)
            if key == MAX_CONCURRENT_STREAMS:
                self.peer_max_concurrent_streams = value
            elif key == INITIAL_WINDOW_SIZE:
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                shift_send_windows(self.streams.values(), delta)
                credit = credit or delta > 0
            elif key == SETTINGS_MAX_FRAME_SIZE:
                self.peer_max_frame_size = value
            elif key == ENABLE_PUSH:
                if value != 0:  # a server may only say 0 (RFC 9113 §6.5.2)
                    raise ConnectionError_(PROTOCOL_ERROR, f"ENABLE_PUSH {value} from a server")
            elif key == ENABLE_CONNECT_PROTOCOL:
                if self.peer_connect_protocol and not value:
                    raise ConnectionError_(PROTOCOL_ERROR, f"ENABLE_CONNECT_PROTOCOL {value}")
                self.peer_connect_protocol = bool(value)
            # HEADER_TABLE_SIZE: our encoder uses no dynamic table.  MAX_HEADER_LIST_SIZE is
            # advisory.  Unknown settings are ignored (RFC 9113 §6.5.2).
        self._out.append(frame(SETTINGS, ACK, 0))
        self.settings_received = True
        up.capacity_changed = True
        up.window_opened = credit

    def _goaway(self, last: int, code: int, up: Update) -> None:
        if self.goaway_last_stream_id is not None:
            last = min(last, self.goaway_last_stream_id)  # a second GOAWAY may only lower it
        self.goaway_last_stream_id = last
        self.goaway_error = code
        up.goaway = True
        up.capacity_changed = True
        # Streams above last_stream_id were never processed (RFC 9113 §6.8): replayable,
        # except the connection's very first stream under an error code — a backend that
        # fails the first request it sees may be failing on the request itself.
        for sid, st in list(self.streams.items()):
            if sid > last and not st.ended:  # (a complete response stays complete)
                del self.streams[sid]
                st.reset_code = REFUSED
                st.refused = st.headers is None and not (code and sid == 1)
                st.error = "backend sent GOAWAY before processing the stream"
                up.streams.append(st)
        if code:
            self._terminate(f"backend sent GOAWAY ({code_name(code)})", up)

    def _terminate(self, reason: str, up: Update | None = None, goaway: bytes = b"") -> None:
        """Fail every stream; only ``goaway`` is still sent.  Output not yet handed out is
        dropped: a stream whose HEADERS were in it is never sent after it was failed, so the
        driver may replay it as never processed (io/backend.py ``_never_sent``)."""
        self.closed = True
        self.close_reason = reason
        self._out.clear()
        if goaway:
            self._out.append(goaway)
        fail_streams(self.streams, INTERNAL_ERROR, reason, up)

    def _maybe_forget(self, st: _H2Stream) -> None:
        if st.ended and st.local_closed:
            self.streams.pop(st.stream_id, None)


# Final response heads already checked, by the identity of the decoded block's tuple (see
# hpack_codec.Decoder.decode): their content-length.  A backend answers with a few shapes.
_FINAL_HEADS: ByIdentity[Sequence[Header], tuple[int | None]] = ByIdentity(64)
_INFORMATIONAL = -1


def _final_head(fields: Sequence[Header], end_stream: bool) -> int | None:
    """RFC 9113 §8.3.2 and §8.1.1: check a response head; its content-length, or
    ``_INFORMATIONAL`` for a 1xx head (which must not end the stream).  Raises StreamError."""
    check_fields(fields, trailers=False)
    status = fields[0][1]
    if len(status) != 3 or not status.isdigit():
        raise StreamError(PROTOCOL_ERROR, f"malformed :status {status[:16]!r}")
    if status[0] == 0x31:  # 1xx: informational
        if end_stream or status == b"101":
            raise StreamError(PROTOCOL_ERROR, f"status {status.decode()} ending the stream")
        return _INFORMATIONAL
    cl: int | None = None
    for name, value in fields:
        if name == b"content-length":
            if not value.isdigit() or (cl is not None and int(value) != cl):
                raise StreamError(PROTOCOL_ERROR, "malformed content-length")
            cl = int(value)
    return cl
