"""Differential harness: muxproxy's HTTP/2 server codec against h2's server role.

Both servers get the same client byte stream.  After each feed both are reduced to an
:class:`Observation`: is the connection alive, and per stream the request head, body,
trailers, END_STREAM, the client's RST_STREAM, and the RST_STREAM the server sent (a stream
error).  The two must be equal, or differ in one of the ways listed in ``KNOWN`` below, each
with the RFC section that makes muxproxy's answer the right one.

The server side acts too (``respond``, ``reset``), the way ``io/h2stream.py`` does: a
response that ends before the request is followed by RST_STREAM(NO_ERROR) on both (RFC 9113
§8.1), so the streams close the same way and the frames that follow are judged alike.

What is normalised before comparing (the same meaning, told differently):

* The request head: h2 gives the raw field list; muxproxy splits the pseudo-headers out and
  folds Host into the authority.  Both are reduced to (method, scheme, authority, path,
  protocol, regular fields without Host).
* A GOAWAY with an error code from the client: h2 reports it and stops later, muxproxy stops
  reading at once; both count as a dead connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from muxproxy.core.frontend_h2 import (
    Body,
    Cancelled,
    Closing,
    End,
    H2Limits,
    H2Server,
    Request,
    StreamGone,
)

Header = tuple[bytes, bytes]

WINDOW = 20_000  # the stream receive window both announce (small enough to overrun)
LIMITS = H2Limits(max_concurrent_streams=100, initial_window=WINDOW, max_header_list_size=16384)
STREAMS = (1, 3, 5, 7, 9, 2**31 - 1)

# Request heads (the state machine's variants) muxproxy refuses as something it does not serve.
OFFERED_NOT = tuple(
    f"HEADERS[{v}]" for v in ("ftp-scheme", "relative-path", "empty-path", "connect-ws")
)

# Differences found and kept, by the label :func:`classify` gives them.
KNOWN = {
    "malformed-scope": (
        "A malformed request (a field name with upper case or a forbidden character, a value "
        "with CR/LF/NUL or surrounding whitespace, a connection-specific field, te other than "
        "trailers, a pseudo-header missing, repeated, unknown or after a regular field, Host "
        "differing from :authority, content-length not matching the DATA, trailers without "
        "END_STREAM or with a pseudo-header): muxproxy resets that stream alone "
        "(RST_STREAM PROTOCOL_ERROR), h2 fails the whole connection. RFC 9113 §8.1.1: a "
        "malformed request is a stream error (§5.4.2); the client's other streams live on."
    ),
    "not-offered": (
        "Requests h2 accepts and muxproxy refuses with a stream error as something it does "
        "not serve: a :scheme other than http/https (§8.3.1: the proxy forwards only those), "
        "a :path not in origin form other than OPTIONS * (§8.3.1: 'MUST NOT be empty for "
        "http or https "
        "URIs'), :protocol when SETTINGS_ENABLE_CONNECT_PROTOCOL was not announced (RFC 8441 "
        "§4: 'MUST NOT' be sent then)."
    ),
    "lenient-h2": (
        "h2 accepts what RFC 9113 forbids and muxproxy refuses: RST_STREAM, WINDOW_UPDATE or "
        "DATA on an idle stream (§5.1: 'MUST be treated as a connection error of type "
        "PROTOCOL_ERROR', §6.4), a first frame after the "
        "preface other than SETTINGS (§3.4: a connection error, PROTOCOL_ERROR), a stream "
        "depending on itself in HEADERS or PRIORITY (§5.3.1: a stream error), a PRIORITY "
        "frame of the wrong size (§6.3: a stream error, FRAME_SIZE_ERROR), "
        "settings out of range (§6.5.2: ENABLE_PUSH other than 0 or 1, MAX_FRAME_SIZE outside "
        "2^14..2^24-1, INITIAL_WINDOW_SIZE above 2^31-1; RFC 8441 §3: "
        "SETTINGS_ENABLE_CONNECT_PROTOCOL other than 0 or 1), a "
        "PUSH_PROMISE from a client (§8.4: 'servers MUST treat the receipt of a PUSH_PROMISE "
        "frame as a connection error of type PROTOCOL_ERROR')."
    ),
    "closed-stream-frames": (
        "Frames on a stream the server already reset (also by the RST_STREAM(NO_ERROR) that "
        "follows a response ending before the request, §8.1): muxproxy ignores them (and "
        "gives DATA's credit back), h2 answers RST_STREAM(STREAM_CLOSED) or fails the "
        "connection. RFC "
        "9113 §5.1 (closed): 'An endpoint MUST ignore frames that it receives on closed "
        "streams after it has sent a RST_STREAM frame'."
    ),
    "content-length-end": (
        "A content-length the end of the stream contradicts: END_STREAM on a request head "
        "with content-length above 0, or trailers ending a body of another length. muxproxy "
        "resets the stream (RFC 9113 §8.1.1: malformed, 'the value of a content-length header "
        "field does not equal the sum of the DATA frame payload lengths'); h2 only checks "
        "content-length when DATA ends the stream."
    ),
    "priority-scope": (
        "A PRIORITY frame of the wrong size, or a stream depending on itself (PRIORITY frame "
        "or HEADERS flag): muxproxy resets that stream (nothing at all on an idle stream, "
        "which has nothing to reset, §6.4), h2 fails the connection. RFC 9113 §6.3: 'MUST be "
        "treated as a stream error of type FRAME_SIZE_ERROR'; RFC 7540 §5.3.1, kept by RFC "
        "9113 §5.3.2's 'ignore' of the signal: self-dependency is a stream error."
    ),
    "goaway-drain": (
        "After the client's GOAWAY with NO_ERROR, h2 moves its connection to CLOSED and "
        "refuses every further frame; muxproxy keeps reading the streams in flight to their "
        "end. RFC 9113 §6.8: the streams at or below last_stream_id 'might still complete "
        "successfully', and the connection stays usable for them."
    ),
    "abuse-limits": (
        "muxproxy's own limits ([listeners.limits]): floods of SETTINGS, PING, PRIORITY, "
        "WINDOW_UPDATE, RST_STREAM or empty frames per second, CONTINUATION frames or bytes "
        "per header block: GOAWAY(ENHANCE_YOUR_CALM) (graceful after a first flood of frames "
        "the connection can do without; a new stream after it ends the connection), where h2 "
        "has no such limit. RFC 9113 "
        "§10.5: 'An endpoint MAY treat activity that is suspicious as a connection error of "
        "type ENHANCE_YOUR_CALM'."
    ),
    "strict-h2": (
        "h2 refuses what muxproxy accepts on purpose: an ALTSVC frame (type 0xa) whose payload "
        "it cannot parse; muxproxy ignores frame types it does not use (RFC 9113 §4.1, §5.5), "
        "and RFC 7838 §4 says a server ignores ALTSVC from a client."
    ),
    "half-closed-scope": (
        "DATA or HEADERS after the client's END_STREAM on a stream still open our way "
        "(half-closed remote): muxproxy resets that stream (RFC 9113 §5.1: 'MUST respond with "
        "a stream error of type STREAM_CLOSED'), h2 fails the connection."
    ),
    "window-zero-scope": (
        "WINDOW_UPDATE of 0 on a stream: muxproxy resets the stream (ignores it on a closed "
        "stream, like every WINDOW_UPDATE there, §5.1), h2 fails the connection. RFC 9113 "
        "§6.9: 'a stream error of type PROTOCOL_ERROR' unless on the connection."
    ),
}


@dataclass
class StreamView:
    head: tuple[object, ...] | None = None
    body: bytes = b""
    trailers: tuple[Header, ...] | None = None
    ended: bool = False  # the client's END_STREAM was delivered
    reset: int | None = None  # the client's RST_STREAM code
    failed: int | None = None  # the code of a RST_STREAM the server sent (a stream error)


@dataclass
class Observation:
    alive: bool = True
    streams: dict[int, StreamView] = field(default_factory=dict)
    error: str = ""


def _norm_head(
    method: bytes | None,
    scheme: bytes | None,
    authority: bytes | None,
    path: bytes | None,
    protocol: bytes | None,
    regular: list[Header],
) -> tuple[object, ...]:
    # (a plain CONNECT has neither :scheme nor :path: muxproxy says b"", h2 nothing)
    return (method, scheme or b"", authority, path or b"", protocol, tuple(regular))


def _rsts(data: bytes) -> list[tuple[int, int]]:
    """The RST_STREAM frames (stream, code) in a server's output."""
    out = []
    pos = 0
    while len(data) - pos >= 9:
        n = int.from_bytes(data[pos : pos + 3], "big")
        if data[pos + 3] == 3 and n == 4:
            sid = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            out.append((sid, int.from_bytes(data[pos + 9 : pos + 13], "big")))
        pos += 9 + n
    return out


class MuxSide:
    def __init__(self) -> None:
        self.core = H2Server(LIMITS)
        self.core.initiate()
        self.core.data_to_send()
        self.views = {sid: StreamView() for sid in STREAMS}
        self.alive = True
        self.error = ""

    def view(self, sid: int) -> StreamView | None:
        return self.views.get(sid)

    def feed(self, data: bytes) -> Observation:
        core = self.core
        if self.alive:
            for ev in core.receive_data(data, 0.0):
                self._event(ev)
            self._output()
        return Observation(self.alive, self.views, self.error)

    def _output(self) -> None:
        for sid, code in _rsts(self.core.data_to_send()):
            v = self.view(sid)
            if v is not None and code != 0:
                v.failed = code

    def _event(self, ev: object) -> None:
        core = self.core
        if type(ev) is Closing:
            if not ev.graceful:
                self.alive = False
                self.error = f"{ev.code}: {ev.reason}"
            return
        v = self.view(getattr(ev, "stream_id", 0))
        if type(ev) is Body:
            core.acknowledge(ev.stream_id, ev.flow)
            if v is not None:
                v.body += ev.data
        if v is None:
            return
        if type(ev) is Request:
            v.head = _norm_head(ev.method, ev.scheme, ev.authority, ev.path, ev.protocol,
                                ev.headers)  # fmt: skip
            v.ended = v.ended or ev.end_stream
        elif type(ev) is End:
            v.ended = True
            v.trailers = tuple(ev.trailers) if ev.trailers is not None else None
        elif type(ev) is Cancelled:
            if ev.by_client:
                v.reset = ev.code
            else:
                v.failed = ev.code

    def respond(self, sid: int) -> None:
        core = self.core
        core.send_head(sid, 200, [(b"content-type", b"text/plain")], end=False)
        core.send_data(sid, b"0123456789", end=True)
        self._output()

    def reset(self, sid: int) -> None:
        self.core.reset(sid, 8)
        self.core.data_to_send()

    def can_send(self, sid: int) -> bool:
        return sid in self.core.streams and self.core.send_window(sid) >= 10


class H2Side:
    def __init__(self) -> None:
        cfg = h2.config.H2Configuration(
            client_side=False, header_encoding=None, normalize_inbound_headers=False
        )
        c = self.conn = h2.connection.H2Connection(cfg)
        S = h2.settings.SettingCodes
        c.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                S.MAX_CONCURRENT_STREAMS: LIMITS.max_concurrent_streams,
                S.INITIAL_WINDOW_SIZE: WINDOW,
                S.MAX_HEADER_LIST_SIZE: LIMITS.max_header_list_size,
            },
        )
        c.decoder.max_header_list_size = LIMITS.max_header_list_size
        c.initiate_connection()
        c.increment_flow_control_window(LIMITS.connection_window - 65535)
        c.data_to_send()
        self.views = {sid: StreamView() for sid in STREAMS}
        self.alive = True
        self.error = ""

    def feed(self, data: bytes) -> Observation:
        if self.alive:
            try:
                events = self.conn.receive_data(data)
            except h2.exceptions.ProtocolError as exc:  # (and its subclasses)
                self.alive = False
                self.error = f"{type(exc).__name__}: {exc}"
                events = []
            for ev in events:
                self._event(ev)
            self._output()
        return Observation(self.alive, self.views, self.error)

    def _output(self) -> None:
        for sid, code in _rsts(self.conn.data_to_send()):
            v = self.views.get(sid)
            if v is not None and code != 0:
                v.failed = code

    def _event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.ConnectionTerminated):
            if ev.error_code:
                self.alive = False
                self.error = f"GOAWAY {ev.error_code}"
            return
        sid = getattr(ev, "stream_id", None)
        if isinstance(ev, h2.events.DataReceived):
            self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        v = self.views.get(sid)  # type: ignore[arg-type]
        if v is None:
            return
        if isinstance(ev, h2.events.RequestReceived):
            fields = list(ev.headers)
            pseudo = {n: val for n, val in fields if n[:1] == b":"}
            regular = [(n, val) for n, val in fields if n[:1] != b":"]
            hosts = [val for n, val in regular if n == b"host"]
            authority = pseudo.get(b":authority") or (hosts[0] if hosts else None)
            v.head = _norm_head(
                pseudo.get(b":method"),
                pseudo.get(b":scheme"),
                authority,
                pseudo.get(b":path"),
                pseudo.get(b":protocol"),
                [(n, val) for n, val in regular if n != b"host"],
            )
        elif isinstance(ev, h2.events.DataReceived):
            v.body += ev.data
        elif isinstance(ev, h2.events.TrailersReceived):
            v.trailers = tuple(ev.headers)
        elif isinstance(ev, h2.events.StreamEnded):
            v.ended = True
        elif isinstance(ev, h2.events.StreamReset):
            if ev.remote_reset:
                v.reset = ev.error_code
            else:
                v.failed = ev.error_code

    def respond(self, sid: int) -> None:
        c = self.conn
        c.send_headers(sid, [(b":status", b"200"), (b"content-type", b"text/plain")])
        c.send_data(sid, b"0123456789", end_stream=True)
        stream = c.streams.get(sid)
        if stream is not None and not stream.closed:
            c.reset_stream(sid, 0)  # as muxproxy does after a response that ends first
        self._output()

    def reset(self, sid: int) -> None:
        self.conn.reset_stream(sid, 8)
        self.conn.data_to_send()

    def can_send(self, sid: int) -> bool:
        try:
            return bool(self.conn.local_flow_control_window(sid) >= 10)
        except h2.exceptions.ProtocolError:
            return False


def comparable(v: StreamView) -> tuple[object, ...]:
    return (v.head, v.body, v.trailers, v.ended, v.reset, v.failed)


def differences(mux: Observation, ref: Observation) -> list[str]:
    """What differs between the two observations ([] when they agree)."""
    if mux.alive != ref.alive:
        return [
            f"connection: muxproxy alive={mux.alive} ({mux.error}), h2 alive={ref.alive}"
            f" ({ref.error})"
        ]
    if not mux.alive:
        return []  # both failed the connection
    out = []
    for sid in STREAMS:
        a, b = comparable(mux.streams[sid]), comparable(ref.streams[sid])
        if a != b:
            out.append(f"stream {sid}: muxproxy {a!r:.300} h2 {b!r:.300}")
    return out


class Pair:
    """Both servers, fed in step."""

    def __init__(self) -> None:
        self.mux = MuxSide()
        self.ref = H2Side()

    def feed(self, data: bytes) -> tuple[list[str], Observation, Observation]:
        m = self.mux.feed(data)
        r = self.ref.feed(data)
        return differences(m, r), m, r

    def respond(self, sid: int) -> bool:
        """Both answer ``sid`` (head, 10 bytes, END_STREAM) if both can; True if they did."""
        if not (self.mux.can_send(sid) and self.ref.can_send(sid)):
            return False
        try:
            self.ref.respond(sid)
        except h2.exceptions.ProtocolError:
            return False
        try:
            self.mux.respond(sid)
        except StreamGone:
            return False
        return True

    def reset(self, sid: int) -> bool:
        if sid not in self.mux.core.streams:
            return False
        try:
            self.ref.reset(sid)
        except h2.exceptions.ProtocolError:
            return False
        self.mux.reset(sid)
        return True


def rv_reset(ref: Observation, sid: int) -> bool:
    v = ref.streams.get(sid)
    return v is not None and v.reset is not None


def classify(what: str, mux: Observation, ref: Observation, history: dict[int, str]) -> str:
    """The KNOWN label of a difference, or a description of an unknown one.  ``history``
    says per stream how the server side closed it so far ("reset", "responded")."""
    sid = int(what.rsplit(" ", 1)[1]) if what[-1:].isdigit() else 0
    closed = history.get(sid, "")
    mv = mux.streams.get(sid)
    if mux.alive and not ref.alive:
        if what.startswith("type 10") and ref.error.startswith("FrameDataMissingError"):
            return "strict-h2"
        if (what.startswith("PRIORITY") and ref.error.startswith("FrameDataMissingError")) or (
            "may not depend on itself" in ref.error
        ):
            return "priority-scope"
        if what.startswith("WINDOW_UPDATE") and "non-compliant data" in ref.error and sid:
            return "window-zero-scope"
        if "in state ConnectionState.CLOSED" in ref.error:
            return "goaway-drain"
        if closed == "reset":
            return "closed-stream-frames"
        if mv is not None and mv.failed is not None:
            if "WINDOW_UPDATE" in what:
                return "window-zero-scope"
            if mv.failed == 5 and mv.ended and not rv_reset(ref, sid):  # STREAM_CLOSED
                return "half-closed-scope"
            return "malformed-scope"
        if "ENABLE_CONNECT_PROTOCOL" in ref.error or "Settings" in ref.error:
            return "lenient-h2"
    if not mux.alive and ref.alive:
        if mux.error.startswith("11: ") and any(
            k in mux.error
            for k in ("flood", "CONTINUATION", "header block over", "new stream after GOAWAY")
        ):
            return "abuse-limits"
        if any(
            k in mux.error
            for k in (
                "§3.4", "ENABLE_CONNECT_PROTOCOL", "ENABLE_PUSH", "MAX_FRAME_SIZE",
                "INITIAL_WINDOW_SIZE", "PUSH_PROMISE", "on idle stream",
            )
        ):
            return "lenient-h2"
    if mux.alive and ref.alive and mv is not None:
        rv = ref.streams[sid]
        if closed == "reset" and mv.failed == rv.failed:
            return "closed-stream-frames"
        if mv.failed is not None and rv.failed is None:
            if "PRIORITY" in what or "self-dependent" in what:
                return "lenient-h2"
            if what.startswith("trailers") or "+content-length" in what:
                return "content-length-end"
            if what.startswith(OFFERED_NOT):
                return "not-offered"
        if closed and rv.failed is not None and mv.failed is None and mv.head == rv.head:
            # (reset by us, or by our RST_STREAM(NO_ERROR) after a response that ended first)
            return "closed-stream-frames"
    return f"unknown after {what}: mux={mux.error!r} h2={ref.error!r}"
