"""The client role of one pooled HTTP/1.1 backend connection, sans-IO, on top of h11.

Theory of operation
-------------------
:class:`H1Backend` puts an ``h11.Connection(CLIENT)`` behind the interface of
:class:`~muxproxy.core.relay.BackendCore`, so the one connection driver and the exchange relay
HTTP/1.1 backends exactly as they relay HTTP/2 ones:

* A connection carries **one stream at a time** (``free_streams()`` is 1 when idle, else 0);
  stream ids count up from 1.  The request head arrives in HTTP/2 form (pseudo-headers) and is
  written as an HTTP/1.1 request: ``:authority`` becomes ``Host``; a body without
  ``Content-Length`` is sent chunked (trailers only then).
* The response is framed by h11: Content-Length, chunked, or delimited by the close.  Its head
  is handed on in HTTP/2 form (``:status``, lower-case names, hop-by-hop fields and those named
  in ``Connection`` dropped); 1xx interim responses are skipped.
* When both messages are complete the connection is reused (h11's next cycle) and capacity is
  announced.  A response that asks to close (``Connection: close``, as nginx does after
  ``keepalive_requests``) or a backend closing an idle connection is routine: the connection
  drains like an HTTP/2 one after GOAWAY, and the pool replaces it.
* Flow control: a stream's send window is the room left in the write buffer (``stream_window``
  bytes); reading pauses (``read_paused``) while more than ``stream_window`` bytes of response
  wait for the client, so a slow client holds the backend through TCP.
* A backend closing the connection fails the stream in flight: *refused* (safe to replay) only
  when no byte of the request had left this core, else a 502 — an HTTP/1.1 request cannot be
  proven unprocessed once any of it was written.  A response that ends early is a 502, never a
  truncated success.
"""

from __future__ import annotations

import h11

from .headers import Header
from .relay import StreamState, Update, fail_streams

# Request fields h11 frames itself or HTTP/1.1 spells differently.
_REQUEST_SKIP = frozenset({b"host", b"transfer-encoding", b"connection", b"te"})
_RESPONSE_DROP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te"}
)
CANCEL = 0x8
INTERNAL_ERROR = 0x2


class H1Backend:
    """One keep-alive HTTP/1.1 connection to a backend, one request at a time."""

    enable_connect_protocol = False  # WebSockets take a dedicated Upgrade connection
    settings_received = True  # nothing to wait for after connecting

    def __init__(self, stream_window: int = 256 * 1024) -> None:
        self.stream_window = stream_window
        self._h11 = h11.Connection(h11.CLIENT)
        self.streams: dict[int, StreamState] = {}
        self._current: StreamState | None = None
        self._sent = False  # some byte of the current request left via data_to_send()
        self._next_id = 1
        self._out: list[bytes] = []
        self._out_size = 0
        self._unacked = 0  # response bytes received and not yet taken by the client
        self._chunked = False  # the current request body is chunked (trailers allowed)
        self.closed = False
        self.close_reason = ""
        self.goaway_last_stream_id: int | None = None  # set when the connection stops reuse
        self.resets_received = 0
        self.refused_received = 0

    # --- what the pool reads -------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self.closed or self.goaway_last_stream_id is not None

    @property
    def read_paused(self) -> bool:
        return self._unacked >= self.stream_window

    def stream_limit(self) -> int:
        return 1

    def free_streams(self) -> int:
        return 0 if self._current is not None or self.draining else 1

    def initiate(self) -> None:
        """HTTP/1.1 has no connection preface."""

    # --- actions -----------------------------------------------------------------------

    def open_stream(self, headers: list[Header], end_stream: bool) -> StreamState:
        assert self._current is None and not self.draining, "one request at a time"
        method = target = b""
        host = b""
        fields: list[Header] = []
        has_length = False
        for name, value in headers:
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    target = value
                elif name == b":authority":
                    host = value
                continue
            if name in _REQUEST_SKIP:
                continue
            if name == b"content-length":
                has_length = True
            fields.append((name, value))
        self._chunked = not end_stream and not has_length
        if self._chunked:
            fields.append((b"transfer-encoding", b"chunked"))
        fields.insert(0, (b"host", host))
        st = StreamState(self._next_id)
        self._next_id += 1
        self.streams[st.stream_id] = st
        self._current = st
        self._sent = False
        self._queue(self._h11.send(h11.Request(method=method, target=target, headers=fields)))
        if end_stream:
            self._queue(self._h11.send(h11.EndOfMessage()))
        return st

    def send_window(self, stream_id: int) -> int:
        if stream_id not in self.streams or self._h11.our_state is not h11.SEND_BODY:
            return 0
        return max(0, self.stream_window - self._out_size)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        if stream_id not in self.streams:
            return
        try:
            self._queue(self._h11.send(h11.Data(data=data)))
        except h11.LocalProtocolError as exc:  # more than its Content-Length
            self._fail_current(f"request body cannot be framed: {exc}")
            return
        if end_stream:
            self.end_stream(stream_id)

    def end_stream(self, stream_id: int, trailers: list[Header] | None = None) -> None:
        if stream_id not in self.streams or self._h11.our_state is not h11.SEND_BODY:
            return
        try:
            end = h11.EndOfMessage(headers=trailers if self._chunked and trailers else [])
            self._queue(self._h11.send(end))
        except h11.LocalProtocolError as exc:  # fewer bytes than its Content-Length
            self._fail_current(f"request body cannot be framed: {exc}")
            return
        self._maybe_cycle(None)

    def reset_stream(self, stream_id: int, code: int = CANCEL) -> None:
        """HTTP/1.1 cannot abandon a message: the connection closes after this stream."""
        st = self.streams.pop(stream_id, None)
        if st is None:
            return
        self._current = None
        self._stop_reuse(stream_id)
        self.close()

    def discard(self, st: StreamState) -> None:
        for _, n in st.chunks:  # never taken by the client: its bytes no longer count
            self._unacked -= n
        st.chunks.clear()

    def consumed(self, stream_id: int, flow_length: int) -> None:
        self._unacked -= flow_length

    def ping(self) -> None:
        """No PING in HTTP/1.1: an idle connection is kept by the backend's keep-alive timer."""

    def close(self, code: int = 0) -> None:
        if not self.closed:
            self._terminate("closed by the proxy")

    def abort(self, reason: str) -> Update:
        up = Update()
        if not self.closed:
            self._terminate(reason, up)
        return up

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_size = 0
        if self._current is not None:
            self._sent = True
        return data

    # --- input -------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> Update:
        """Feed bytes from the backend; ``b""`` means it closed the connection."""
        up = Update()
        if self.closed:
            return up
        conn = self._h11
        try:
            conn.receive_data(data)
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA or ev is h11.PAUSED:
                    break
                if not self._event(ev, up):
                    break
        except h11.RemoteProtocolError as exc:
            if data:
                self._terminate(f"backend sent invalid HTTP/1.1: {exc}", up)
            else:  # closed before its message was complete
                self._closed_by_peer(up)
            return up
        if not data and not self.closed:
            self._closed_by_peer(up)
        return up

    def _event(self, ev: object, up: Update) -> bool:
        st = self._current
        if type(ev) is h11.Data:
            assert st is not None
            n = len(ev.data)
            st.chunks.append((bytes(ev.data), n))
            self._unacked += n
            _note(up, st)
            return True
        if type(ev) is h11.Response:
            assert st is not None
            st.headers = _response_head(ev)
            _note(up, st)
            return True
        if type(ev) is h11.InformationalResponse:
            return True  # 100 Continue and the like: the proxy answers its client itself
        if type(ev) is h11.EndOfMessage:
            assert st is not None
            if ev.headers:
                st.trailers = [(n, v) for n, v in ev.headers]
            st.ended = True
            _note(up, st)
            self._maybe_cycle(up)
            return True
        return False  # ConnectionClosed: handled by the caller

    def _maybe_cycle(self, up: Update | None) -> None:
        """Both messages complete: the stream is over; reuse the connection or drain it."""
        st = self._current
        conn = self._h11
        if st is None or not st.ended or conn.our_state not in _OVER:
            return
        self.streams.pop(st.stream_id, None)
        self._current = None
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            self._stop_reuse(st.stream_id)
            if up is not None:
                up.goaway = True
        if up is not None:
            up.capacity_changed = True

    def _stop_reuse(self, last: int) -> None:
        if self.goaway_last_stream_id is None:
            self.goaway_last_stream_id = last

    def _closed_by_peer(self, up: Update) -> None:
        st = self._current
        if st is None:  # an idle keep-alive connection closed by the backend: routine
            self._stop_reuse(self._next_id - 1)
            up.goaway = True
            self._terminate("backend closed an idle connection", up)
            return
        if st.headers is None and not self._sent:
            st.refused = True
            self.refused_received += 1
            reason = "backend closed the connection before the request was sent"
        elif st.headers is None:
            reason = "backend closed the connection before responding"
        else:
            reason = "backend closed the connection mid-response"
        self._terminate(reason, up)

    def _fail_current(self, reason: str) -> None:
        st = self._current
        if st is not None:
            st.reset_code = INTERNAL_ERROR
            st.error = reason
        self._terminate(reason)

    def _queue(self, data: bytes | None) -> None:
        if data:
            self._out.append(data)
            self._out_size += len(data)

    def _terminate(self, reason: str, up: Update | None = None) -> None:
        self.closed = True
        self.close_reason = reason
        fail_streams(self.streams, INTERNAL_ERROR, reason, up)
        self._current = None


_OVER = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)


def _note(up: Update, st: StreamState) -> None:
    if not up.streams or up.streams[-1] is not st:
        up.streams.append(st)


def _response_head(ev: h11.Response) -> list[Header]:
    raw = ev.headers.raw_items()
    named: set[bytes] = set()
    for name, value in raw:
        if name.lower() == b"connection":
            named.update(t.strip().lower() for t in value.split(b","))
    out: list[Header] = [(b":status", b"%d" % ev.status_code)]
    for name, value in raw:
        name = name.lower()
        if name not in _RESPONSE_DROP and name not in named:
            out.append((name, value))
    return out
