"""H2Backend: the pooled HTTP/2 client core, driven against a real h2 server in memory."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import pytest
from hyperframe.frame import (
    Frame,
    GoAwayFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from muxproxy.core.backend_h2 import H2Backend, StreamLimitError
from muxproxy.core.h2wire import frame, max_continuations
from muxproxy.core.hpack_codec import encode_field
from muxproxy.core.relay import StreamState, Update

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CANCEL = h2.errors.ErrorCodes.CANCEL
REFUSED = h2.errors.ErrorCodes.REFUSED_STREAM
S = h2.settings.SettingCodes
Header = tuple[bytes, bytes]

REQ: list[Header] = [
    (b":method", b"GET"),
    (b":scheme", b"http"),
    (b":authority", b"app.test"),
    (b":path", b"/x?y=1"),
    (b"accept", b"*/*"),
    (b"x-forwarded-for", b"192.0.2.1"),
]
POST: list[Header] = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":authority", b"app.test"),
    (b":path", b"/upload"),
]
OK: list[Header] = [(b":status", b"200"), (b"content-type", b"text/plain")]


def frames(data: bytes) -> list[Frame]:
    """Split raw HTTP/2 bytes (the client preface removed) into hyperframe frames."""
    data = data.removeprefix(PREFACE)
    out = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        out.append(frame)
        data = data[9 + length :]
    return out


def window_updates(data: bytes) -> dict[int, int]:
    """stream id → total WINDOW_UPDATE increment in ``data``."""
    out: dict[int, int] = {}
    for f in frames(data):
        if isinstance(f, WindowUpdateFrame):
            out[f.stream_id] = out.get(f.stream_id, 0) + f.window_increment
    return out


class Pair:
    """Our core and a real h2 server, bytes passed back and forth by hand."""

    def __init__(
        self,
        *,
        window: int = 65535,
        max_streams: int = 100,
        server_streams: int | None = None,
        handshake: bool = True,
    ) -> None:
        self.core = H2Backend(stream_window=window, max_streams=max_streams)
        self.server = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        if server_streams is not None:
            self.server.local_settings = h2.settings.Settings(
                client=False, initial_values={S.MAX_CONCURRENT_STREAMS: server_streams}
            )
        self.server.initiate_connection()
        self.core.initiate()
        if handshake:
            self.to_server()
            self.to_core()
            self.to_server()

    def to_server(self) -> list[h2.events.Event]:
        data = self.core.data_to_send()
        return self.server.receive_data(data) if data else []

    def to_core(self, extra: bytes = b"") -> Update:
        data = self.server.data_to_send() + extra
        return self.core.receive_data(data) if data else Update()

    def open(self, headers: list[Header] = REQ, end_stream: bool = True) -> StreamState:
        st = self.core.open_stream(headers, end_stream=end_stream)
        self.to_server()
        return st

    def respond(self, sid: int, body: bytes = b"", end: bool = True) -> Update:
        self.server.send_headers(sid, OK)
        if body:
            self.server.send_data(sid, body)
        if end:
            self.server.end_stream(sid)
        return self.to_core()


def body_of(st: StreamState) -> bytes:
    return b"".join(data for data, _ in st.chunks)


# --- connection set-up -------------------------------------------------------------------------


def test_initiate_sends_preface_settings_and_connection_window() -> None:
    core = H2Backend(stream_window=100_000, max_streams=8)
    core.initiate()
    data = core.data_to_send()
    assert data.startswith(PREFACE)
    settings_frame, update = frames(data)
    assert isinstance(settings_frame, SettingsFrame)
    assert settings_frame.settings[S.ENABLE_PUSH] == 0
    assert settings_frame.settings[S.INITIAL_WINDOW_SIZE] == 100_000
    assert isinstance(update, WindowUpdateFrame) and update.stream_id == 0
    assert 65535 + update.window_increment == 8 * 100_000
    # and a real server sees exactly that window
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    server.receive_data(data)
    assert server.outbound_flow_control_window == 8 * 100_000
    assert server.remote_settings.initial_window_size == 100_000
    assert server.remote_settings.enable_push == 0


def test_connection_window_is_capped_at_the_protocol_maximum() -> None:
    core = H2Backend(stream_window=2**20, max_streams=10_000)
    core.initiate()
    (update,) = [f for f in frames(core.data_to_send()) if isinstance(f, WindowUpdateFrame)]
    assert 65535 + update.window_increment == 2**31 - 1


def test_small_pool_keeps_the_default_connection_window() -> None:
    core = H2Backend(stream_window=16384, max_streams=2)
    core.initiate()
    assert not [f for f in frames(core.data_to_send()) if isinstance(f, WindowUpdateFrame)]


def test_settings_received() -> None:
    p = Pair(handshake=False)
    assert not p.core.settings_received
    assert p.core.free_streams() == 0  # nothing is opened before the backend's SETTINGS
    p.to_server()
    up = p.to_core()
    assert p.core.settings_received
    assert up.capacity_changed and not up.closed
    assert p.core.free_streams() == 100


def test_ping() -> None:
    p = Pair()
    p.core.ping(b"12345678")
    (ev,) = p.to_server()
    assert isinstance(ev, h2.events.PingReceived) and ev.ping_data == b"12345678"
    assert p.to_core().ping_acked


# --- stream capacity ---------------------------------------------------------------------------


def test_free_streams_honours_max_concurrent_streams() -> None:
    p = Pair(server_streams=3)
    assert p.core.free_streams() == 3
    streams = [p.open() for _ in range(3)]
    assert p.core.free_streams() == 0
    with pytest.raises(StreamLimitError):
        p.core.open_stream(REQ, end_stream=True)
    up = p.respond(streams[1].stream_id, b"done")
    assert up.capacity_changed
    assert p.core.free_streams() == 1
    assert set(p.core.streams) == {streams[0].stream_id, streams[2].stream_id}


def test_our_own_cap_below_the_backends() -> None:
    p = Pair(max_streams=2, server_streams=50)
    assert p.core.free_streams() == 2
    p.open()
    p.open()
    assert p.core.free_streams() == 0


def test_free_streams_far_from_and_near_the_limit() -> None:
    p = Pair(max_streams=40)
    for _ in range(20):
        p.open()
    assert p.core.free_streams() == 20
    for _ in range(17):
        p.open()
    assert p.core.free_streams() == 3


def test_backend_lowers_its_limit() -> None:
    p = Pair(server_streams=10)
    for _ in range(4):
        p.open()
    p.server.update_settings({S.MAX_CONCURRENT_STREAMS: 2})
    up = p.to_core()
    assert up.capacity_changed
    assert p.core.free_streams() == 0


# --- requests and responses --------------------------------------------------------------------


def test_open_stream_sends_our_headers() -> None:
    p = Pair()
    st = p.core.open_stream(REQ, end_stream=True)
    assert st.stream_id == 1
    received, ended = p.to_server()
    assert isinstance(received, h2.events.RequestReceived)
    assert received.stream_id == 1
    assert [(bytes(n), bytes(v)) for n, v in received.headers] == REQ
    assert isinstance(ended, h2.events.StreamEnded)


def test_request_body() -> None:
    p = Pair()
    st = p.open(POST, end_stream=False)
    assert p.core.send_window(st.stream_id) == 16384  # backend window 65535, frame size 16384
    p.core.send_data(st.stream_id, b"hello ")
    p.core.end_stream(st.stream_id, [(b"x-checksum", b"1")])
    events = p.to_server()
    data = [e for e in events if isinstance(e, h2.events.DataReceived)]
    assert b"".join(e.data for e in data) == b"hello "
    trailers = [e for e in events if isinstance(e, h2.events.TrailersReceived)]
    assert [(bytes(n), bytes(v)) for n, v in trailers[0].headers] == [(b"x-checksum", b"1")]
    assert isinstance(events[-1], h2.events.StreamEnded)


def test_response_lands_in_stream_state() -> None:
    p = Pair()
    st = p.open()
    sid = st.stream_id
    p.server.send_headers(sid, OK)
    up = p.to_core()
    assert up.streams == [st]
    assert st.headers == OK and not st.ended
    p.server.send_data(sid, b"hello ")
    p.server.send_data(sid, b"world", end_stream=True)
    up = p.to_core()
    assert st in up.streams and up.capacity_changed
    assert body_of(st) == b"hello world"
    assert sum(n for _, n in st.chunks) == 11
    assert st.ended and st.reset_code is None and st.error is None
    assert sid not in p.core.streams  # h2 closed it: no longer counted


def test_response_trailers() -> None:
    p = Pair()
    st = p.open()
    p.server.send_headers(st.stream_id, OK)
    p.server.send_data(st.stream_id, b"x")
    p.server.send_headers(st.stream_id, [(b"grpc-status", b"0")], end_stream=True)
    p.to_core()
    assert st.trailers == [(b"grpc-status", b"0")]
    assert st.ended


def test_informational_response_is_not_the_head() -> None:
    p = Pair()
    st = p.open(POST, end_stream=False)
    p.server.send_headers(st.stream_id, [(b":status", b"100")])
    p.to_core()
    assert st.headers is None
    p.server.send_headers(st.stream_id, OK)
    p.to_core()
    assert st.headers == OK


# --- flow control: credit, not buffering --------------------------------------------------------

W = 20_000


def fill(p: Pair, sid: int, n: int) -> None:
    """The server sends n bytes on sid, in frames as large as it may."""
    while n:
        chunk = min(n, p.server.max_outbound_frame_size)
        p.server.send_data(sid, b"x" * chunk)
        n -= chunk


def test_backend_cannot_send_more_than_the_stream_window_until_consumed() -> None:
    p = Pair(window=W, max_streams=4)
    st = p.open()
    sid = st.stream_id
    p.server.send_headers(sid, OK)
    assert p.server.local_flow_control_window(sid) == W
    fill(p, sid, W)
    assert p.server.local_flow_control_window(sid) == 0
    with pytest.raises(h2.exceptions.FlowControlError):
        p.server.send_data(sid, b"!")
    p.to_core()
    assert sum(n for _, n in st.chunks) == W
    # nothing is acknowledged by receiving alone
    assert window_updates(p.core.data_to_send()).get(sid) is None
    p.core.consumed(sid, W)
    assert window_updates(p.core.data_to_send()).get(sid) == W


def test_consumed_sends_window_update() -> None:
    p = Pair(window=W, max_streams=4)
    st = p.open()
    sid = st.stream_id
    p.server.send_headers(sid, OK)
    fill(p, sid, W)
    p.to_core()
    assert not p.core.data_to_send()
    half = W // 2
    p.core.consumed(sid, half)
    events = p.to_server()
    opened = [e for e in events if isinstance(e, h2.events.WindowUpdated) and e.stream_id == sid]
    assert sum(e.delta for e in opened) == half
    assert p.server.local_flow_control_window(sid) == half
    p.core.consumed(sid, W - half)
    p.to_server()
    assert p.server.local_flow_control_window(sid) == W
    fill(p, sid, W)  # and the backend may send a full window again


def test_one_full_stream_does_not_block_the_others() -> None:
    p = Pair(window=W, max_streams=4)
    a, b = p.open(), p.open()
    p.server.send_headers(a.stream_id, OK)
    p.server.send_headers(b.stream_id, OK)
    fill(p, a.stream_id, W)  # a's client reads nothing
    assert p.server.local_flow_control_window(b.stream_id) == W
    fill(p, b.stream_id, W)
    p.to_core()
    assert sum(n for _, n in a.chunks) == sum(n for _, n in b.chunks) == W


def test_reset_stream_cancels_and_returns_credit() -> None:
    # Two streams whose clients read nothing use up the whole connection window (2 × W).
    p = Pair(window=32768, max_streams=2)
    a, b = p.open(), p.open()
    for stream in (a, b):
        p.server.send_headers(stream.stream_id, OK)
        fill(p, stream.stream_id, 32768)
    assert p.server.outbound_flow_control_window == 0
    p.to_core()
    assert not p.core.data_to_send()  # unconsumed: no credit back yet
    p.core.reset_stream(a.stream_id)
    out = p.core.data_to_send()
    rst = [f for f in frames(out) if isinstance(f, RstStreamFrame)]
    assert [(f.stream_id, f.error_code) for f in rst] == [(a.stream_id, CANCEL)]
    assert window_updates(out) == {0: 32768}
    events = p.server.receive_data(out)
    assert any(isinstance(e, h2.events.StreamReset) and e.error_code == CANCEL for e in events)
    assert p.server.outbound_flow_control_window == 32768
    assert a.stream_id not in p.core.streams and not a.chunks
    assert p.core.free_streams() == 1
    # the returned credit carries a new stream's full window
    c = p.open()
    p.server.send_headers(c.stream_id, OK)
    fill(p, c.stream_id, 32768)
    p.to_core()
    assert sum(n for _, n in c.chunks) == 32768


def test_reset_of_an_unknown_stream_is_harmless() -> None:
    p = Pair()
    st = p.open()
    p.respond(st.stream_id)
    p.core.reset_stream(st.stream_id)  # already closed on both sides
    p.core.reset_stream(99)
    p.to_server()
    assert not p.core.closed


def test_discard_returns_credit_of_an_ended_stream() -> None:
    p = Pair(window=32768, max_streams=2)
    a, b = p.open(), p.open()
    for stream in (a, b):
        p.server.send_headers(stream.stream_id, OK)
        fill(p, stream.stream_id, 32768)
    p.server.end_stream(a.stream_id)
    p.to_core()
    assert a.ended and p.server.outbound_flow_control_window == 0
    p.core.discard(a)  # its client went away with the body unread
    assert not a.chunks
    p.to_server()
    assert p.server.outbound_flow_control_window == 32768


# --- GOAWAY, refused streams, dead connections ---------------------------------------------------


def goaway(last_stream_id: int, error_code: int = 0) -> bytes:
    # Built by hand: h2's own close_connection() would stop the server from finishing the
    # streams it promised, which is exactly what a graceful backend does.
    return GoAwayFrame(0, last_stream_id=last_stream_id, error_code=error_code).serialize()


@pytest.mark.parametrize("together", [False, True], ids=["apart", "same-read"])
def test_goaway_drains_gracefully(together: bool) -> None:
    p = Pair(window=W, max_streams=10)
    s1 = p.open(POST, end_stream=False)  # still sending its body
    s3, s5, s7 = p.open(), p.open(), p.open()
    assert [s.stream_id for s in (s1, s3, s5, s7)] == [1, 3, 5, 7]
    if together:
        p.server.send_headers(3, OK)
        p.server.send_data(3, b"three", end_stream=True)
        up = p.core.receive_data(goaway(3) + p.server.data_to_send())
    else:
        up = p.core.receive_data(goaway(3))
    assert up.goaway and not up.closed
    assert p.core.goaway_last_stream_id == 3
    for refused in (s5, s7):
        assert refused in up.streams
        assert refused.refused and refused.reset_code == REFUSED and refused.error
    assert s1.reset_code is None and s3.reset_code is None
    assert p.core.draining and p.core.free_streams() == 0
    assert set(p.core.streams) == {1, 3} - ({3} if together else set())
    # streams ≤ last_stream_id go on: the request body is still sent ...
    p.core.send_data(1, b"body", end_stream=True)
    events = p.to_server()
    assert [e.data for e in events if isinstance(e, h2.events.DataReceived)] == [b"body"]
    # ... and the responses still arrive, with flow control working
    p.server.send_headers(1, OK)
    fill(p, 1, W)
    if not together:
        p.server.send_headers(3, OK)
        p.server.send_data(3, b"three", end_stream=True)
    up = p.to_core()
    assert not up.closed and not p.core.closed
    assert sum(n for _, n in s1.chunks) == W
    assert s3.ended and body_of(s3) == b"three"
    p.core.consumed(1, W)
    p.to_server()
    assert p.server.local_flow_control_window(1) == W
    p.server.send_data(1, b"end", end_stream=True)
    up = p.to_core()
    assert not up.closed and s1.ended
    assert s1.headers == s3.headers == OK
    assert not p.core.streams


def test_goaway_with_an_error_closes_everything() -> None:
    p = Pair()
    s1, s3 = p.open(), p.open()
    up = p.core.receive_data(goaway(1, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM))
    assert up.goaway and up.closed and p.core.closed
    assert s3.refused and s3.reset_code == REFUSED
    assert s1.reset_code is not None and not s1.refused and s1.error
    assert s1 in up.streams and s3 in up.streams
    assert p.core.free_streams() == 0


def test_refused_stream_before_the_head_is_replayable() -> None:
    p = Pair()
    st = p.open()
    p.server.reset_stream(st.stream_id, error_code=REFUSED)
    up = p.to_core()
    assert st in up.streams and up.capacity_changed
    assert st.refused and st.reset_code == REFUSED and st.error
    assert st.stream_id not in p.core.streams


def test_refused_stream_after_the_head_is_not_replayable() -> None:
    p = Pair()
    st = p.open()
    p.server.send_headers(st.stream_id, OK)
    p.server.reset_stream(st.stream_id, error_code=REFUSED)
    p.to_core()
    assert not st.refused and st.reset_code == REFUSED


def test_other_resets_are_not_replayable() -> None:
    p = Pair()
    st = p.open()
    p.server.reset_stream(st.stream_id, error_code=h2.errors.ErrorCodes.INTERNAL_ERROR)
    up = p.to_core()
    assert st in up.streams
    assert not st.refused and st.reset_code == h2.errors.ErrorCodes.INTERNAL_ERROR


def assert_all_failed(p: Pair, up: Update, streams: list[StreamState]) -> None:
    assert up.closed and p.core.closed and up.capacity_changed
    for stream in streams:
        assert stream in up.streams
        assert stream.reset_code is not None and stream.error
    assert not p.core.streams
    assert p.core.free_streams() == 0
    assert p.core.receive_data(b"\x00" * 9) == Update()  # dead: nothing more happens


def test_protocol_error_closes_and_fails_every_stream() -> None:
    p = Pair()
    streams = [p.open(), p.open()]
    p.server.send_headers(1, OK)
    p.to_core()
    garbage = b"\x00\x00\x04\x00\x00\x00\x00\x00\x00junk"  # DATA on stream 0
    up = p.core.receive_data(garbage)
    assert_all_failed(p, up, streams)
    assert "protocol error" in p.core.close_reason


def test_http1_reply_instead_of_settings_is_a_protocol_error() -> None:
    """RFC 9113 §3.4: the server's first frame must be SETTINGS.  A backend that answers h2c
    with HTTP/1.1 must fail at once (its bytes read as a 4.7 MB frame header otherwise)."""
    p = Pair(handshake=False)
    p.to_server()
    up = p.core.receive_data(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    assert up.closed and p.core.closed


def test_backend_closed_the_connection() -> None:
    p = Pair()
    streams = [p.open(), p.open()]
    up = p.core.receive_data(b"")
    assert_all_failed(p, up, streams)
    assert "closed" in p.core.close_reason


def test_ended_streams_are_not_failed_by_a_close() -> None:
    p = Pair()
    st = p.open()
    p.respond(st.stream_id, b"ok")
    p.core.receive_data(b"")
    assert st.ended and st.reset_code is None


def test_close_by_the_proxy() -> None:
    p = Pair()
    st = p.open()
    p.core.close()
    assert p.core.closed and st.reset_code is not None
    events = p.to_server()
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in events)


FRAME = st.builds(
    lambda length, typ, flags, sid, payload: (
        length.to_bytes(3, "big") + bytes([typ, flags]) + sid.to_bytes(4, "big") + payload
    ),
    st.integers(0, 24),
    st.integers(0, 11),
    st.integers(0, 255),
    st.sampled_from([0, 1, 3, 5, 2**31 - 1]),
    st.binary(max_size=24),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(FRAME, min_size=1, max_size=4))
def test_property_peer_bytes_never_raise(chunks: list[bytes]) -> None:
    """Peer-caused problems are reported, never raised (DESIGN.md §4)."""
    p = Pair()
    streams = [p.open(), p.open(POST, end_stream=False)]
    up = p.core.receive_data(b"".join(chunks))
    p.core.data_to_send()
    if up.closed:
        assert all(s.reset_code is not None or s.ended for s in streams)


# --- what a broken backend sends: the stream or the connection, never more -------------------


def block(fields: list[Header]) -> bytes:
    """A header block that leaves the HPACK tables alone (so the real server's stay in step)."""
    return b"".join(encode_field(n, v) for n, v in fields)


def raw(type_: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return frame(type_, flags, sid, payload)


def rst_codes(data: bytes) -> dict[int, int]:
    return {f.stream_id: f.error_code for f in frames(data) if isinstance(f, RstStreamFrame)}


MALFORMED: list[tuple[str, bytes]] = [
    ("upper-case name", raw(1, 5, 1, block([(b":status", b"200")]) + b"\x00\x01X\x011")),
    ("connection field", raw(1, 5, 1, block([(b":status", b"200"), (b"connection", b"close")]))),
    ("te other than trailers", raw(1, 5, 1, block([(b":status", b"200"), (b"te", b"gzip")]))),
    ("CR in a value", raw(1, 5, 1, block([(b":status", b"200")]) + b"\x00\x01x\x03a\rb")),
    ("no :status", raw(1, 5, 1, block([(b"x", b"1")]))),
    ("two :status", raw(1, 5, 1, block([(b":status", b"200"), (b":status", b"204")]))),
    ("request pseudo", raw(1, 5, 1, block([(b":status", b"200"), (b":path", b"/")]))),
    ("pseudo after field", raw(1, 5, 1, block([(b"x", b"1"), (b":status", b"200")]))),
    ("bad :status", raw(1, 5, 1, block([(b":status", b"2x0")]))),
    ("1xx ending the stream", raw(1, 5, 1, block([(b":status", b"103")]))),
    ("101 over HTTP/2", raw(1, 4, 1, block([(b":status", b"101")]))),
    ("DATA before the head", raw(0, 1, 1, b"x")),
    (
        "body longer than content-length (caught before the end)",
        raw(1, 4, 1, block([(b":status", b"200"), (b"content-length", b"1")]))
        + raw(0, 0, 1, b"xy"),
    ),
    (
        "body shorter than content-length",
        raw(1, 4, 1, block([(b":status", b"200"), (b"content-length", b"3")]))
        + raw(0, 1, 1, b"xy"),
    ),
    (
        "two content-lengths",
        raw(
            1,
            4,
            1,
            block([(b":status", b"200"), (b"content-length", b"1"), (b"content-length", b"2")]),
        ),
    ),
    (
        "trailers without END_STREAM",
        raw(1, 4, 1, block([(b":status", b"200")])) + raw(1, 4, 1, block([(b"x", b"1")])),
    ),
    (
        "pseudo-header in trailers",
        raw(1, 4, 1, block([(b":status", b"200")])) + raw(1, 5, 1, block([(b":status", b"200")])),
    ),
    (
        "DATA after END_STREAM",
        raw(1, 4, 1, block([(b":status", b"200")])) + raw(0, 1, 1, b"a") + raw(0, 0, 1, b"b"),
    ),
    ("stream WINDOW_UPDATE of 0", raw(8, 0, 1, b"\x00\x00\x00\x00")),
]


@pytest.mark.parametrize("frames_", [f for _, f in MALFORMED], ids=[n for n, _ in MALFORMED])
def test_a_malformed_response_fails_its_stream_alone(frames_: bytes) -> None:
    """RFC 9113 §8.1.1: a malformed response is a stream error: RST_STREAM(PROTOCOL_ERROR) on
    that stream, its exchange told why; the stream next to it and the connection go on."""
    p = Pair()
    bad = p.open(POST, end_stream=False)  # stream 1, still sending: nothing ends it early
    good = p.open()
    assert bad.stream_id == 1
    up = p.core.receive_data(frames_)
    assert not up.closed and not p.core.closed
    assert bad in up.streams and bad.reset_code is not None and not bad.refused
    assert "malformed" in (bad.error or "")
    assert 1 not in p.core.streams
    assert rst_codes(p.core.data_to_send()).get(1) in (1, 3, 5)  # PROTOCOL, FLOW_CONTROL, CLOSED
    p.respond(good.stream_id, b"fine")
    assert good.ended and body_of(good) == b"fine" and good.reset_code is None


def test_response_to_head_may_announce_a_length_it_does_not_send() -> None:
    p = Pair()
    st = p.open([(b":method", b"HEAD"), *REQ[1:]])
    p.core.receive_data(raw(1, 5, 1, block([(b":status", b"200"), (b"content-length", b"9")])))
    assert st.ended and st.reset_code is None


CONNECTION_ERRORS: list[tuple[str, bytes]] = [
    ("DATA on stream 0", raw(0, 0, 0, b"x")),
    ("HEADERS on an idle stream", raw(1, 5, 7, block([(b":status", b"200")]))),
    ("server-initiated stream", raw(1, 5, 2, block([(b":status", b"200")]))),
    ("PUSH_PROMISE", raw(5, 4, 1, b"\x00\x00\x00\x02" + block([(b":method", b"GET")]))),
    ("frame above MAX_FRAME_SIZE", raw(0, 0, 1, b"x" * 16385)),
    (
        "header block interrupted",
        raw(1, 0, 1, block([(b":status", b"200")])) + raw(6, 0, 0, b"8bytes!!"),
    ),
    ("CONTINUATION out of the blue", raw(9, 4, 1, block([(b":status", b"200")]))),
    ("undecodable HPACK", raw(1, 5, 1, b"\x80")),
    ("connection WINDOW_UPDATE of 0", raw(8, 0, 0, b"\x00\x00\x00\x00")),
    ("connection window overflow", raw(8, 0, 0, b"\x7f\xff\xff\xff")),
    ("SETTINGS on a stream", raw(4, 0, 1)),
    ("SETTINGS of a wrong length", raw(4, 0, 0, b"\x00\x03\x00")),
    ("ENABLE_PUSH = 1 from a server", raw(4, 0, 0, b"\x00\x02\x00\x00\x00\x01")),
    ("MAX_FRAME_SIZE too small", raw(4, 0, 0, b"\x00\x05\x00\x00\x10\x00")),
    ("INITIAL_WINDOW_SIZE too large", raw(4, 0, 0, b"\x00\x04\x80\x00\x00\x00")),
    ("PING of a wrong length", raw(6, 0, 0, b"1234")),
    ("RST_STREAM of a wrong length", raw(3, 0, 1, b"\x00\x00\x08")),
    ("GOAWAY too short", raw(7, 0, 0, b"\x00\x00\x00\x01")),
    ("padding longer than the frame", raw(0, 8, 1, b"\x09abc")),
]


@pytest.mark.parametrize(
    "frames_", [f for _, f in CONNECTION_ERRORS], ids=[n for n, _ in CONNECTION_ERRORS]
)
def test_connection_errors_fail_every_stream_with_goaway(frames_: bytes) -> None:
    p = Pair()
    streams = [p.open(), p.open(POST, end_stream=False)]
    up = p.core.receive_data(frames_)
    assert_all_failed(p, up, streams)
    assert "protocol error" in p.core.close_reason
    assert any(isinstance(f, GoAwayFrame) for f in frames(p.core.data_to_send()))


def test_continuation_flood_is_bounded() -> None:
    """An endless header block (CONTINUATION without END_HEADERS, CVE-2024-27316 and kin) is
    cut at max_header_list_size + one frame, whatever the peer means to send."""
    p = Pair()
    st_ = p.open()
    p.core.max_header_list_size = 32 * 1024
    flood = raw(1, 0, 1, b"\x00" * 16) + raw(9, 0, 1, b"\x00" * 16384) * 4
    up = p.core.receive_data(flood)
    assert up.closed and st_.reset_code is not None
    assert "too large" in p.core.close_reason


def test_empty_continuation_frames_are_counted() -> None:
    """CVE-2024-28182 (issue 16 item 4): zero-length CONTINUATION frames pass any byte cap; the
    frames of one header block are counted, as nghttp2 does, and too many is a connection
    error (ENHANCE_YOUR_CALM) that fails the connection at once, not after millions."""
    p = Pair()
    st_ = p.open()
    cap = max_continuations(p.core.max_header_list_size)
    assert 8 <= cap <= 32
    flood = raw(1, 0, 1, block([(b":status", b"200")])) + raw(9, 0, 1) * (cap + 1)
    up = p.core.receive_data(flood + raw(9, 0, 1) * 100_000)
    assert up.closed and st_.reset_code is not None and not st_.refused
    assert "CONTINUATION" in p.core.close_reason
    goaways = [f for f in frames(p.core.data_to_send()) if isinstance(f, GoAwayFrame)]
    assert [g.error_code for g in goaways] == [h2.errors.ErrorCodes.ENHANCE_YOUR_CALM]


def test_a_block_split_into_as_many_frames_as_its_size_needs_is_accepted() -> None:
    """The count leaves room for the largest legitimate block: max_header_list_size in full
    frames, and nghttp2's 8 tiny ones."""
    p = Pair()
    st_ = p.open()
    data = block([(b":status", b"200"), (b"x-big", b"v" * 200_000)])
    chunks = [data[i : i + 16384] for i in range(0, len(data), 16384)]
    wire = raw(1, 0, 1, chunks[0]) + b"".join(
        raw(9, 4 if i == len(chunks) - 1 else 0, 1, c) for i, c in enumerate(chunks[1:], 1)
    )
    p.core.receive_data(wire)
    assert not p.core.closed and st_.headers is not None and len(st_.headers) == 2
    st2 = p.open()
    small = block([(b":status", b"204")])
    wire = raw(1, 0, 3, small[:1]) + raw(9, 0, 3) * 7 + raw(9, 4, 3, small[1:])
    p.core.receive_data(wire)
    assert not p.core.closed and st2.headers == [(b":status", b"204")]


def test_a_failed_connection_sends_nothing_queued_but_its_goaway() -> None:
    """A connection error fails every stream; HEADERS still queued (never handed to
    data_to_send) are dropped, not sent after their stream was failed: the driver replays
    those streams as never processed (io/backend.py), so they must never reach the backend."""
    p = Pair()
    sent = p.open()  # stream 1: handed out
    queued = p.core.open_stream(REQ, end_stream=True)  # stream 3: still in our buffer
    up = p.core.receive_data(raw(0, 0, 0, b"x"))  # DATA on stream 0: connection error
    assert up.closed and sent.reset_code is not None and queued.reset_code is not None
    assert queued.headers is None
    out = frames(p.core.data_to_send())
    assert [type(f) for f in out] == [GoAwayFrame]


def test_priority_of_the_wrong_size_is_a_stream_error() -> None:
    """RFC 9113 §6.3 (found by the differential test against h2): PRIORITY is ignored, but one
    whose length is not 5 resets its stream with FRAME_SIZE_ERROR; the connection goes on."""
    p = Pair()
    bad, good = p.open(), p.open()
    up = p.core.receive_data(raw(2, 0, 1, b"\x00" * 4) + raw(2, 0, 3, b"\x00" * 5))
    assert not up.closed and bad.reset_code == 6 and good.reset_code is None
    assert rst_codes(p.core.data_to_send()) == {1: 6}
    p.respond(good.stream_id, b"fine")
    assert good.ended and body_of(good) == b"fine"


def test_goaway_below_a_stream_whose_response_is_complete_leaves_it_complete() -> None:
    """A server that answered a stream whole (we are still sending its body) and then names a
    lower last_stream_id in GOAWAY contradicts itself (RFC 9113 §6.8); the complete response
    stands, as h2 has it (found by the differential test)."""
    p = Pair()
    st_ = p.open(POST, end_stream=False)
    p.core.receive_data(raw(1, 5, 1, block([(b":status", b"200")])))
    assert st_.ended
    up = p.core.receive_data(goaway(0))
    assert st_.reset_code is None and st_.headers == [(b":status", b"200")]
    assert not up.closed


def test_a_peer_can_lower_the_stream_windows_below_zero_and_recover() -> None:
    """RFC 9113 §6.9.2: a SETTINGS_INITIAL_WINDOW_SIZE change moves every open stream's window,
    possibly below zero; sending resumes when WINDOW_UPDATEs bring it back."""
    p = Pair()
    st_ = p.open(POST, end_stream=False)
    p.core.send_data(st_.stream_id, b"x" * 1000)
    p.core.receive_data(raw(4, 0, 0, b"\x00\x04\x00\x00\x00\x64"))  # INITIAL_WINDOW_SIZE 100
    assert p.core.send_window(st_.stream_id) == 0
    p.core.receive_data(raw(8, 0, st_.stream_id, (1000).to_bytes(4, "big")))
    assert p.core.send_window(st_.stream_id) == 100


def test_connect_protocol_cannot_be_withdrawn() -> None:
    p = Pair()
    p.core.receive_data(raw(4, 0, 0, b"\x00\x08\x00\x00\x00\x01"))
    assert p.core.enable_connect_protocol
    up = p.core.receive_data(raw(4, 0, 0, b"\x00\x08\x00\x00\x00\x00"))
    assert up.closed


def test_only_answers_prove_the_backend_reads() -> None:
    """Update.answers (issue 16.6): a PING of the backend's own proves nothing; the ACK of ours,
    a response on our stream and send credit do."""
    p = Pair()
    p.server.ping(b"flooding")
    assert not p.to_core().answers()
    p.core.ping(b"12345678")
    p.to_server()
    assert p.to_core().answers()
    st = p.open(POST, end_stream=False)
    p.server.increment_flow_control_window(1000, stream_id=st.stream_id)
    assert p.to_core().answers()
    p.server.ping(b"flooding")
    assert p.respond(st.stream_id).answers()


def test_repeated_settings_are_no_answer_but_a_larger_window_is() -> None:
    """A SETTINGS flood is the backend speaking of its own accord (issue 16.6): it must not
    keep a connection that reads nothing looking alive.  A larger initial window is credit."""
    p = Pair()
    p.server.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 90})
    assert not p.to_core().answers()
    p.server.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
    assert p.to_core().answers()
