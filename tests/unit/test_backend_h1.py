"""core/backend_h1.py with byte strings: what it writes, what it makes of what it reads."""

from __future__ import annotations

import pytest

from muxproxy.core.backend_h1 import H1Backend

GET = [
    (b":method", b"GET"),
    (b":scheme", b"http"),
    (b":authority", b"app.example"),
    (b":path", b"/a?b=1"),
    (b"accept", b"*/*"),
    (b"te", b"trailers"),  # hop-by-hop in HTTP/1.1: not forwarded
]


def post(length: int | None) -> list[tuple[bytes, bytes]]:
    head = [(b":method", b"POST"), (b":authority", b"app"), (b":path", b"/up")]
    if length is not None:
        head.append((b"content-length", b"%d" % length))
    return head


def test_request_head_is_http11_with_host() -> None:
    core = H1Backend()
    assert core.free_streams() == 1
    st = core.open_stream(GET, True)
    assert core.free_streams() == 0
    assert core.data_to_send() == b"GET /a?b=1 HTTP/1.1\r\nhost: app.example\r\naccept: */*\r\n\r\n"
    assert st.stream_id == 1


def test_keepalive_reuse_after_content_length_response() -> None:
    core = H1Backend()
    st = core.open_stream(GET, True)
    core.data_to_send()
    up = core.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhel")
    assert st.headers == [(b":status", b"200"), (b"content-length", b"5"), (b"x-a", b"1")]
    assert st.chunks == [(b"hel", 3)] and not st.ended and up.streams == [st]
    up = core.receive_data(b"lo")
    assert st.ended and up.capacity_changed and not up.goaway
    assert core.free_streams() == 1 and not core.streams
    st2 = core.open_stream(GET, True)
    assert st2.stream_id == 2
    assert core.data_to_send().startswith(b"GET /a?b=1 HTTP/1.1\r\n")


def test_chunked_response_with_trailers() -> None:
    core = H1Backend()
    st = core.open_stream(GET, True)
    core.data_to_send()
    core.receive_data(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n"
        b"grpc-status: 0\r\n\r\n"
    )
    assert st.headers == [(b":status", b"200")]  # framing fields are the proxy's business
    assert b"".join(d for d, _ in st.chunks) == b"abcde"
    assert st.trailers == [(b"grpc-status", b"0")] and st.ended
    assert core.free_streams() == 1


def test_close_delimited_response_ends_at_eof_and_drains() -> None:
    core = H1Backend()
    st = core.open_stream(GET, True)
    core.data_to_send()
    core.receive_data(b"HTTP/1.0 200 OK\r\n\r\nall of it")
    assert not st.ended
    up = core.receive_data(b"")
    assert st.ended and st.reset_code is None
    assert b"".join(d for d, _ in st.chunks) == b"all of it"
    assert core.closed and core.goaway_last_stream_id == 1 and up.goaway


def test_connection_close_response_drains_like_goaway() -> None:
    core = H1Backend()
    st = core.open_stream(GET, True)
    core.data_to_send()
    up = core.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    assert st.ended and up.goaway and core.draining and not core.closed
    assert core.goaway_last_stream_id == 1 and core.free_streams() == 0
    assert (b"connection", b"close") not in (st.headers or [])


def test_fields_named_by_connection_are_dropped() -> None:
    core = H1Backend()
    st = core.open_stream(GET, True)
    core.data_to_send()
    core.receive_data(
        b"HTTP/1.1 200 OK\r\nConnection: x-private\r\nX-Private: 1\r\nKeep-Alive: t=5\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    assert st.headers == [(b":status", b"200"), (b"content-length", b"0")]


def test_interim_responses_are_skipped() -> None:
    core = H1Backend()
    st = core.open_stream(GET, True)
    core.data_to_send()
    core.receive_data(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
    assert st.headers == [(b":status", b"204")] and st.ended


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        (6, b"POST /up HTTP/1.1\r\nhost: app\r\ncontent-length: 6\r\n\r\nabcdef"),
        (None, b"POST /up HTTP/1.1\r\nhost: app\r\ntransfer-encoding: chunked\r\n\r\n"
               b"6\r\nabcdef\r\n0\r\n\r\n"),
    ],
)
def test_request_body_framing(length: int | None, expected: bytes) -> None:
    core = H1Backend()
    st = core.open_stream(post(length), False)
    assert core.send_window(st.stream_id) > 0
    core.send_data(st.stream_id, b"abcdef")
    core.end_stream(st.stream_id)
    assert core.data_to_send() == expected


def test_send_window_is_room_in_the_write_buffer() -> None:
    core = H1Backend(stream_window=100)
    st = core.open_stream(post(1000), False)
    room = core.send_window(st.stream_id)
    core.send_data(st.stream_id, b"x" * room)
    assert core.send_window(st.stream_id) == 0
    core.data_to_send()
    assert core.send_window(st.stream_id) == 100


def test_reading_pauses_until_the_client_takes_the_body() -> None:
    core = H1Backend(stream_window=10)
    st = core.open_stream(GET, True)
    core.data_to_send()
    core.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n" + b"y" * 12)
    assert core.read_paused
    core.consumed(st.stream_id, 12)
    assert not core.read_paused


def test_close_before_any_byte_was_written_is_refused() -> None:
    core = H1Backend()
    st = core.open_stream(GET, True)  # queued, never taken by the writer
    up = core.receive_data(b"")
    assert st.refused and st.reset_code is not None and up.closed


def test_close_after_the_request_was_written_is_not_replayable() -> None:
    core = H1Backend()
    st = core.open_stream(GET, True)
    core.data_to_send()
    core.receive_data(b"")
    assert not st.refused and st.reset_code is not None
    assert st.error == "backend closed the connection before responding"


def test_close_mid_response_fails_the_stream() -> None:
    core = H1Backend()
    st = core.open_stream(GET, True)
    core.data_to_send()
    core.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    up = core.receive_data(b"")
    assert not st.ended and st.reset_code is not None and not st.refused
    assert st.error == "backend closed the connection mid-response"
    assert up.closed and core.goaway_last_stream_id is None  # a failure, not a drain


def test_idle_close_is_routine() -> None:
    core = H1Backend()
    st = core.open_stream(GET, True)
    core.data_to_send()
    core.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert st.ended
    up = core.receive_data(b"")
    assert up.goaway and core.closed and core.goaway_last_stream_id is not None


def test_garbage_from_the_backend_fails_the_stream() -> None:
    core = H1Backend()
    st = core.open_stream(GET, True)
    core.data_to_send()
    up = core.receive_data(b"SSH-2.0-OpenSSH\r\n\r\n")
    assert up.closed and st.reset_code is not None and not st.refused
    assert core.close_reason.startswith("backend sent invalid HTTP/1.1")


def test_early_response_then_reset_closes_the_connection() -> None:
    core = H1Backend()
    st = core.open_stream(post(100), False)
    core.data_to_send()
    core.receive_data(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
    assert st.ended and st.stream_id in core.streams  # the request is not over
    core.reset_stream(st.stream_id)
    assert core.closed and core.goaway_last_stream_id == st.stream_id


def test_discard_returns_the_flow_of_unrelayed_chunks() -> None:
    core = H1Backend(stream_window=10)
    st = core.open_stream(GET, True)
    core.data_to_send()
    core.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n" + b"z" * 12)
    assert core.read_paused
    core.discard(st)
    assert not core.read_paused and st.chunks == []
