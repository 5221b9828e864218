"""Differential harness: muxproxy's HTTP/2 client codec against h2's client role.

Both clients open the same three requests (streams 1 and 3 ended, 5 still sending its body),
then are fed the same server byte stream.  After each feed both are reduced to an
:class:`Observation`: is the connection alive, and per stream its response head, body,
trailers, end and reset.  The two must be equal, or differ in one of the ways listed in
``KNOWN`` below, each with the RFC section that makes muxproxy's answer the right one.

What is normalised before comparing (the same meaning, told differently):

* 1xx heads: h2 reports them, muxproxy drops them (it never relays them); not compared.
* A stream muxproxy failed on its own (malformed response, RFC 9113 §8.1.1) is "failed"; h2
  has no stream-level verdict for a malformed message (see ``KNOWN``).
* GOAWAY: muxproxy fails the streams above last_stream_id at once (refused, replayable); h2
  keeps them open.  Streams above last_stream_id are "refused" on both sides from then on,
  and what a server still sends on them is not compared (RFC 9113 §6.8: never processed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from muxproxy.core.backend_h2 import H2Backend
from muxproxy.core.relay import StreamState

Header = tuple[bytes, bytes]

WINDOW = 65535
MAX_STREAMS = 100
REQ: list[Header] = [
    (b":method", b"GET"),
    (b":scheme", b"http"),
    (b":authority", b"a.test"),
    (b":path", b"/"),
]
POST: list[Header] = [(b":method", b"POST"), *REQ[1:]]
STREAMS = (1, 3, 5)

# Differences found and kept, by the label :func:`classify` gives them.
KNOWN = {
    "malformed-scope": (
        "A malformed response (bad field, pseudo-header, content-length mismatch, DATA before "
        "the head, trailers without END_STREAM, a 1xx with END_STREAM), a stream WINDOW_UPDATE "
        "of 0 (§6.9) or a PRIORITY of the wrong size (§6.3): muxproxy resets that stream "
        "alone, h2 fails the whole connection. RFC 9113 §8.1.1: a malformed response is a "
        "stream error; the other streams of a pooled connection belong to other clients."
    ),
    "stream-window-scope": (
        "A stream's window overrun or overflow: muxproxy resets the stream (FLOW_CONTROL_ERROR), "
        "h2 fails the connection. RFC 9113 §6.9.1 lets the receiver choose either, and "
        "§5.4.2 favours the narrower scope."
    ),
    "closed-stream-frames": (
        "Frames on a stream muxproxy already reset or finished: muxproxy ignores them (and "
        "returns DATA's credit), h2 answers STREAM_CLOSED or fails the connection. RFC 9113 "
        "§5.1 (closed: 'frames received after RST_STREAM ... MUST be ignored' for a while; "
        "§6.4 says the same after sending RST_STREAM)."
    ),
    "lenient-h2": (
        "h2 accepts what RFC 9113 forbids and muxproxy refuses: a 101 or a 1xx with END_STREAM "
        "(§8.1), a response without :status (§8.3.2), RST_STREAM or WINDOW_UPDATE on an idle "
        "stream (§5.1, §6.4: a connection error), SETTINGS out of range (§6.5.2: "
        "ENABLE_PUSH other than 0 from a server, INITIAL_WINDOW_SIZE above 2^31-1, "
        "MAX_FRAME_SIZE outside 2^14..2^24-1; RFC 8441 §3: ENABLE_CONNECT_PROTOCOL other "
        "than 0 or 1)."
    ),
    "strict-h2": (
        "h2 refuses what muxproxy accepts on purpose: SETTINGS_MAX_HEADER_LIST_SIZE is "
        "advisory (RFC 9113 §6.5.2), unknown settings are ignored (§6.5.2), a frame type h2 "
        "does not know on a closed stream is ignored (§4.1, §5.5). hyperframe also refuses "
        "padding of exactly the payload length minus one (an empty fragment or data): RFC 9113 "
        "§6.1 and §6.2 refuse only padding that exceeds what follows the Pad Length field."
    ),
    "ignored-fields": (
        "A malformed content-length in a 1xx head or in trailers: muxproxy ignores it (a 1xx "
        "head is never relayed and has no content, RFC 9110 §15.2; a content-length trailer is "
        "never used, §6.5.1, and never forwarded), h2 fails the connection."
    ),
    "early-frame-size": (
        "A frame header announcing more than SETTINGS_MAX_FRAME_SIZE: muxproxy fails the "
        "connection on the header (RFC 9113 §4.2: FRAME_SIZE_ERROR); h2 first waits for the "
        "whole frame to arrive."
    ),
    "push-before-ack": (
        "PUSH_PROMISE before the server acknowledged our SETTINGS_ENABLE_PUSH = 0: muxproxy "
        "fails the connection, h2 accepts the promise.  RFC 9113 §6.6 makes it a connection "
        "error only after the acknowledgement; muxproxy never wants a push, sends "
        "ENABLE_PUSH = 0 in its first flight, and no server it talks to pushes (a deliberate "
        "strictness: closing is safe, the streams of that moment are failed)."
    ),
    "goaway-drain": (
        "After a GOAWAY with NO_ERROR, h2 moves its connection to CLOSED and refuses every "
        "further frame; muxproxy keeps receiving the streams at or below last_stream_id. RFC "
        "9113 §6.8: those 'might still complete successfully' — the graceful drain every "
        "pooled backend restart relies on."
    ),
    "goaway-then-close": (
        "GOAWAY with an error code: muxproxy closes the connection at once and fails every "
        "stream (RFC 9113 §6.8: the sender is about to close; nothing below last_stream_id "
        "will complete); h2 reports the GOAWAY and keeps reading."
    ),
}


@dataclass
class StreamView:
    head: tuple[Header, ...] | None = None
    body: bytes = b""
    trailers: tuple[Header, ...] | None = None
    ended: bool = False
    reset: int | None = None  # the server's RST_STREAM code
    failed: bool = False  # the client refused the stream (malformed)
    refused: bool = False  # above a GOAWAY's last_stream_id


@dataclass
class Observation:
    alive: bool = True
    streams: dict[int, StreamView] = field(default_factory=dict)
    error: str = ""


class MuxSide:
    def __init__(self) -> None:
        self.core = H2Backend(stream_window=WINDOW, max_streams=MAX_STREAMS)
        self.core.initiate()
        self.states: dict[int, StreamState] = {}
        for headers, end in ((REQ, True), (REQ, True), (POST, False)):
            st = self.core.open_stream(headers, end_stream=end)
            self.states[st.stream_id] = st
        self.core.data_to_send()
        self.views = {sid: StreamView() for sid in STREAMS}

    def feed(self, data: bytes) -> Observation:
        core = self.core
        core.receive_data(data)
        core.data_to_send()
        for sid, st in self.states.items():
            v = self.views[sid]
            if st.chunks:
                for chunk, flow in st.chunks:
                    v.body += chunk
                    core.consumed(sid, flow)
                st.chunks.clear()
            v.head = tuple(st.headers) if st.headers is not None else None
            v.trailers = tuple(st.trailers) if st.trailers is not None else None
            v.ended = st.ended
            if st.reset_code is not None and not core.closed:
                error = st.error or ""
                if error.startswith("backend reset"):
                    v.reset = st.reset_code
                elif error.startswith("backend sent GOAWAY"):
                    v.refused = True
                else:
                    v.failed = True
        return Observation(not core.closed, self.views, core.close_reason)


class H2Side:
    def __init__(self) -> None:
        cfg = h2.config.H2Configuration(
            client_side=True, header_encoding=None, normalize_inbound_headers=False
        )
        c = self.conn = h2.connection.H2Connection(cfg)
        c.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 256 * 1024,
            },
        )
        c.initiate_connection()
        c.increment_flow_control_window(MAX_STREAMS * WINDOW - 65535)
        c.send_headers(1, REQ, end_stream=True)
        c.send_headers(3, REQ, end_stream=True)
        c.send_headers(5, POST, end_stream=False)
        c.data_to_send()
        self.views = {sid: StreamView() for sid in STREAMS}
        self.alive = True
        self.error = ""
        self.goaway_last: int | None = None

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
            self.conn.data_to_send()
        return Observation(self.alive, self.views, self.error)

    def _event(self, ev: h2.events.Event) -> None:
        sid = getattr(ev, "stream_id", None)
        if isinstance(ev, h2.events.ConnectionTerminated):
            last = ev.last_stream_id or 0
            self.goaway_last = last if self.goaway_last is None else min(last, self.goaway_last)
            for s, v in self.views.items():
                if s > self.goaway_last and not v.ended and v.reset is None and not v.failed:
                    v.refused = True
            if ev.error_code:
                self.alive = False
                self.error = f"GOAWAY {ev.error_code}"
            return
        if sid not in self.views:
            return
        v = self.views[sid]
        if v.refused:
            return
        if isinstance(ev, h2.events.ResponseReceived):
            v.head = tuple(ev.headers)
        elif isinstance(ev, h2.events.DataReceived):
            v.body += ev.data
            self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
        elif isinstance(ev, h2.events.TrailersReceived):
            v.trailers = tuple(ev.headers)
        elif isinstance(ev, h2.events.StreamEnded):
            v.ended = True
        elif isinstance(ev, h2.events.StreamReset):
            if ev.remote_reset:
                v.reset = ev.error_code
            else:
                v.failed = True


def comparable(v: StreamView) -> tuple[object, ...]:
    if v.refused:
        return ("refused",)
    if v.failed:
        return ("failed",)
    return (v.head, v.body, v.trailers, v.ended, v.reset)


def differences(mux: Observation, ref: Observation) -> list[str]:
    """What differs between the two observations ([] when they agree)."""
    out = []
    if mux.alive != ref.alive:
        out.append(
            f"connection: muxproxy alive={mux.alive} ({mux.error}), h2 alive={ref.alive}"
            f" ({ref.error})"
        )
        return out
    if not mux.alive:
        return out  # both failed the connection: the same kind of error
    for sid in STREAMS:
        a, b = comparable(mux.streams[sid]), comparable(ref.streams[sid])
        if a != b:
            out.append(f"stream {sid}: muxproxy {a!r:.200} h2 {b!r:.200}")
    return out


class Pair:
    """Both clients, fed in step."""

    def __init__(self) -> None:
        self.mux = MuxSide()
        self.ref = H2Side()
        self.done = False  # both failed the connection, or they diverged for a known reason

    def closed_in_mux(self, sid: int) -> bool:
        """The stream is no longer open in muxproxy (ended both ways, reset, or failed)."""
        return sid in STREAMS and sid not in self.mux.core.streams

    def feed(self, data: bytes) -> tuple[list[str], Observation, Observation]:
        m = self.mux.feed(data)
        r = self.ref.feed(data)
        diffs = differences(m, r)
        if diffs and m.alive and not r.alive and self.mux.core._in:
            # h2 judged a frame by its header; muxproxy waits for the payload.  Give it the
            # rest of the frame (zeros): the verdict must then be the same.
            pending = self.mux.core._in
            length = int.from_bytes(pending[:3], "big") if len(pending) >= 9 else 0
            m = self.mux.feed(b"\0" * max(1, 9 + length - len(pending)))
            if not m.alive:
                m.error = "partial frame: " + m.error
                diffs = differences(m, r)
        return diffs, m, r


_SETTING_NAMES = ("ENABLE_PUSH", "INITIAL_WINDOW_SIZE", "MAX_FRAME_SIZE", "ENABLE_CONNECT_PROTOCOL")


def classify(
    what: str, mux: Observation, ref: Observation, diffs: list[str], *, closed: bool = False
) -> str:
    """The KNOWN label of a difference, or a description of an unknown one.  ``closed``: the
    frame was for a stream muxproxy had already closed."""
    mux_failed = any(v.failed for v in mux.streams.values())
    h2_failed = any(v.failed for v in ref.streams.values())
    if mux.alive and not ref.alive:
        if ref.error.startswith(("FrameDataMissingError", "UnsupportedFrameError")):
            return "strict-h2"  # a frame type muxproxy does not know (ALTSVC, ...)
        if "in state ConnectionState.CLOSED" in ref.error:
            return "goaway-drain"
        if closed:
            return "closed-stream-frames"
        if "Invalid content-length" in ref.error and not mux_failed:
            return "ignored-fields"
        if mux_failed:
            if "FlowControl" in ref.error or "flow control" in ref.error.lower():
                return "stream-window-scope"
            return "malformed-scope"
        if what == "SETTINGS" or "Settings" in ref.error or "invalid padding" in ref.error:
            return "strict-h2"
    if not mux.alive and ref.alive:
        if what == "GOAWAY" and mux.error.startswith("backend sent GOAWAY"):
            return "goaway-then-close"
        if "frame of" in mux.error:
            return "early-frame-size"
        if "PUSH_PROMISE" in mux.error:
            return "push-before-ack"
        if mux.error.startswith("backend protocol error") and (
            "idle stream" in mux.error or any(n in mux.error for n in _SETTING_NAMES)
        ):
            return "lenient-h2"  # a frame on an idle stream, settings out of range
    if mux.alive and ref.alive:
        if mux_failed and not h2_failed:
            return "lenient-h2"
        if h2_failed and not mux_failed and closed:
            return "closed-stream-frames"
    return f"unknown after {what}: mux={mux.error!r} h2={ref.error!r}"
