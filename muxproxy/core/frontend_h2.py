"""HTTP/2 from clients (RFC 9113), server side: the ``h2`` state machine behind muxproxy's limits.

Theory of operation.  Bytes from the client go first through
:class:`~muxproxy.core.h2guard.FrameGuard`, which stops the connection with
GOAWAY(ENHANCE_YOUR_CALM) the moment a flood limit is passed, before ``h2`` spends any work on
the frame.  After a first flood of frames the connection can do without (a per-second rate)
the GOAWAY is graceful (:meth:`H2Server._calm`): the frame is dropped, the streams in flight
finish (bounded by ``calm_timeout`` in the I/O layer), and a new stream or another limit
passed then closes the connection at once.  Complete frames are then fed to ``h2`` one at
a time, so a protocol error in one frame never loses the events of the frames before it.
``h2``'s events become muxproxy's own (:class:`Request`, :class:`Body`, :class:`End`,
:class:`Cancelled`, :class:`WindowOpen`, :class:`Closing`) after muxproxy's own checks of the
request head (:func:`~muxproxy.core.h2guard.check_request`).  A malformed request is a
*stream* error (RST_STREAM PROTOCOL_ERROR), never the other streams' problem (except a bad
``content-length``, which ``h2`` makes a connection error).

Every limit is enforced here, not assumed from the library:

* concurrency: ``max_concurrent_streams`` is announced in a SETTINGS frame of our own (``h2``
  is not told, so it never turns an excess into a connection error); a request beyond it is
  refused with RST_STREAM(REFUSED_STREAM), never queued; past ``max(100, limit)`` refusals the
  connection gets GOAWAY(ENHANCE_YOUR_CALM), as nginx does;
* rapid reset (CVE-2023-44487): more than ``max_resets_per_second`` RST_STREAM frames from the
  client in a second → GOAWAY(ENHANCE_YOUR_CALM).  A stream opened and reset within the same
  read is never handed on at all, so it never reaches a backend;
* CONTINUATION floods (CVE-2024-27316, CVE-2024-28182): at most ``max_continuation_frames``
  per header block and ``max_header_list_size`` encoded bytes; the decoded size is capped too
  (the HPACK bomb) by ``h2``'s decoder limit, which we set before the first frame;
* floods of SETTINGS, PING, PRIORITY (and PRIORITY_UPDATE), WINDOW_UPDATE and empty frames
  (DATA, HEADERS, CONTINUATION without payload or END_STREAM) per second.

Flow control: the stream receive window is ``initial_window``; the connection window is
``max(initial_window, min(streams × initial_window, 1 MiB))`` (Envoy's edge guidance), so a
client can make the proxy hold at most that much of its request bodies.  Received DATA is
acknowledged (WINDOW_UPDATE) only through :meth:`H2Server.acknowledge`, called by the I/O
layer once the bytes went on towards the backend.  Responses are sent only within the
client's windows (:meth:`H2Server.send_data` returns what fitted); :class:`WindowOpen` says
when to try again.  Priority signals are ignored (RFC 9113 §5.3.2); server push is off.

Draining (:meth:`H2Server.drain`) writes GOAWAY(NO_ERROR) with the last stream id seen; the
streams below it finish, newer ones are refused.  (``h2``'s own ``close_connection`` would
forbid sending on the streams still in flight, so the frame is written here.)
"""

from __future__ import annotations

from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from .h2guard import FrameGuard, H2Limits, Malformed, Request, check_request, field_ok
from .h2wire import (
    CANCEL,
    ENHANCE_YOUR_CALM,
    FRAME_SIZE_ERROR,
    GOAWAY,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME_SIZE,
    NO_ERROR,
    PROTOCOL_ERROR,
    REFUSED,
    SETTING,
    SETTINGS,
    U32x2,
    frame,
)
from .headers import Header

_GOAWAY_TYPE = bytes([GOAWAY])

__all__ = [
    "Body",
    "Cancelled",
    "Closing",
    "End",
    "H2Limits",
    "H2Server",
    "Request",
    "WindowOpen",
]


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
    """The client reset the stream (or it was refused/reset as malformed by us)."""

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


class H2Server:
    """One client connection's HTTP/2 state.  See the module docstring."""

    def __init__(self, limits: H2Limits | None = None, *, connect_protocol: bool = False) -> None:
        limits = limits or H2Limits()
        self.limits = limits
        self.connect_protocol = connect_protocol
        self.guard = FrameGuard(limits)
        cfg = h2.config.H2Configuration(
            # Field checks are muxproxy's (check_request): a bad field is a stream error here,
            # where h2 would end the whole connection.
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
        )
        conn = h2.connection.H2Connection(cfg)
        S = h2.settings.SettingCodes
        initial = {
            S.ENABLE_PUSH: 0,
            S.INITIAL_WINDOW_SIZE: limits.initial_window,
            S.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
            S.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
        }
        if connect_protocol:
            initial[S.ENABLE_CONNECT_PROTOCOL] = 1
        conn.local_settings = h2.settings.Settings(client=False, initial_values=initial)
        # The HPACK bomb: cap decoded sizes from the first frame, before the ACK applies it.
        conn.decoder.max_header_list_size = limits.max_header_list_size
        self.conn = conn
        self.active: set[int] = set()  # streams handed on and not yet finished
        self.highest = 0  # highest client stream id seen
        self.refused = 0
        self.draining_at: int | None = None  # last_stream_id of our GOAWAY, once sent
        self.closed = False  # a fatal GOAWAY was sent or received: input is ignored
        self.peer_goaway = False  # the client will open no more streams
        self.calm = False  # GOAWAY(ENHANCE_YOUR_CALM) sent: in-flight streams may finish
        self._trailers: dict[int, list[Header]] = {}
        self._extra = b""

    # --- start, input -----------------------------------------------------------------

    def initiate(self) -> None:
        """Queue the server preface: h2's SETTINGS, ours (MAX_CONCURRENT_STREAMS), and the
        connection window."""
        self.conn.initiate_connection()
        own = SETTING.pack(MAX_CONCURRENT_STREAMS, self.limits.max_concurrent_streams)
        self._extra = frame(SETTINGS, 0, 0, own)
        grow = self.limits.connection_window - 65535
        if grow > 0:
            self.conn.increment_flow_control_window(grow)

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Feed bytes from the client; events out.  After a :class:`Closing` that is not
        graceful, further input is ignored."""
        if self.closed:
            return []
        frames, why = self.guard.feed(data, now)
        events: list[Event] = []
        for f in frames:
            if f[3:4] == _GOAWAY_TYPE and len(f) >= 17:
                # Read here, never by h2, which would refuse to send on the streams in flight.
                events.append(self._peer_goaway(int.from_bytes(f[13:17], "big")))
                if self.closed:
                    return events
                continue
            try:
                raw = self.conn.receive_data(f)
            except h2.exceptions.ProtocolError as exc:
                code = int(getattr(exc, "error_code", PROTOCOL_ERROR) or PROTOCOL_ERROR)
                events.append(self._fail(code, str(exc) or type(exc).__name__, sent=True))
                return events
            self._translate(raw, events)
            if self.closed:
                return events
        if why is not None and self.guard.recoverable and not self.calm:
            # A first flood: GOAWAY(ENHANCE_YOUR_CALM); what followed the frame dropped goes on.
            events.append(self._calm(why))
            events += self.receive_data(b"", now)
        elif why is not None:
            code = FRAME_SIZE_ERROR if why.startswith("frame of") else ENHANCE_YOUR_CALM
            if why.startswith("not an HTTP/2"):
                code = PROTOCOL_ERROR
            events.append(self._fail(code, why, sent=False))
        # A request opened and reset by the client within this same read never reaches a
        # backend: the rapid-reset pattern costs the proxy nothing beyond parsing.
        gone = {e.stream_id for e in events if type(e) is Cancelled and e.by_client}
        if gone:
            gone &= {e.stream_id for e in events if type(e) is Request}
            if gone:
                events = [e for e in events if getattr(e, "stream_id", 0) not in gone]
        return events

    def _translate(self, raw: list[h2.events.Event], out: list[Event]) -> None:
        E = h2.events
        active = self.active
        for ev in raw:
            if isinstance(ev, E.RequestReceived):
                self._request(ev, out)
            elif isinstance(ev, E.DataReceived):
                sid = ev.stream_id
                if sid in active:
                    out.append(Body(sid, ev.data, ev.flow_controlled_length))
                else:  # refused or reset by us: give the window back at once
                    self.acknowledge(sid, ev.flow_controlled_length)
            elif isinstance(ev, E.TrailersReceived):
                sid = ev.stream_id
                if sid in active:
                    trailers = list(ev.headers)
                    if any(n[:1] == b":" or not field_ok(n, v) for n, v in trailers):
                        self.reset(sid, PROTOCOL_ERROR)
                        out.append(Cancelled(sid, PROTOCOL_ERROR, False, "malformed trailers"))
                    else:
                        self._trailers[sid] = trailers
            elif isinstance(ev, E.StreamEnded):  # (after the DATA/HEADERS that carried it)
                sid = ev.stream_id
                if sid in active:
                    out.append(End(sid, self._trailers.pop(sid, None)))
            elif isinstance(ev, E.StreamReset):
                sid = ev.stream_id
                if ev.remote_reset and sid in active:
                    active.discard(sid)
                    self._trailers.pop(sid, None)
                    out.append(Cancelled(sid, ev.error_code or CANCEL))
            elif isinstance(ev, E.WindowUpdated):
                out.append(WindowOpen(ev.stream_id))
            elif (
                isinstance(ev, E.RemoteSettingsChanged)
                and h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings
            ):
                out.append(WindowOpen(0))
            # PING is answered by h2; SETTINGS ACKs, PRIORITY and unknown frames need nothing.

    def _request(self, ev: h2.events.RequestReceived, out: list[Event]) -> None:
        sid = ev.stream_id
        self.highest = max(self.highest, sid)
        if self.draining_at is not None and sid > self.draining_at:
            if self.calm:  # told to calm down, and opening streams: closed at once
                out.append(self._fail(ENHANCE_YOUR_CALM, "new stream after GOAWAY", sent=False))
                return
            self.conn.reset_stream(sid, REFUSED)
            return
        if len(self.active) >= self.limits.max_concurrent_streams:
            self.conn.reset_stream(sid, REFUSED)
            self.refused += 1
            out.append(Cancelled(sid, REFUSED, False, "over max_concurrent_streams"))
            if self.refused > max(100, self.limits.max_concurrent_streams) and not self.calm:
                out.append(self._calm("too many refused streams"))
            return
        try:
            req = check_request(
                sid, list(ev.headers), ev.stream_ended is not None, self.connect_protocol
            )
        except Malformed as exc:
            self.conn.reset_stream(sid, PROTOCOL_ERROR)
            out.append(Cancelled(sid, PROTOCOL_ERROR, False, str(exc)))
            return
        self.active.add(sid)
        out.append(req)

    def _peer_goaway(self, code: int) -> Closing:
        """The client will open no more streams; with NO_ERROR the ones in flight go on."""
        self.peer_goaway = True
        if code != NO_ERROR:
            self.closed = True
        return Closing(code, "client sent GOAWAY", graceful=code == NO_ERROR)

    # --- muxproxy's additions around the codec (kept apart for the codec's rewrite) --------

    def _calm(self, reason: str) -> Closing:
        """A flood limit was passed: GOAWAY(ENHANCE_YOUR_CALM) with the last stream id seen.
        The streams in flight finish (the I/O layer bounds them with ``calm_timeout``); a
        new stream or another limit passed after it closes the connection at once."""
        self.calm = True
        last = self.highest if self.draining_at is None else min(self.draining_at, self.highest)
        self.draining_at = last
        debug = reason[:64].encode()
        self._extra += frame(GOAWAY, 0, 0, U32x2.pack(last, ENHANCE_YOUR_CALM) + debug)
        return Closing(ENHANCE_YOUR_CALM, reason, graceful=True)

    def send_informational(self, stream_id: int, headers: list[Header]) -> None:
        """An interim response on ``stream_id``: ``headers`` start with ``:status`` 1xx
        (100 Continue, 103 Early Hints; never 101, RFC 9113 §8.6).  The stream stays open."""
        status = headers[0][1] if headers and headers[0][0] == b":status" else b""
        if len(status) != 3 or status[:1] != b"1" or status == b"101":
            raise ValueError(f"not an interim status: {status!r}")
        self.conn.send_headers(stream_id, headers)

    def _fail(self, code: int, reason: str, *, sent: bool) -> Closing:
        """Stop the connection with GOAWAY(code); ``sent`` when h2 already queued it."""
        self.closed = True
        if not sent:
            debug = reason[:64].encode()
            last = self.highest if self.draining_at is None else self.draining_at  # (§6.8)
            self._extra += frame(GOAWAY, 0, 0, U32x2.pack(last, code) + debug)
        return Closing(code, reason, graceful=False)

    # --- output -------------------------------------------------------------------------

    def send_head(self, sid: int, status: int, headers: list[Header], end: bool) -> None:
        self.conn.send_headers(sid, [(b":status", b"%d" % status), *headers], end_stream=end)
        if end:
            self._finish(sid)

    def send_window(self, sid: int) -> int:
        """How many body bytes may be sent on ``sid`` now: the smaller of the stream's and
        the connection's windows (0 if the stream is gone)."""
        try:
            return int(self.conn.local_flow_control_window(sid))
        except h2.exceptions.StreamClosedError:
            return 0

    def send_data(self, sid: int, data: bytes, end: bool = False) -> int:
        """Send as much of ``data`` as the windows allow; returns the bytes sent.  ``end`` is
        honoured only when all of it went."""
        sent = 0
        n = len(data)
        while sent < n:
            room = min(self.send_window(sid), n - sent, self.conn.max_outbound_frame_size)
            if room <= 0:
                return sent
            last = end and sent + room == n
            self.conn.send_data(sid, data[sent : sent + room], end_stream=last)
            sent += room
        if end and n == 0:
            self.conn.send_data(sid, b"", end_stream=True)
        if end:
            self._finish(sid)
        return sent

    def send_trailers(self, sid: int, trailers: list[Header]) -> None:
        self.conn.send_headers(sid, trailers, end_stream=True)
        self._finish(sid)

    def reset(self, sid: int, code: int = CANCEL) -> None:
        self.active.discard(sid)
        try:
            self.conn.reset_stream(sid, code)
        except h2.exceptions.StreamClosedError:
            pass

    def acknowledge(self, sid: int, n: int) -> None:
        """``n`` flow-controlled bytes of ``sid``'s request body went on: open the windows.
        (For a stream already closed only the connection window is given back.)"""
        if n and not self.closed:
            self.conn.acknowledge_received_data(n, sid)

    def _finish(self, sid: int) -> None:
        """Our side of ``sid`` ended.  If the client's request is still open (a response
        before the whole body), RFC 9113 §8.1 lets us stop it with RST_STREAM(NO_ERROR)."""
        self.active.discard(sid)
        stream = self.conn.streams.get(sid)
        if stream is not None and not stream.closed:
            try:
                self.conn.reset_stream(sid, NO_ERROR)
            except h2.exceptions.StreamClosedError:
                pass

    def drain(self) -> None:
        """Graceful GOAWAY: streams up to the last one seen finish, newer ones are refused."""
        if self.draining_at is None and not self.closed:
            self.draining_at = self.highest
            self._extra += frame(GOAWAY, 0, 0, U32x2.pack(self.highest, NO_ERROR))

    @property
    def idle(self) -> bool:
        return not self.active

    def data_to_send(self) -> bytes:
        out = self.conn.data_to_send()
        if self._extra:
            out, self._extra = out + self._extra, b""
        return out
