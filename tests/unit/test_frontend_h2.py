"""The client-side HTTP/2 core (core/frontend_h2.py, core/h2guard.py) against a real h2 client.

No sockets: bytes go from an ``h2`` client state machine to :class:`H2Server` and back, with
the time passed in.  Abuse cases write the frames by hand (h2's client would refuse to).
"""

from __future__ import annotations

import struct

import h2.config
import h2.connection
import h2.events
import pytest

from muxproxy.core.frontend_h2 import (
    Body,
    Cancelled,
    Closing,
    End,
    H2Limits,
    H2Server,
    Request,
    WindowOpen,
)
from muxproxy.core.h2wire import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    NO_ERROR,
    PING,
    PRIORITY,
    PROTOCOL_ERROR,
    REFUSED,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
)
from muxproxy.core.headers import Header

GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test"), (b":path", b"/")]


class Pair:
    def __init__(self, limits: H2Limits | None = None, *, connect_protocol: bool = False) -> None:
        self.server = H2Server(limits, connect_protocol=connect_protocol)
        self.server.initiate()
        cfg = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.client = h2.connection.H2Connection(cfg)
        self.client.initiate_connection()
        self.now = 1000.0
        self.client_events: list[h2.events.Event] = []
        self.events = self.to_server()
        self.to_client()
        self.events += self.to_server()  # the client's SETTINGS ACKs

    def to_server(self, data: bytes | None = None) -> list[object]:
        raw = self.client.data_to_send() if data is None else data
        return list(self.server.receive_data(raw, self.now))

    def to_client(self) -> list[h2.events.Event]:
        evs = self.client.receive_data(self.server.data_to_send())
        self.client_events += evs
        return evs

    def request(self, sid: int, headers: list[Header], end: bool = True) -> list[object]:
        self.client.send_headers(sid, headers, end_stream=end)
        return self.to_server()

    def raw_request(self, sid: int, headers: list[Header] = GET) -> list[object]:
        """HEADERS written by hand, past the client's own view of our stream limit."""
        block = self.client.encoder.encode(headers)
        return self.to_server(frame(HEADERS, END_HEADERS | END_STREAM, sid, block))

    def raw_out(self) -> list[tuple[int, int, int, bytes]]:
        """The server's output as (type, flags, stream id, payload), not fed to the client
        (which would reject resets of streams it never opened itself)."""
        data, out = self.server.data_to_send(), []
        while data:
            n = int.from_bytes(data[:3], "big")
            sid = int.from_bytes(data[5:9], "big") & 0x7FFFFFFF
            out.append((data[3], data[4], sid, data[9 : 9 + n]))
            data = data[9 + n :]
        return out

    def raw_resets(self) -> dict[int, int]:
        out = self.raw_out()
        return {sid: int.from_bytes(pl, "big") for t, _, sid, pl in out if t == RST_STREAM}

    def goaway(self) -> tuple[int, int] | None:
        for ev in self.client_events:
            if isinstance(ev, h2.events.ConnectionTerminated):
                return ev.error_code, ev.last_stream_id
        return None

    def resets(self) -> dict[int, int]:
        return {
            ev.stream_id: ev.error_code
            for ev in self.client_events
            if isinstance(ev, h2.events.StreamReset)
        }


def test_settings_announce_our_limits_and_the_connection_window() -> None:
    p = Pair(H2Limits(max_concurrent_streams=7, initial_window=100_000))
    rs = p.client.remote_settings
    assert rs.max_concurrent_streams == 7
    assert rs.initial_window_size == 100_000
    assert rs.enable_connect_protocol == 0
    # the connection window: 7 × 100,000 (under the 1 MiB cap)
    assert p.client.outbound_flow_control_window == 700_000
    assert all(isinstance(e, WindowOpen) for e in p.events)


def test_get_round_trip() -> None:
    p = Pair()
    evs = p.request(1, [*GET, (b"accept", b"*/*"), (b"cookie", b"a=1"), (b"cookie", b"b=2")])
    assert len(evs) == 2
    req, end = evs
    assert isinstance(req, Request) and isinstance(end, End)
    assert (req.method, req.scheme, req.authority, req.path) == (b"GET", b"https", b"a.test", b"/")
    assert req.headers == [(b"accept", b"*/*"), (b"cookie", b"a=1"), (b"cookie", b"b=2")]
    assert req.end_stream and end.trailers is None
    p.server.send_head(1, 200, [(b"content-length", b"5")], end=False)
    assert p.server.send_data(1, b"hello", end=True) == 5
    evs = p.to_client()
    kinds = [type(e).__name__ for e in evs]
    assert kinds == ["ResponseReceived", "DataReceived", "StreamEnded"]
    assert p.server.idle


def test_body_and_trailers_are_delivered_and_acknowledged_on_demand() -> None:
    p = Pair(H2Limits(initial_window=65535))
    p.request(1, [*GET[:1], (b":scheme", b"http"), *GET[2:], (b"te", b"trailers")], end=False)
    for _ in range(4):
        p.client.send_data(1, b"x" * 10_000)
    evs = p.to_server()
    body = [e for e in evs if isinstance(e, Body)]
    assert sum(len(b.data) for b in body) == 40_000
    # nothing is given back until the I/O layer says the bytes went on
    p.to_client()
    assert p.client.local_flow_control_window(1) == 65535 - 40_000
    for b in body:
        p.server.acknowledge(1, b.flow)
    p.to_client()
    assert p.client.local_flow_control_window(1) == 65535
    p.client.send_headers(1, [(b"grpc-foo", b"bar")], end_stream=True)
    evs = p.to_server()
    assert evs == [End(1, [(b"grpc-foo", b"bar")])]


def test_response_respects_the_client_window_and_resumes_on_window_update() -> None:
    p = Pair()
    p.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    p.to_server()
    p.to_client()
    p.request(1, GET)
    p.server.send_head(1, 200, [], end=False)
    assert p.server.send_data(1, b"y" * 5000, end=True) == 1000
    evs = p.to_client()
    got = sum(len(e.data) for e in evs if isinstance(e, h2.events.DataReceived))
    assert got == 1000
    p.client.acknowledge_received_data(1000, 1)
    evs = p.to_server()
    assert any(isinstance(e, WindowOpen) and e.stream_id in (0, 1) for e in evs)
    assert p.server.send_window(1) >= 1000


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ([*GET, (b"connection", b"close")], "connection-specific"),
        ([*GET, (b"transfer-encoding", b"chunked")], "connection-specific"),
        ([*GET, (b"upgrade", b"h2c")], "connection-specific"),
        ([*GET, (b"te", b"gzip")], "te other than trailers"),
        ([*GET, (b"X-Upper", b"1")], "invalid field"),
        ([*GET, (b"x-a", b"line\r\nbreak")], "invalid field"),
        ([*GET, (b"x-a", b" padded")], "invalid field"),
        (GET[:3], "missing :scheme or :path"),
        ([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")], "no :authority"),
        ([*GET, (b"host", b"other.test")], "Host differs"),
        ([*GET, (b":path", b"/x")], "duplicate :path"),
        ([(b":method", b"GET"), (b"x-a", b"1"), *GET[1:]], "pseudo-header after"),
        ([*GET, (b":status", b"200")], "unknown pseudo-header"),
        ([(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"x")],
         "origin form"),
        ([(b":method", b"CONNECT"), (b":authority", b"a:443"), (b":path", b"/")], "CONNECT with"),
        ([(b":method", b"CONNECT"), (b":protocol", b"websocket"), *GET[1:]], ":protocol without"),
    ],
)
def test_malformed_requests_are_stream_errors(fields: list[tuple[bytes, bytes]], why: str) -> None:
    p = Pair()
    evs = p.request(1, fields)
    assert len(evs) == 1 and isinstance(evs[0], Cancelled), evs
    assert evs[0].code == PROTOCOL_ERROR and not evs[0].by_client and why in evs[0].reason
    p.to_client()
    assert p.resets() == {1: PROTOCOL_ERROR}
    # the connection goes on: the next stream is served
    evs = p.request(3, GET)
    assert isinstance(evs[0], Request) and evs[0].stream_id == 3


def test_host_stands_in_for_a_missing_authority() -> None:
    p = Pair()
    evs = p.request(1, [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                        (b"host", b"h.test")])
    assert isinstance(evs[0], Request) and evs[0].authority == b"h.test"
    assert evs[0].headers == []


def test_extended_connect_when_announced() -> None:
    p = Pair(connect_protocol=True)
    assert p.client.remote_settings.enable_connect_protocol == 1
    evs = p.request(1, [(b":method", b"CONNECT"), (b":protocol", b"websocket"), *GET[1:],
                        (b"sec-websocket-version", b"13")], end=False)
    assert isinstance(evs[0], Request) and evs[0].protocol == b"websocket"
    assert not evs[0].end_stream


def test_streams_past_the_limit_are_refused_not_queued() -> None:
    p = Pair(H2Limits(max_concurrent_streams=3))
    for sid in (1, 3, 5):
        assert isinstance(p.request(sid, GET)[0], Request)
    evs = p.raw_request(7)
    assert len(evs) == 1 and isinstance(evs[0], Cancelled) and evs[0].code == REFUSED
    assert p.raw_resets() == {7: REFUSED}
    # one finishes: the next one is taken
    p.server.send_head(1, 204, [], end=True)
    assert isinstance(p.raw_request(9)[0], Request)
    assert len(p.server.active) == 3


def test_ten_thousand_streams_past_the_limit_end_in_goaway_with_bounded_state() -> None:
    p = Pair(H2Limits(max_concurrent_streams=10))
    sid = 1
    closing: list[Closing] = []
    while sid < 20_000 and not closing:
        evs = p.raw_request(sid)
        closing = [e for e in evs if isinstance(e, Closing)]
        sid += 2
    assert closing and closing[0].code == ENHANCE_YOUR_CALM
    assert len(p.server.active) == 10
    assert sid < 300  # it stopped after max(100, limit) refusals, not 10,000
    goaways = [pl for t, _, _, pl in p.raw_out() if t == GOAWAY]
    assert len(goaways) == 1 and int.from_bytes(goaways[0][4:8], "big") == ENHANCE_YOUR_CALM
    # the GOAWAY is graceful (the 10 in flight may finish); another stream ends it at once
    evs = p.server.receive_data(frame(HEADERS, END_HEADERS, 999, b""), p.now)
    assert [(e.code, e.graceful) for e in evs if isinstance(e, Closing)] == [
        (ENHANCE_YOUR_CALM, False)
    ]
    assert p.server.receive_data(frame(HEADERS, END_HEADERS, 1001, b""), p.now) == []


def test_rapid_reset_within_one_read_never_reaches_a_backend() -> None:
    p = Pair()
    data = b""
    for sid in range(1, 41, 2):
        data += frame(HEADERS, END_HEADERS | END_STREAM, sid, p.client.encoder.encode(GET))
        data += frame(RST_STREAM, 0, sid, struct.pack(">L", 8))
    evs = p.to_server(data)
    assert evs == []


def test_rapid_reset_flood_is_stopped_with_enhance_your_calm() -> None:
    p = Pair(H2Limits(max_resets_per_second=50))
    handed_on = 0
    closing = None
    for sid in range(1, 20_001, 2):
        evs = p.raw_request(sid)
        handed_on += sum(isinstance(e, Request) for e in evs)
        evs = p.to_server(frame(RST_STREAM, 0, sid, struct.pack(">L", 8)))
        closing = next((e for e in evs if isinstance(e, Closing)), None)
        if closing:
            break
    assert closing is not None and closing.code == ENHANCE_YOUR_CALM
    assert "RST_STREAM" in closing.reason
    assert handed_on <= 51
    p.to_client()
    assert p.goaway()[0] == ENHANCE_YOUR_CALM  # type: ignore[index]


def test_resets_below_the_rate_are_fine_and_the_count_restarts_each_second() -> None:
    p = Pair(H2Limits(max_resets_per_second=5))
    sid = 1
    for second in range(4):
        p.now = 2000.0 + second
        for _ in range(5):
            p.request(sid, GET, end=False)
            p.client.reset_stream(sid)
            evs = p.to_server()
            assert not any(isinstance(e, Closing) for e in evs)
            sid += 2


@pytest.mark.parametrize(
    ("frames", "what"),
    [
        ([frame(SETTINGS, 0, 0, b"")] * 21, "SETTINGS"),
        ([frame(PING, 0, 0, b"\0" * 8)] * 101, "PING"),
        ([frame(PRIORITY, 0, 1, b"\0\0\0\0\x10")] * 101, "PRIORITY"),
        ([frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 1))] * 10_001, "WINDOW_UPDATE"),
    ],
)
def test_control_frame_floods_get_enhance_your_calm(frames: list[bytes], what: str) -> None:
    p = Pair()
    evs = p.to_server(b"".join(frames))
    assert isinstance(evs[-1], Closing) and evs[-1].code == ENHANCE_YOUR_CALM
    assert what in evs[-1].reason
    p.to_client()
    assert p.goaway()[0] == ENHANCE_YOUR_CALM  # type: ignore[index]


def test_empty_data_flood() -> None:
    p = Pair()
    p.request(1, GET, end=False)
    evs = p.to_server(frame(DATA, 0, 1, b"") * 101)
    assert isinstance(evs[-1], Closing) and "empty frame" in evs[-1].reason


def test_zero_length_continuation_flood_is_cut_after_a_few_frames() -> None:
    p = Pair(H2Limits(max_continuation_frames=16))
    block = p.client.encoder.encode(GET)
    data = frame(HEADERS, END_STREAM, 1, block) + frame(CONTINUATION, 0, 1, b"") * 100_000
    evs = p.to_server(data)
    assert len(evs) == 1 and isinstance(evs[0], Closing) and evs[0].code == ENHANCE_YOUR_CALM
    assert "CONTINUATION" in evs[0].reason
    assert len(p.server.guard.buf) == 0  # nothing of the flood was kept


def test_header_block_over_the_size_limit() -> None:
    p = Pair(H2Limits(max_header_list_size=4096))
    block = p.client.encoder.encode([*GET, (b"x-big", b"v" * 3000)])
    data = frame(HEADERS, 0, 1, block) + frame(CONTINUATION, END_HEADERS, 1, b"\x00" * 3000)
    evs = p.to_server(data)
    assert isinstance(evs[-1], Closing) and "header block over 4096" in evs[-1].reason


def test_hpack_bomb_is_refused_on_decoded_size() -> None:
    p = Pair(H2Limits(max_header_list_size=16 * 1024))
    # one 4,000-byte value into the dynamic table, then referenced 100 times: 4 KiB encoded,
    # 400 KB decoded.
    lit = b"\x40\x01x" + b"\x7f" + _hpack_int(4000 - 127) + b"v" * 4000
    block = p.client.encoder.encode(GET) + lit + b"\xbe" * 100
    evs = p.to_server(frame(HEADERS, END_HEADERS | END_STREAM, 1, block))
    assert len(evs) == 1 and isinstance(evs[0], Closing) and not evs[0].graceful


def _hpack_int(n: int) -> bytes:
    out = bytearray()
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def test_oversized_frame_and_wrong_preface() -> None:
    p = Pair()
    evs = p.to_server(struct.pack(">L", 16385)[1:] + bytes([DATA, 0]) + struct.pack(">L", 1))
    assert isinstance(evs[-1], Closing) and evs[-1].code == FRAME_SIZE_ERROR
    s = H2Server()
    s.initiate()
    evs = s.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 0.0)
    assert isinstance(evs[-1], Closing) and evs[-1].code == PROTOCOL_ERROR


def test_byte_at_a_time_gives_the_same_events() -> None:
    whole = Pair()
    whole.client.send_headers(1, GET, end_stream=False)
    whole.client.send_data(1, b"abc", end_stream=True)
    data = whole.client.data_to_send()
    evs_whole = whole.to_server(data)
    split = Pair()
    split.client.send_headers(1, GET, end_stream=False)
    split.client.send_data(1, b"abc", end_stream=True)
    data = split.client.data_to_send()
    evs_split: list[object] = []
    for i in range(len(data)):
        evs_split += split.to_server(data[i : i + 1])
    assert [type(e) for e in evs_split] == [type(e) for e in evs_whole] == [Request, Body, End]


def test_drain_sends_goaway_and_in_flight_streams_finish() -> None:
    p = Pair()
    p.request(1, GET)
    p.request(3, GET)
    p.server.drain()
    p.to_client()
    assert p.goaway() == (NO_ERROR, 3)
    # the client may still have opened 5 before it saw the GOAWAY: refused, never handed on
    block = p.client.encoder.encode(GET)
    evs = p.to_server(frame(HEADERS, END_HEADERS | END_STREAM, 5, block))
    assert evs == []
    p.server.send_head(1, 200, [], end=False)
    p.server.send_data(1, b"done", end=True)
    p.server.send_head(3, 204, [], end=True)
    out = p.server.data_to_send()
    assert out and p.server.idle


def test_client_goaway_lets_in_flight_streams_finish() -> None:
    p = Pair()
    p.request(1, GET, end=False)
    p.client.close_connection()
    evs = p.to_server()
    assert isinstance(evs[-1], Closing) and evs[-1].graceful
    p.server.send_head(1, 200, [], end=True)
    assert p.server.data_to_send()


def test_client_reset_cancels_and_frees_the_slot() -> None:
    p = Pair(H2Limits(max_concurrent_streams=1))
    p.request(1, GET, end=False)
    p.client.reset_stream(1, 8)
    evs = p.to_server()
    assert evs == [Cancelled(1, 8)]
    assert isinstance(p.request(3, GET)[0], Request)
