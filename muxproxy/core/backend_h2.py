"""The client role of one pooled HTTP/2 backend connection, sans-IO, on top of h2.

Theory of operation
-------------------
:class:`H2Backend` wraps ``h2.H2Connection(client_side=True)`` and owns the per-stream state the
proxy needs: the response head, the response body chunks not yet written to the client, the
end or reset of the stream.  The I/O layer feeds it bytes (:meth:`receive_data`), asks it for
bytes to write (:meth:`data_to_send`) and wakes the exchanges whose streams changed.

Invariants:

* **Credit, not buffering.**  Each stream's receive window is ``stream_window`` (W); response
  DATA is acknowledged (:meth:`consumed`) only once the exchange has written it to the client,
  so a stream never buffers more than W.  The connection window is ``max_streams × W``, so one
  slow stream never starves the others.
* **Capacity comes from h2.**  ``streams`` holds exactly the streams h2 still counts as open
  (an entry is dropped when h2 says the stream closed), and :meth:`free_streams` checks h2's own
  (O(streams)) count whenever the cheap estimate comes near the limit.
* **GOAWAY means drain.**  After GOAWAY no stream is opened; streams above ``last_stream_id``
  are failed as *refused* (never processed, so replayable whatever the method).
* Peer-caused problems are reported in :class:`Update` and on the streams, never raised.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from .headers import Header

_S = h2.settings.SettingCodes


def _cache_huffman_decoding() -> None:
    """Memoise hpack's pure-Python Huffman decoder.

    Backends such as nginx send their response fields as Huffman-coded literals without
    indexing, so the same few values (server, content-type, etag, date within a second) are
    decoded again on every response; profiling showed this among the top costs of a request.
    The decoder is a pure function of its input, so a bounded cache is safe.
    """
    import hpack.hpack

    original = getattr(hpack.hpack, "decode_huffman")  # noqa: B009 - not re-exported
    if getattr(original, "muxproxy_cached", False):
        return
    cache: dict[bytes, bytes] = {}

    def decode_huffman(data: bytes | bytearray | memoryview | None) -> bytes:
        if not data:
            return b""
        key = bytes(data)
        out = cache.get(key)
        if out is None:
            out = original(key)
            if len(cache) >= 4096:
                cache.clear()
            cache[key] = out
        return out

    decode_huffman.muxproxy_cached = True  # type: ignore[attr-defined]
    setattr(hpack.hpack, "decode_huffman", decode_huffman)  # noqa: B010


_cache_huffman_decoding()
MAX_STREAM_ID = 2**31 - 1
# Drain a connection this many stream ids before they run out (RFC 9113 §5.1.1).
STREAM_ID_RESERVE = 1000
CANCEL = h2.errors.ErrorCodes.CANCEL
REFUSED = h2.errors.ErrorCodes.REFUSED_STREAM


class _DrainableStateMachine(h2.connection.H2ConnectionStateMachine):
    """h2 closes the whole connection on receiving GOAWAY, so the streams the backend promised
    to finish (≤ last_stream_id) could no longer receive or send a frame.  RFC 9113 §6.8 says
    they go on: we keep the connection open and stop opening streams ourselves (``draining``)."""

    _transitions = {
        **h2.connection.H2ConnectionStateMachine._transitions,
        (h2.connection.ConnectionState.CLIENT_OPEN, h2.connection.ConnectionInputs.RECV_GOAWAY): (
            None,
            h2.connection.ConnectionState.CLIENT_OPEN,
        ),
    }


class _Connection(h2.connection.H2Connection):
    """h2 counts its open streams by walking all of them (O(streams)) on every new stream, which
    made opening the 5,000th WebSocket on a connection cost milliseconds (measured).  The count
    comes from our per-stream table instead while it is clearly below the peer's limit; near the
    limit, and every 256th time (h2 purges closed streams only during the walk), h2 walks."""

    def __init__(self, config: h2.config.H2Configuration, open_streams: dict[int, object]) -> None:
        super().__init__(config=config)
        self._ours = open_streams
        self._calls = 0

    @property
    def open_outbound_streams(self) -> int:
        self._calls += 1
        estimate = len(self._ours)
        if self._calls % 256 and estimate + 8 < self.remote_settings.max_concurrent_streams:
            return estimate
        return int(super().open_outbound_streams)


@dataclass(slots=True)
class StreamState:
    """What the backend sent on one stream, waiting to be relayed to the client."""

    stream_id: int
    headers: list[Header] | None = None  # the final response head, once received
    chunks: deque[tuple[bytes, int]] = field(default_factory=deque)  # (data, flow length)
    trailers: list[Header] | None = None
    ended: bool = False  # END_STREAM received
    reset_code: int | None = None  # RST_STREAM received or connection lost
    refused: bool = False  # provably never processed: safe to replay
    error: str | None = None  # why it failed, for the client's 502


@dataclass(slots=True)
class Update:
    """What one call of :meth:`H2Backend.receive_data` changed."""

    streams: list[StreamState] = field(default_factory=list)  # streams with news
    window_opened: bool = False  # send windows may have grown
    capacity_changed: bool = False  # streams closed, or SETTINGS changed the limit
    goaway: bool = False
    ping_acked: bool = False
    closed: bool = False  # connection is unusable (protocol error or GOAWAY with error)


class BackendCore(Protocol):
    """What the pool and the exchanges need of a backend connection's protocol core; both
    :class:`H2Backend` and :class:`~muxproxy.core.backend_h3.H3Backend` provide it."""

    streams: dict[int, StreamState]  # open streams, as the protocol counts them
    closed: bool
    close_reason: str
    goaway_last_stream_id: int | None
    resets_received: int
    refused_received: int

    @property
    def settings_received(self) -> bool: ...
    @property
    def draining(self) -> bool: ...
    @property
    def enable_connect_protocol(self) -> bool: ...
    def free_streams(self) -> int: ...
    def stream_limit(self) -> int: ...
    def open_stream(self, headers: list[Header], end_stream: bool) -> StreamState: ...
    def send_window(self, stream_id: int) -> int: ...
    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None: ...
    def end_stream(self, stream_id: int, trailers: list[Header] | None = None) -> None: ...
    def reset_stream(self, stream_id: int, code: int = ...) -> None: ...
    def discard(self, st: StreamState) -> None: ...
    def consumed(self, stream_id: int, flow_length: int) -> None: ...
    def ping(self) -> None: ...
    def close(self, code: int = ...) -> None: ...
    def abort(self, reason: str) -> Update: ...


class H2Backend:
    """Sans-IO HTTP/2 client connection with per-stream relay state."""

    def __init__(
        self,
        *,
        stream_window: int = 256 * 1024,
        max_streams: int = 1000,
        max_header_list_size: int = 256 * 1024,
    ) -> None:
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_inbound_headers=True,
            validate_outbound_headers=True,
            normalize_outbound_headers=False,
        )
        self.streams: dict[int, StreamState] = {}
        self.h2 = _Connection(config, self.streams)  # type: ignore[arg-type]
        self.h2.state_machine = _DrainableStateMachine()
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                _S.ENABLE_PUSH: 0,
                _S.INITIAL_WINDOW_SIZE: stream_window,
                _S.MAX_CONCURRENT_STREAMS: 100,
                _S.MAX_HEADER_LIST_SIZE: max_header_list_size,
            },
        )
        self.stream_window = stream_window
        self.max_streams = max_streams
        self.settings_received = False
        self.goaway_last_stream_id: int | None = None
        self.goaway_error: int | None = None
        self.closed = False
        self.close_reason = ""
        self._out = bytearray()  # bytes h2 queued before a GOAWAY (h2 would discard them)
        self._first_frame_checked = False
        self.resets_received = 0
        self.refused_received = 0

    # --- lifecycle ---------------------------------------------------------------------

    def initiate(self) -> None:
        """Queue the preface, our SETTINGS and the connection window (max_streams × W)."""
        self.h2.initiate_connection()
        window = min(MAX_STREAM_ID, self.max_streams * self.stream_window)
        if window > 65535:
            self.h2.increment_flow_control_window(window - 65535)

    @property
    def enable_connect_protocol(self) -> bool:
        return bool(self.h2.remote_settings.get(_S.ENABLE_CONNECT_PROTOCOL, 0))

    @property
    def draining(self) -> bool:
        """No new streams may be opened here (GOAWAY, ids running out, or closed)."""
        return (
            self.closed
            or self.goaway_last_stream_id is not None
            or self.h2.highest_outbound_stream_id >= MAX_STREAM_ID - 2 * STREAM_ID_RESERVE
        )

    def stream_limit(self) -> int:
        return min(self.h2.remote_settings.max_concurrent_streams, self.max_streams)

    def free_streams(self) -> int:
        """How many more streams may be opened now (0 while draining)."""
        if self.draining or not self.settings_received:
            return 0
        limit = self.stream_limit()
        estimate = len(self.streams)
        if estimate + 8 < limit:
            return limit - estimate
        return max(0, limit - self.h2.open_outbound_streams)

    # --- actions -----------------------------------------------------------------------

    def open_stream(self, headers: list[Header], end_stream: bool) -> StreamState:
        """Send a request head on a new stream.  Raises h2.exceptions.TooManyStreamsError
        if the backend's limit was reached (callers check :meth:`free_streams` first)."""
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, headers, end_stream=end_stream)
        st = StreamState(sid)
        self.streams[sid] = st
        return st

    def send_window(self, stream_id: int) -> int:
        """Bytes that may be sent on the stream now (stream and connection windows)."""
        try:
            return min(
                self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size
            )
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return 0

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Send body bytes; ``len(data)`` must not exceed :meth:`send_window`."""
        self.h2.send_data(stream_id, data, end_stream=end_stream)
        if end_stream:
            self._maybe_forget(stream_id)

    def end_stream(self, stream_id: int, trailers: list[Header] | None = None) -> None:
        if trailers:
            self.h2.send_headers(stream_id, trailers, end_stream=True)
        else:
            self.h2.end_stream(stream_id)
        self._maybe_forget(stream_id)

    def reset_stream(self, stream_id: int, code: int = CANCEL) -> None:
        """Abandon a stream: RST_STREAM, and give back the credit of unconsumed data."""
        st = self.streams.pop(stream_id, None)
        try:
            self.h2.reset_stream(stream_id, error_code=code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        if st is not None:
            self._discard(st)

    def discard(self, st: StreamState) -> None:
        """The exchange is done with a stream: return credit for what it never consumed."""
        self._discard(st)

    def _discard(self, st: StreamState) -> None:
        pending = sum(n for _, n in st.chunks)
        st.chunks.clear()
        if pending and not self.closed:
            self.h2.acknowledge_received_data(pending, st.stream_id)

    def consumed(self, stream_id: int, flow_length: int) -> None:
        """The exchange wrote ``flow_length`` bytes of this stream to its client."""
        if flow_length and not self.closed:
            self.h2.acknowledge_received_data(flow_length, stream_id)

    def ping(self, opaque: bytes = b"muxproxy") -> None:
        self.h2.ping(opaque)

    def abort(self, reason: str) -> Update:
        """The connection is dead (e.g. no PING ACK): fail every stream with ``reason``."""
        up = Update()
        if not self.closed:
            self._terminate(reason, up)
        return up

    def close(self, code: int = 0) -> None:
        if not self.closed:
            self.h2.close_connection(error_code=code)
            self._terminate("closed by the proxy")

    def data_to_send(self) -> bytes:
        if self._out:
            out = bytes(self._out) + self.h2.data_to_send()
            self._out.clear()
            return out
        return self.h2.data_to_send()

    # --- input -------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> Update:
        """Feed bytes from the backend; ``b""`` means it closed the connection."""
        up = Update()
        if self.closed:
            return up
        if not data:
            self._terminate("backend closed the connection", up)
            return up
        if not self.settings_received and not self._first_frame_checked:
            # RFC 9113 §3.4: the server's first frame is SETTINGS.  An HTTP/1.1 server
            # answering our preface would otherwise look like a huge frame header to h2.
            if len(data) >= 4 and data[3] != 0x4:
                self._terminate("backend did not answer with HTTP/2 SETTINGS", up)
                return up
            self._first_frame_checked = len(data) >= 4
        pending = self.h2.data_to_send()
        if pending:
            self._out += pending
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._terminate(f"backend protocol error: {exc}", up)
            return up
        streams = self.streams
        for ev in events:
            if isinstance(ev, h2.events.DataReceived):
                st = streams.get(ev.stream_id)
                if st is not None:
                    st.chunks.append((ev.data, ev.flow_controlled_length))
                    up.streams.append(st)
                elif ev.flow_controlled_length:
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.ResponseReceived):
                st = streams.get(ev.stream_id)
                if st is not None:
                    st.headers = ev.headers
                    up.streams.append(st)
            elif isinstance(ev, h2.events.StreamEnded):
                st = streams.get(ev.stream_id)
                if st is not None:
                    st.ended = True
                    up.streams.append(st)
                    self._maybe_forget(ev.stream_id)
                    up.capacity_changed = True
            elif isinstance(ev, h2.events.WindowUpdated):
                up.window_opened = True
            elif isinstance(ev, h2.events.TrailersReceived):
                st = streams.get(ev.stream_id)
                if st is not None:
                    st.trailers = ev.headers
            elif isinstance(ev, h2.events.StreamReset):
                st = streams.pop(ev.stream_id, None)
                self.resets_received += 1
                if ev.error_code == REFUSED:
                    self.refused_received += 1
                if st is not None:
                    st.reset_code = ev.error_code
                    st.refused = ev.error_code == REFUSED and st.headers is None
                    st.error = f"backend reset the stream ({_code_name(ev.error_code)})"
                    up.streams.append(st)
                    up.capacity_changed = True
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                self.settings_received = True
                up.capacity_changed = True
                up.window_opened = True
            elif isinstance(ev, h2.events.PingAckReceived):
                up.ping_acked = True
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self._goaway(ev, up)
            # InformationalResponseReceived (1xx), SettingsAcknowledged, PriorityUpdated,
            # UnknownFrameReceived: nothing to relay.
        return up

    def _goaway(self, ev: h2.events.ConnectionTerminated, up: Update) -> None:
        last = ev.last_stream_id if ev.last_stream_id is not None else MAX_STREAM_ID
        if self.goaway_last_stream_id is not None:
            last = min(last, self.goaway_last_stream_id)  # a second GOAWAY may only lower it
        self.goaway_last_stream_id = last
        self.goaway_error = ev.error_code
        up.goaway = True
        up.capacity_changed = True
        # Streams above last_stream_id were never processed (RFC 9113 §6.8): replayable,
        # except the connection's very first stream under an error code — a backend that
        # fails the first request it sees may be failing on the request itself.
        for sid, st in list(self.streams.items()):
            if sid > last:
                del self.streams[sid]
                st.reset_code = REFUSED
                st.refused = st.headers is None and not (ev.error_code and sid == 1)
                st.error = "backend sent GOAWAY before processing the stream"
                up.streams.append(st)
        if ev.error_code:
            self._terminate(f"backend sent GOAWAY ({_code_name(ev.error_code)})", up)

    def _terminate(self, reason: str, up: Update | None = None) -> None:
        self.closed = True
        self.close_reason = reason
        for st in self.streams.values():
            if st.reset_code is None and not st.ended:
                st.reset_code = h2.errors.ErrorCodes.INTERNAL_ERROR
                st.error = reason
            if up is not None:
                up.streams.append(st)
        self.streams.clear()
        if up is not None:
            up.closed = True
            up.capacity_changed = True

    def _maybe_forget(self, stream_id: int) -> None:
        s = self.h2.streams.get(stream_id)
        if s is None or s.closed:
            self.streams.pop(stream_id, None)


def _code_name(code: int) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return f"error {code}"
