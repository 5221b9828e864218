"""The client-side HTTP/2 core's edges (issue 14): the graceful GOAWAY(ENHANCE_YOUR_CALM),
interim responses, and plain CONNECT.

Same set-up as ``test_frontend_h2.py``: an ``h2`` client state machine and :class:`H2Server`,
no sockets, the time passed in.
"""

from __future__ import annotations

import h2.events
import pytest

from muxproxy.core.frontend_h2 import Body, Cancelled, Closing, End, H2Limits, Request
from muxproxy.core.h2wire import (
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    GOAWAY,
    HEADERS,
    PING,
    SETTINGS,
    frame,
)

from .test_frontend_h2 import GET, Pair

POST = [(b":method", b"POST"), *GET[1:]]


def closings(evs: list[object]) -> list[tuple[int, bool]]:
    return [(e.code, e.graceful) for e in evs if isinstance(e, Closing)]


@pytest.mark.parametrize(
    ("flood", "limits"),
    [
        (frame(PING, 0, 0, b"\0" * 8) * 101, H2Limits()),
        (frame(SETTINGS, 0, 0, b"") * 20, H2Limits()),  # (+ the client's first one)
        (frame(DATA, 0, 1, b"") * 101, H2Limits()),
    ],
    ids=["PING", "SETTINGS", "empty DATA"],
)
def test_a_first_flood_is_a_graceful_goaway_and_the_stream_in_flight_goes_on(
    flood: bytes, limits: H2Limits
) -> None:
    p = Pair(limits)
    assert isinstance(p.request(1, POST, end=False)[0], Request)
    evs = p.to_server(flood)
    assert closings(evs) == [(ENHANCE_YOUR_CALM, True)]
    assert p.server.calm and not p.server.closed
    p.to_client()
    assert p.goaway() == (ENHANCE_YOUR_CALM, 1)  # last_stream_id: the one in flight
    # the stream in flight finishes: its body comes in, its response goes out (by hand: h2's
    # client state machine sends nothing after a GOAWAY; curl and nghttp do)
    evs = p.to_server(frame(DATA, END_STREAM, 1, b"abc"))
    assert [type(e) for e in evs] == [Body, End]
    p.server.send_head(1, 200, [], end=False)
    assert p.server.send_data(1, b"ok", end=True) == 2
    out = p.raw_out()
    assert [(t, sid) for t, _, sid, _ in out] == [(HEADERS, 1), (DATA, 1)]
    assert out[-1][1] & END_STREAM


def test_flooding_on_after_the_goaway_closes_at_once() -> None:
    p = Pair()
    p.request(1, GET, end=False)
    evs = p.to_server(frame(PING, 0, 0, b"\0" * 8) * 102)  # the 102nd: a second trip
    assert closings(evs) == [(ENHANCE_YOUR_CALM, True), (ENHANCE_YOUR_CALM, False)]
    assert p.server.closed
    assert p.server.receive_data(frame(PING, 0, 0, b"\0" * 8), p.now) == []


def test_a_new_stream_after_the_calm_goaway_closes_at_once() -> None:
    p = Pair()
    p.request(1, GET, end=False)
    assert closings(p.to_server(frame(PING, 0, 0, b"\0" * 8) * 101)) == [
        (ENHANCE_YOUR_CALM, True)
    ]
    evs = p.to_server(frame(HEADERS, END_HEADERS | END_STREAM, 3, p.client.encoder.encode(GET)))
    assert closings(evs) == [(ENHANCE_YOUR_CALM, False)]
    assert not any(isinstance(e, Request) for e in evs)
    frames = [pl for t, _, _, pl in p.raw_out() if t == GOAWAY]
    assert [int.from_bytes(pl[:4], "big") for pl in frames] == [1, 1]  # never raised


def test_structural_limits_stay_hard() -> None:
    p = Pair(H2Limits(max_continuation_frames=2))
    p.request(1, GET, end=False)
    block = p.client.encoder.encode(GET)
    data = frame(HEADERS, END_STREAM, 3, block) + frame(0x9, 0, 3, b"") * 5
    assert closings(p.to_server(data)) == [(ENHANCE_YOUR_CALM, False)]


def test_send_informational_100_then_the_response() -> None:
    p = Pair()
    p.request(1, [*POST, (b"expect", b"100-continue")], end=False)
    p.server.send_informational(1, [(b":status", b"100")])
    evs = p.to_client()
    info = [e for e in evs if isinstance(e, h2.events.InformationalResponseReceived)]
    assert len(info) == 1 and dict(info[0].headers)[b":status"] == b"100"
    p.client.send_data(1, b"body", end_stream=True)
    p.to_server()
    p.server.send_head(1, 201, [], end=True)
    evs = p.to_client()
    assert any(isinstance(e, h2.events.ResponseReceived) for e in evs)


@pytest.mark.parametrize("status", [b"101", b"200", b"1000", b""])
def test_send_informational_refuses_what_is_not_interim(status: bytes) -> None:
    p = Pair()
    p.request(1, POST, end=False)
    with pytest.raises(ValueError):
        p.server.send_informational(1, [(b":status", status)] if status else [])


def test_well_formed_plain_connect_is_a_request_the_io_layer_answers_501() -> None:
    p = Pair()
    evs = p.request(1, [(b":method", b"CONNECT"), (b":authority", b"a.test:443")], end=False)
    assert isinstance(evs[0], Request)
    assert (evs[0].method, evs[0].protocol, evs[0].path) == (b"CONNECT", None, b"")


def test_body_longer_than_content_length_is_a_stream_error() -> None:
    p = Pair()
    p.request(1, [*POST, (b"content-length", b"3")], end=False)
    p.request(3, GET, end=False)
    evs = p.to_server(frame(DATA, END_STREAM, 1, b"more"))  # 4 bytes of a declared 3
    assert not p.server.closed and 3 in p.server.active  # the other stream lives on
    assert len(evs) == 1 and isinstance(evs[0], Cancelled) and evs[0].stream_id == 1
