"""The client role of one pooled HTTP/3 backend connection, sans-IO, on top of aioquic.

Theory of operation
-------------------
:class:`H3Backend` puts aioquic's ``QuicConnection`` + ``H3Connection`` behind the interface of
:class:`~muxproxy.core.backend_h2.H2Backend` — ``open_stream``, ``send_window``, ``send_data``,
``end_stream``, ``reset_stream``, ``consumed``, ``free_streams``, ``streams`` of
:class:`StreamState` — so the pool and the exchanges do not know which protocol carries them.
Datagrams and time replace bytes: ``receive_datagrams(batch, addr, now)``,
``datagrams_to_send(now)``, ``get_timer()``, ``handle_timer(now)``.

Two aioquic facts shape it (DESIGN.md §3):

* streams opened beyond the peer's MAX_STREAMS are silently queued by aioquic, so admission
  counts both the concurrent streams (our cap) and the peer's cumulative bidi limit itself;
* stream receive windows grow as data arrives, not as it is consumed, so :class:`CreditCap`
  resets a stream whose client stays too slow for too long.

A peer's GOAWAY (RFC 9114 §5.2) is read off the control stream by :class:`ControlStreamWatcher`
(aioquic skips it): no new streams, and streams at or above its stream id were never processed
(replayable).  So is a stream none of whose bytes ever left in a packet when the connection ends.
H3_REQUEST_REJECTED on a stream without a response head means the same, whether
it comes as RESET_STREAM or as STOP_SENDING (RFC 9114 §4.1.1).  The GOAWAY is applied the moment
its bytes are read, so a connection close processed in the same turn cannot hide it.  Any other
STOP_SENDING (an early response, RFC 9114 §4.1) only ends the upload: later body bytes are
dropped rather than sent on a stream aioquic has reset.
"""

from __future__ import annotations

from aioquic._buffer import Buffer, BufferReadError
from aioquic.h3 import events as h3e
from aioquic.h3.connection import ErrorCode, FrameType, H3Connection, Setting
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from .credit import CreditCap
from .headers import Header
from .relay import StreamState, Update, fail_streams

REQUEST_CANCELLED = ErrorCode.H3_REQUEST_CANCELLED
REQUEST_REJECTED = ErrorCode.H3_REQUEST_REJECTED
_FRAME_SLACK = 16  # room for the DATA frame header aioquic adds to each send_data
_MAX_UNSENT = 64 * 1024  # bytes queued in aioquic beyond what has left in packets


class ControlStreamWatcher:
    """Reads the peer's HTTP/3 control stream beside aioquic, for the GOAWAY it ignores.

    aioquic hands control frames other than SETTINGS and MAX_PUSH_ID to nobody (it skips
    them), so the watcher parses the same bytes: stream type, then frame type/length/payload.
    """

    def __init__(self) -> None:
        self._buffers: dict[int, bytearray] = {}
        self._control: int | None = None
        self.goaway_stream_id: int | None = None

    def feed(self, stream_id: int, data: bytes) -> None:
        if stream_id % 4 != 3:  # server-initiated unidirectional streams only
            return
        if self._control is not None and stream_id != self._control:
            return
        buf = self._buffers.setdefault(stream_id, bytearray())
        buf += data
        if self._control is None:
            try:
                kind = Buffer(data=bytes(buf[:8])).pull_uint_var()
            except BufferReadError:
                return
            if kind != 0x00:  # not the control stream (QPACK streams, push, ...)
                self._buffers.pop(stream_id, None)
                return
            self._control = stream_id
            del buf[:1]
        while True:
            reader = Buffer(data=bytes(buf))
            try:
                frame_type = reader.pull_uint_var()
                length = reader.pull_uint_var()
                payload = reader.pull_bytes(length)
            except BufferReadError:
                return
            del buf[: reader.tell()]
            if frame_type == FrameType.GOAWAY:
                sid = Buffer(data=payload).pull_uint_var()
                if self.goaway_stream_id is None or sid < self.goaway_stream_id:
                    self.goaway_stream_id = sid


class H3Backend:
    """Sans-IO HTTP/3 client connection with per-stream relay state."""

    def __init__(
        self,
        configuration: QuicConfiguration,
        *,
        max_streams: int = 1000,
        stream_window: int = 256 * 1024,
        slow_client_grace: float = 10.0,
    ) -> None:
        self.quic = QuicConnection(configuration=configuration)
        self.h3 = H3Connection(self.quic)
        self.control = ControlStreamWatcher()
        self.max_streams = max_streams
        self.stream_window = stream_window
        self.credit = CreditCap(stream_window, slow_client_grace)
        self.streams: dict[int, StreamState] = {}
        self._sent_end: set[int] = set()
        self._send_stopped: set[int] = set()  # the peer sent STOP_SENDING: drop body bytes
        self.handshake_done = False
        self.closed = False
        self.close_reason = ""
        self.goaway_last_stream_id: int | None = None
        self.goaway_error: int | None = None
        self.resets_received = 0
        self.refused_received = 0
        self.slow_client_resets = 0
        self._ping_uid = 0
        self._now = 0.0  # the time of the datagram or timer being processed

    # --- lifecycle ---------------------------------------------------------------------

    def connect(self, addr: tuple[str, int], now: float) -> None:
        self.quic.connect(addr, now=now)

    @property
    def settings_received(self) -> bool:
        return self.handshake_done and self.h3.received_settings is not None

    @property
    def enable_connect_protocol(self) -> bool:
        settings = self.h3.received_settings or {}
        return bool(settings.get(Setting.ENABLE_CONNECT_PROTOCOL, 0))

    @property
    def draining(self) -> bool:
        return self.closed or self.goaway_last_stream_id is not None

    def stream_limit(self) -> int:
        return self.max_streams

    def free_streams(self) -> int:
        if self.draining or not self.settings_received:
            return 0
        opened = self.quic.get_next_available_stream_id() // 4
        peer_left = self.quic._remote_max_streams_bidi - opened  # cumulative (RFC 9000 §4.6)
        return max(0, min(self.max_streams - len(self.streams), peer_left))

    # --- actions -----------------------------------------------------------------------

    def open_stream(self, headers: list[Header], end_stream: bool) -> StreamState:
        sid = self.quic.get_next_available_stream_id()
        self.h3.send_headers(sid, headers, end_stream=end_stream)
        st = StreamState(sid)
        self.streams[sid] = st
        if end_stream:
            self._sent_end.add(sid)
        return st

    def send_window(self, stream_id: int) -> int:
        stream = self.quic._streams.get(stream_id)
        if stream_id in self._send_stopped:
            return _MAX_UNSENT  # whatever is sent is dropped: never wait for credit
        if stream is None or stream_id not in self.streams:
            return 0
        sender = stream.sender
        window = stream.max_stream_data_remote - sender._buffer_stop - _FRAME_SLACK
        unsent = sender._buffer_stop - sender.highest_offset
        return max(0, min(window, _MAX_UNSENT - unsent))

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        if stream_id in self._send_stopped or stream_id not in self.streams:
            return  # stopped by the peer, or already reset: the bytes have nowhere to go
        self.h3.send_data(stream_id, data, end_stream)
        if end_stream:
            self._sent_end.add(stream_id)
            self._maybe_forget(stream_id)

    def end_stream(self, stream_id: int, trailers: list[Header] | None = None) -> None:
        if stream_id in self._send_stopped or stream_id not in self.streams:
            return
        if trailers:
            self.h3.send_headers(stream_id, trailers, end_stream=True)
        else:
            self.h3.send_data(stream_id, b"", True)
        self._sent_end.add(stream_id)
        self._maybe_forget(stream_id)

    def reset_stream(self, stream_id: int, code: int = REQUEST_CANCELLED) -> None:
        st = self.streams.pop(stream_id, None)
        self._sent_end.discard(stream_id)
        self._send_stopped.discard(stream_id)
        self.credit.forget(stream_id)
        if not self.closed:
            for stop in (self.quic.reset_stream, self.quic.stop_stream):
                try:
                    stop(stream_id, code)
                except (ValueError, AssertionError):
                    pass  # that direction is already finished
        if st is not None:
            st.chunks.clear()

    def discard(self, st: StreamState) -> None:
        st.chunks.clear()
        self.credit.forget(st.stream_id)

    def consumed(self, stream_id: int, flow_length: int) -> None:
        """Nothing to acknowledge: aioquic grows QUIC windows on arrival (see CreditCap)."""

    def ping(self) -> None:
        self._ping_uid += 1
        self.quic.send_ping(self._ping_uid)

    def close(self, code: int = ErrorCode.H3_NO_ERROR) -> None:
        if not self.closed:
            self.quic.close(error_code=code)
            self._terminate("closed by the proxy")

    def abort(self, reason: str) -> Update:
        up = Update()
        if not self.closed:
            self._terminate(reason, up)
        return up

    # --- input -------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        return self.quic.get_timer()

    def handle_timer(self, now: float) -> Update:
        self.quic.handle_timer(now)
        return self._process(now)

    def receive_datagrams(
        self, datagrams: list[bytes], addr: tuple[str, int], now: float
    ) -> Update:
        """Several datagrams at once: their events are processed in one pass, in order (a
        GOAWAY read before a close in the same batch is applied first, as one at a time)."""
        quic = self.quic
        for data in datagrams:
            quic.receive_datagram(data, addr, now)
        timer = quic.get_timer()  # one that fell due while datagrams kept arriving
        if timer is not None and timer <= now:
            quic.handle_timer(now)
        return self._process(now)

    def datagrams_to_send(self, now: float) -> list[bytes]:
        return [data for data, _ in self.quic.datagrams_to_send(now)]

    def _process(self, now: float) -> Update:
        up = Update(window_opened=True)  # MAX_STREAM_DATA has no event: let senders re-check
        self._now = now
        streams = self.streams
        while (ev := self.quic.next_event()) is not None:
            if isinstance(ev, qe.HandshakeCompleted):
                self.handshake_done = True
                up.capacity_changed = True
            elif isinstance(ev, qe.ConnectionTerminated):
                why = ev.reason_phrase or f"error {ev.error_code:#x}"
                self._terminate(f"QUIC connection closed ({why})", up)
            elif isinstance(ev, qe.StreamReset):
                st = streams.pop(ev.stream_id, None)
                self.resets_received += 1
                if ev.error_code == REQUEST_REJECTED and st is not None:
                    self.refused_received += 1
                if st is not None:
                    st.reset_code = ev.error_code
                    st.refused = ev.error_code == REQUEST_REJECTED and st.headers is None
                    st.error = f"backend reset the stream (HTTP/3 error {ev.error_code:#x})"
                    up.streams.append(st)
                    up.capacity_changed = True
            elif isinstance(ev, qe.StopSendingReceived):
                self._stop_sending(ev.stream_id, ev.error_code, up)
            elif isinstance(ev, qe.PingAcknowledged):
                up.ping_acked = True
            elif isinstance(ev, qe.StreamDataReceived):
                self.control.feed(ev.stream_id, ev.data)
                goaway = self.control.goaway_stream_id
                if goaway is not None and goaway != self.goaway_last_stream_id:
                    self._goaway(goaway, up)  # now: a close later in this turn must see it
            for h in self.h3.handle_event(ev):
                self._h3_event(h, up)
        if self.settings_received:
            up.capacity_changed = True
        for sid in self.credit.overdue(now):
            st = streams.get(sid)
            self.slow_client_resets += 1
            self.reset_stream(sid)
            if st is not None:
                st.reset_code = REQUEST_CANCELLED
                st.error = "client too slow: response buffer over its cap for too long"
                up.streams.append(st)
        return up

    def _h3_event(self, ev: h3e.H3Event, up: Update) -> None:
        st = self.streams.get(getattr(ev, "stream_id", -1))
        if st is None:
            return
        if isinstance(ev, h3e.HeadersReceived):
            status = next((v for k, v in ev.headers if k == b":status"), b"")
            if st.headers is None:
                if status[:1] != b"1":  # interim responses are not relayed
                    st.headers = list(ev.headers)
            else:
                st.trailers = list(ev.headers)
        elif isinstance(ev, h3e.DataReceived):
            if ev.data:
                st.chunks.append((ev.data, len(ev.data)))
                self.credit.observe(st.stream_id, sum(n for _, n in st.chunks), self._now)
        else:
            return
        if ev.stream_ended:
            st.ended = True
            self._maybe_forget(st.stream_id)
            up.capacity_changed = True
        up.streams.append(st)

    def _stop_sending(self, sid: int, code: int, up: Update) -> None:
        """The peer wants no more request body (aioquic has reset our sending side)."""
        st = self.streams.get(sid)
        if st is None:
            return
        if code == REQUEST_REJECTED and st.headers is None:
            self.refused_received += 1
            self.reset_stream(sid, REQUEST_REJECTED)  # it will not answer: stop receiving too
            st.reset_code = REQUEST_REJECTED
            st.refused = True
            st.error = "backend rejected the stream (HTTP/3 STOP_SENDING)"
            up.capacity_changed = True
        else:
            self._send_stopped.add(sid)
            self._sent_end.add(sid)
            self._maybe_forget(sid)
        up.streams.append(st)

    def _goaway(self, last: int, up: Update) -> None:
        """RFC 9114 §5.2: streams with an id ≥ ``last`` were not and will not be processed.

        A stream above the id that already has its response head contradicts the GOAWAY (a
        backend that chose the id from the streams it finished, not those it began): it is
        being answered, so it is left to finish rather than cut — and never replayed."""
        self.goaway_last_stream_id = last
        up.goaway = True
        up.capacity_changed = True
        for sid, st in list(self.streams.items()):
            if sid >= last and st.headers is None:
                self.reset_stream(sid, REQUEST_REJECTED)
                st.reset_code = REQUEST_REJECTED
                st.refused = True
                st.error = "backend sent GOAWAY before processing the stream"
                up.streams.append(st)

    def _never_sent(self, stream_id: int) -> bool:
        """Not one byte of the stream was ever put in a packet: the peer cannot have it."""
        stream = self.quic._streams.get(stream_id)
        return stream is not None and stream.sender.highest_offset == 0

    def _terminate(self, reason: str, up: Update | None = None) -> None:
        self.closed = True
        self.close_reason = reason
        # A close with no GOAWAY proves nothing of what was sent; what never left did not
        # reach the backend.
        fail_streams(
            self.streams,
            ErrorCode.H3_INTERNAL_ERROR,
            reason,
            up,
            refused=lambda st: st.headers is None and self._never_sent(st.stream_id),
        )

    def _maybe_forget(self, stream_id: int) -> None:
        st = self.streams.get(stream_id)
        if st is not None and st.ended and stream_id in self._sent_end:
            del self.streams[stream_id]
            self._sent_end.discard(stream_id)
            self._send_stopped.discard(stream_id)
            self.credit.forget(stream_id)


__all__ = ["H3Backend"]
