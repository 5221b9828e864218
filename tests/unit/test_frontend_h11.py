"""ClientSession: the hardened HTTP/1.1 server side, driven by a real h11 client (no sockets)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from muxproxy.core.frontend_h11 import (
    CLOSED,
    NEED_DATA,
    Body,
    ClientSession,
    EndOfRequest,
    Event,
    HeadLimits,
    RequestHead,
    ResponseFramingError,
)
from muxproxy.errors import ClientError

Header = tuple[bytes, bytes]
H11Events = list[Any]  # h11's event union has no common attributes for mypy to check


class ConnectionPair:
    """A real h11 client and our ClientSession, with bytes passed by hand (h11's test shape)."""

    def __init__(self, limits: HeadLimits | None = None) -> None:
        self.client = h11.Connection(h11.CLIENT)
        self.server = ClientSession(limits or HeadLimits())

    def send(self, *events: h11.Event, one_byte: bool = False) -> list[Event]:
        """The client sends ``events``; return what the session makes of them."""
        data = b"".join(self.client.send(e) or b"" for e in events)
        return self.feed(data, one_byte=one_byte)

    def feed(self, data: bytes, *, one_byte: bool = False) -> list[Event]:
        chunks = [data[i : i + 1] for i in range(len(data))] if one_byte else [data]
        out: list[Event] = []
        for chunk in chunks:
            self.server.receive_data(chunk)
            out += drain(self.server)
        return merge_bodies(out)

    def respond(self, status: int, headers: list[Header], body: bytes = b"") -> H11Events:
        """The session answers; return the events the h11 client sees."""
        s = self.server
        data = s.response_head(status, headers)
        if body:
            data += s.response_body(body)
        data += s.response_end()
        return self.client_events(data)

    def client_events(self, data: bytes) -> H11Events:
        self.client.receive_data(data)
        out: H11Events = []
        while True:
            ev = self.client.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return out
            out.append(ev)
            if type(ev) is h11.EndOfMessage:
                return out


def drain(s: ClientSession) -> list[Event]:
    out: list[Event] = []
    while True:
        ev = s.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)
        if ev is CLOSED:
            return out


def merge_bodies(events: Iterable[Event]) -> list[Event]:
    """Body events may be split anywhere; join adjacent ones (and normalise to bytes)."""
    out: list[Event] = []
    for ev in events:
        if isinstance(ev, Body):
            if out and isinstance(out[-1], Body):
                out[-1] = Body(bytes(out[-1].data) + bytes(ev.data))
            else:
                out.append(Body(bytes(ev.data)))
        else:
            out.append(ev)
    return out


def head(
    method: bytes,
    target: bytes,
    headers: list[Header],
    *,
    authority: bytes = b"a.test",
    version: bytes = b"1.1",
    content_length: int | None = None,
    has_body: bool = False,
    keep_alive: bool = True,
    expects_continue: bool = False,
) -> RequestHead:
    return RequestHead(
        method=method,
        target=target,
        authority=authority,
        headers=headers,
        http_version=version,
        has_body=has_body,
        content_length=content_length,
        keep_alive=keep_alive,
        expects_continue=expects_continue,
    )


OK = [(b"content-length", b"2")]

# --- ordinary exchanges -------------------------------------------------------------------------


@pytest.mark.parametrize("one_byte", [False, True])
def test_get(one_byte: bool) -> None:
    p = ConnectionPair()
    req = h11.Request(
        method="GET", target="/x?y=1", headers=[("Host", "a.test"), ("Accept", "*/*")]
    )
    events = p.send(req, h11.EndOfMessage(), one_byte=one_byte)
    assert events == [
        head(b"GET", b"/x?y=1", [(b"host", b"a.test"), (b"accept", b"*/*")]),
        EndOfRequest([]),
    ]
    assert p.server.request_complete
    got = p.respond(200, [(b"content-type", b"text/plain"), *OK], b"ok")
    assert [type(e) for e in got] == [h11.Response, h11.Data, h11.EndOfMessage]
    assert got[0].status_code == 200 and got[1].data == b"ok"
    assert p.server.start_next_cycle()
    p.client.start_next_cycle()
    events = p.send(
        h11.Request(method="GET", target="/2", headers=[("Host", "a.test")]),
        h11.EndOfMessage(),
        one_byte=one_byte,
    )
    assert events[0] == head(b"GET", b"/2", [(b"host", b"a.test")])


@pytest.mark.parametrize("one_byte", [False, True])
def test_post_content_length(one_byte: bool) -> None:
    p = ConnectionPair()
    req = h11.Request(
        method="POST", target="/u", headers=[("Host", "a.test"), ("Content-Length", "11")]
    )
    events = p.send(
        req,
        h11.Data(data=b"hello "),
        h11.Data(data=b"world"),
        h11.EndOfMessage(),
        one_byte=one_byte,
    )
    assert events == [
        head(
            b"POST",
            b"/u",
            [(b"host", b"a.test"), (b"content-length", b"11")],
            content_length=11,
            has_body=True,
        ),
        Body(b"hello world"),
        EndOfRequest([]),
    ]


def test_post_content_length_zero_has_no_body() -> None:
    p = ConnectionPair()
    req = h11.Request(method="POST", target="/", headers=[("Host", "h"), ("Content-Length", "0")])
    (rh, end) = p.send(req, h11.EndOfMessage())
    assert isinstance(rh, RequestHead) and not rh.has_body and rh.content_length == 0
    assert end == EndOfRequest([])


@pytest.mark.parametrize("one_byte", [False, True])
def test_post_chunked_with_trailers(one_byte: bool) -> None:
    p = ConnectionPair()
    req = h11.Request(
        method="POST", target="/c", headers=[("Host", "a.test"), ("Transfer-Encoding", "chunked")]
    )
    events = p.send(
        req,
        h11.Data(data=b"abc"),
        h11.Data(data=b"defgh"),
        h11.EndOfMessage(headers=[("X-Checksum", "42"), ("Content-Length", "8")]),
        one_byte=one_byte,
    )
    assert events == [
        head(
            b"POST",
            b"/c",
            [(b"host", b"a.test"), (b"transfer-encoding", b"chunked")],
            has_body=True,
        ),
        Body(b"abcdefgh"),
        EndOfRequest([]),  # request trailers are dropped, as nginx does
    ]


def test_request_complete_only_after_the_body() -> None:
    p = ConnectionPair()
    req = h11.Request(method="PUT", target="/", headers=[("Host", "h"), ("Content-Length", "4")])
    p.send(req, h11.Data(data=b"ab"))
    assert not p.server.request_complete
    assert p.send(h11.Data(data=b"cd"), h11.EndOfMessage()) == [Body(b"cd"), EndOfRequest([])]
    assert p.server.request_complete


def test_head_response_has_no_body() -> None:
    p = ConnectionPair()
    p.send(h11.Request(method="HEAD", target="/", headers=[("Host", "h")]), h11.EndOfMessage())
    data = p.server.response_head(200, [(b"content-length", b"1234")]) + p.server.response_end()
    assert data.endswith(b"\r\n\r\n") and b"content-length: 1234\r\n" in data
    got = p.client_events(data)
    assert [type(e) for e in got] == [h11.Response, h11.EndOfMessage]
    assert p.server.start_next_cycle()


def test_absolute_form_is_reduced() -> None:
    p = ConnectionPair()
    events = p.feed(b"GET http://A.test:8080/p?q HTTP/1.1\r\nHost: a.test:8080\r\n\r\n")
    rh = events[0]
    assert isinstance(rh, RequestHead)
    assert (rh.target, rh.authority) == (b"/p?q", b"A.test:8080")


def test_absolute_form_without_path() -> None:
    p = ConnectionPair()
    rh = p.feed(b"GET https://a.test?x HTTP/1.1\r\nHost: a.test\r\n\r\n")[0]
    assert isinstance(rh, RequestHead) and rh.target == b"/?x"


def test_options_asterisk() -> None:
    p = ConnectionPair()
    rh = p.feed(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")[0]
    assert isinstance(rh, RequestHead) and rh.target == b"*"


def test_leading_empty_lines_are_ignored() -> None:
    p = ConnectionPair()
    events = p.feed(b"\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert events == [head(b"GET", b"/", [(b"host", b"h")], authority=b"h"), EndOfRequest([])]


# --- connection management ----------------------------------------------------------------------


def test_keep_alive() -> None:
    p = ConnectionPair()
    for i in range(3):
        events = p.send(
            h11.Request(method="GET", target=f"/{i}", headers=[("Host", "h")]), h11.EndOfMessage()
        )
        assert isinstance(events[0], RequestHead) and events[0].target == f"/{i}".encode()
        got = p.respond(200, OK, b"ok")
        assert b"close" not in dict(got[0].headers).get(b"connection", b"")
        assert p.server.start_next_cycle()
        p.client.start_next_cycle()


def test_connection_close() -> None:
    p = ConnectionPair()
    p.send(
        h11.Request(method="GET", target="/", headers=[("Host", "h"), ("Connection", "close")]),
        h11.EndOfMessage(),
    )
    got = p.respond(200, OK, b"ok")
    assert (b"connection", b"close") in got[0].headers
    assert not p.server.start_next_cycle()


def test_http10_closes() -> None:
    p = ConnectionPair()
    events = p.feed(b"GET /old HTTP/1.0\r\n\r\n")
    assert events == [
        head(b"GET", b"/old", [], authority=b"", version=b"1.0", keep_alive=False),
        EndOfRequest([]),
    ]
    data = p.server.response_head(200, OK) + p.server.response_body(b"ok")
    data += p.server.response_end()
    assert data.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close\r\n" in data.lower()
    assert not p.server.start_next_cycle()


def test_clean_close_between_requests() -> None:
    p = ConnectionPair()
    p.send(h11.Request(method="GET", target="/", headers=[("Host", "h")]), h11.EndOfMessage())
    p.respond(200, OK, b"ok")
    assert p.server.start_next_cycle()
    assert not p.server.head_started
    p.server.receive_data(b"")
    assert p.server.next_event() is CLOSED


def test_close_at_start() -> None:
    s = ClientSession()
    assert s.next_event() is NEED_DATA
    s.receive_data(b"")
    assert s.next_event() is CLOSED


def test_close_mid_head() -> None:
    s = ClientSession()
    s.receive_data(b"GET / HTTP/1.1\r\nHo")
    assert s.head_started
    assert s.next_event() is NEED_DATA
    s.receive_data(b"")
    with pytest.raises(ClientError) as info:
        s.next_event()
    assert info.value.status_hint == 400


def test_close_mid_body() -> None:
    s = ClientSession()
    s.receive_data(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")
    assert isinstance(s.next_event(), RequestHead)
    assert s.next_event() == Body(b"abc")
    assert s.next_event() is NEED_DATA
    s.receive_data(b"")
    with pytest.raises(ClientError):
        s.next_event()


def test_close_right_after_a_complete_request() -> None:
    s = ClientSession()
    s.receive_data(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    s.receive_data(b"")
    assert isinstance(s.next_event(), RequestHead)
    assert s.next_event() == EndOfRequest([])
    s.response_head(200, OK)
    s.response_body(b"ok")
    s.response_end()
    # either the session stops here, or the next cycle reports the close at once
    assert not s.start_next_cycle() or s.next_event() is CLOSED


# --- response framing (serialised by the session itself, checked by a real h11 client) --------


def exchange(raw_request: bytes) -> ClientSession:
    s = ClientSession()
    s.receive_data(raw_request)
    drain(s)
    return s


def parse_response(data: bytes, method: str = "GET", version: str = "1.1") -> H11Events:
    c = h11.Connection(h11.CLIENT)
    headers = [("Host", "h")] if version == "1.1" else []
    c.send(h11.Request(method=method, target="/", headers=headers, http_version=version))
    c.send(h11.EndOfMessage())
    c.receive_data(data)
    out: H11Events = []
    while type(ev := c.next_event()) is not h11.EndOfMessage:
        assert ev is not h11.NEED_DATA, "response incomplete"
        out.append(ev)
    out.append(ev)
    return out


def test_response_with_content_length() -> None:
    s = exchange(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    data = s.response_head(200, [(b"content-length", b"5"), (b"x-a", b"1")])
    assert data == b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\n"
    data += s.response_body(b"hel") + s.response_body(b"lo") + s.response_end()
    resp, body, end = parse_response(data)
    assert isinstance(resp, h11.Response) and resp.status_code == 200
    assert (b"x-a", b"1") in resp.headers
    assert isinstance(body, h11.Data) and body.data == b"hello"
    assert isinstance(end, h11.EndOfMessage)
    assert s.start_next_cycle()


def test_response_without_length_is_chunked_for_http11() -> None:
    s = exchange(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    data = s.response_head(200, [(b"content-type", b"text/plain")])
    assert b"transfer-encoding: chunked\r\n" in data
    data += s.response_body(b"abc") + s.response_body(b"") + s.response_body(b"de")
    data += s.response_end([(b"x-checksum", b"7")])
    events = parse_response(data)
    assert b"".join(bytes(e.data) for e in events if isinstance(e, h11.Data)) == b"abcde"
    assert events[-1] == h11.EndOfMessage(headers=[(b"x-checksum", b"7")])
    assert s.start_next_cycle()


@pytest.mark.parametrize(
    "request_line,fields",
    [
        (b"GET / HTTP/1.1", [(b"content-length", b"3")]),  # framed by its length
        (b"HEAD / HTTP/1.1", []),  # no body at all
        (b"GET / HTTP/1.0", []),  # delimited by the close
    ],
)
def test_trailers_go_out_only_with_chunked_framing(
    request_line: bytes, fields: list[tuple[bytes, bytes]]
) -> None:
    """Trailers need a chunked body to ride on; otherwise they are dropped, never written
    as stray bytes after the body."""
    s = exchange(request_line + b"\r\nHost: h\r\n\r\n")
    head = s.response_head(200, fields)
    body = s.response_body(b"abc")
    assert s.response_end([(b"x-checksum", b"7")]) == b""
    assert b"x-checksum" not in head + body


def test_response_without_length_to_http10_is_delimited_by_close() -> None:
    s = exchange(b"GET / HTTP/1.0\r\n\r\n")
    data = s.response_head(200, [])
    assert b"transfer-encoding" not in data and b"connection: close\r\n" in data
    data += s.response_body(b"abc") + s.response_end()
    assert data.endswith(b"\r\n\r\nabc")
    assert not s.start_next_cycle()


@pytest.mark.parametrize(
    ("request_line", "status", "headers"),
    [
        (b"HEAD / HTTP/1.1", 200, [(b"content-length", b"1234")]),
        (b"HEAD / HTTP/1.1", 200, []),
        (b"GET / HTTP/1.1", 204, []),
        (b"GET / HTTP/1.1", 304, [(b"etag", b'"x"')]),
    ],
)
def test_responses_without_a_body(request_line: bytes, status: int, headers: list[Header]) -> None:
    s = exchange(request_line + b"\r\nHost: h\r\n\r\n")
    data = s.response_head(status, headers)
    assert b"transfer-encoding" not in data
    assert s.response_body(b"ignored") == b""
    data += s.response_end()
    assert data.endswith(b"\r\n\r\n")
    events = parse_response(data, method=request_line.split()[0].decode())
    assert [type(e) for e in events] == [h11.Response, h11.EndOfMessage]
    assert s.start_next_cycle()


def test_response_longer_than_its_content_length() -> None:
    s = exchange(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    s.response_head(200, [(b"content-length", b"3")])
    s.response_body(b"ab")
    with pytest.raises(ResponseFramingError):
        s.response_body(b"cd")


def test_response_shorter_than_its_content_length() -> None:
    s = exchange(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    s.response_head(200, [(b"content-length", b"3")])
    s.response_body(b"ab")
    with pytest.raises(ResponseFramingError):
        s.response_end()


@pytest.mark.parametrize(
    "headers",
    [
        [(b"content-length", b"3"), (b"content-length", b"3")],
        [(b"content-length", b"-3")],
        [(b"content-length", b"3, 3")],
        [(b"content-length", b"")],
    ],
)
def test_bad_response_content_length(headers: list[Header]) -> None:
    s = exchange(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    with pytest.raises(ResponseFramingError):
        s.response_head(200, headers)


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        b"HEAD / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
    ],
)
@pytest.mark.parametrize("length", [True, False])
def test_response_announces_close_exactly_when_the_connection_closes(
    raw: bytes, length: bool
) -> None:
    """RFC 9112 §9.3/§9.6: a client must not be left believing a closing connection persists."""
    s = exchange(raw)
    data = s.response_head(200, [(b"content-length", b"2")] if length else [])
    data += s.response_body(b"ok") + s.response_end()
    head_ = data.split(b"\r\n\r\n")[0].lower()
    announces_close = b"\r\nconnection: close" in head_
    assert announces_close is not s.start_next_cycle(), data


# --- pipelining ---------------------------------------------------------------------------------

PIPELINE = (
    b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n"
    b"POST /2 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
    b"POST /3 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n"
    b"GET /4 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
)
PIPELINE_EVENTS: list[Event] = [
    head(b"GET", b"/1", [(b"host", b"h")], authority=b"h"),
    EndOfRequest([]),
    head(
        b"POST",
        b"/2",
        [(b"host", b"h"), (b"content-length", b"5")],
        authority=b"h",
        content_length=5,
        has_body=True,
    ),
    Body(b"hello"),
    EndOfRequest([]),
    head(
        b"POST",
        b"/3",
        [(b"host", b"h"), (b"transfer-encoding", b"chunked")],
        authority=b"h",
        has_body=True,
    ),
    Body(b"abcde"),
    EndOfRequest([]),  # request trailers are dropped
    head(
        b"GET",
        b"/4",
        [(b"host", b"h"), (b"connection", b"close")],
        authority=b"h",
        keep_alive=False,
    ),
    EndOfRequest([]),
]


def serve(chunks: Iterable[bytes], limits: HeadLimits | None = None) -> tuple[list[Event], bytes]:
    """Feed ``chunks`` one receive_data at a time, answering each request in order."""
    s = ClientSession(limits or HeadLimits())
    events: list[Event] = []
    out = b""
    open_ = True
    for chunk in chunks:
        s.receive_data(chunk)
        while open_:
            ev = s.next_event()
            if ev is NEED_DATA:
                break
            events.append(ev)
            if isinstance(ev, EndOfRequest):
                assert s.request is not None
                n = s.request.target
                out += s.response_head(200, [(b"content-length", str(len(n)).encode())])
                out += s.response_body(n) + s.response_end()
                open_ = s.start_next_cycle()
    return merge_bodies(events), out


def client_responses(data: bytes, count: int) -> list[bytes]:
    c = h11.Connection(h11.CLIENT)
    bodies = []
    c.receive_data(data)
    for _ in range(count):
        c.send(h11.Request(method="GET", target="/", headers=[("Host", "h")]))
        c.send(h11.EndOfMessage())
        body = b""
        while type(ev := c.next_event()) is not h11.EndOfMessage:
            assert ev is not h11.NEED_DATA
            if type(ev) is h11.Data:
                body += ev.data
        bodies.append(body)
        if c.our_state is h11.MUST_CLOSE:
            break
        c.start_next_cycle()
    return bodies


def test_pipelined_requests_in_one_read() -> None:
    events, out = serve([PIPELINE])
    assert events == PIPELINE_EVENTS
    assert client_responses(out, 4) == [b"/1", b"/2", b"/3", b"/4"]


def test_pipelined_requests_one_byte_at_a_time() -> None:
    events, out = serve(PIPELINE[i : i + 1] for i in range(len(PIPELINE)))
    assert events == PIPELINE_EVENTS
    assert client_responses(out, 4) == [b"/1", b"/2", b"/3", b"/4"]


def test_next_request_waits_for_start_next_cycle() -> None:
    s = ClientSession()
    s.receive_data(PIPELINE)
    assert isinstance(s.next_event(), RequestHead)
    assert s.next_event() == EndOfRequest([])
    # the second request is already buffered, but strictly in order: nothing before a response
    assert s.next_event() is NEED_DATA
    assert not s.start_next_cycle()  # no response yet: no next cycle either
    assert s.next_event() is NEED_DATA
    s.response_head(204, [])
    s.response_end()
    assert s.start_next_cycle()
    rh = s.next_event()
    assert isinstance(rh, RequestHead) and rh.target == b"/2"
    assert s.request is rh


def test_pipeline_then_close() -> None:
    stream = b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n"
    s = ClientSession()
    s.receive_data(stream)
    s.receive_data(b"")
    seen = []
    while True:
        ev = s.next_event()
        if ev is CLOSED:
            break
        if isinstance(ev, RequestHead):
            seen.append(ev.target)
        if isinstance(ev, EndOfRequest):
            s.response_head(204, [])
            s.response_end()
            assert s.start_next_cycle()
    assert seen == [b"/1", b"/2"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, len(PIPELINE) - 1), max_size=12, unique=True))
def test_property_split_anywhere_gives_the_same_events(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(PIPELINE)]
    chunks = [PIPELINE[a:b] for a, b in itertools.pairwise(points)]
    events, out = serve(chunks)
    assert events == PIPELINE_EVENTS
    assert client_responses(out, 4) == [b"/1", b"/2", b"/3", b"/4"]


# --- 100-continue -------------------------------------------------------------------------------


def test_expect_100_continue() -> None:
    p = ConnectionPair()
    req = h11.Request(
        method="POST",
        target="/",
        headers=[("Host", "h"), ("Content-Length", "3"), ("Expect", "100-continue")],
    )
    (rh,) = p.send(req)
    assert isinstance(rh, RequestHead) and rh.expects_continue
    data = p.server.continue_bytes()
    assert data.startswith(b"HTTP/1.1 100 ")
    (info,) = p.client_events(data)
    assert isinstance(info, h11.InformationalResponse) and info.status_code == 100
    assert p.server.continue_bytes() == b""  # once only
    assert p.send(h11.Data(data=b"abc"), h11.EndOfMessage()) == [Body(b"abc"), EndOfRequest([])]
    got = p.respond(200, OK, b"ok")
    assert got[0].status_code == 200


def test_no_continue_without_expect() -> None:
    p = ConnectionPair()
    req = h11.Request(method="POST", target="/", headers=[("Host", "h"), ("Content-Length", "3")])
    p.send(req)
    assert p.server.continue_bytes() == b""


def test_no_continue_before_the_head() -> None:
    s = ClientSession()
    s.receive_data(b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n")
    assert s.next_event() is NEED_DATA
    assert s.continue_bytes() == b""


def test_no_continue_for_http10() -> None:
    s = ClientSession()
    s.receive_data(b"POST / HTTP/1.0\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    assert isinstance(s.next_event(), RequestHead)
    assert s.continue_bytes() == b""


def test_no_continue_once_the_body_arrives() -> None:
    p = ConnectionPair()
    req = h11.Request(
        method="POST",
        target="/",
        headers=[("Host", "h"), ("Content-Length", "3"), ("Expect", "100-continue")],
    )
    p.send(req, h11.Data(data=b"a"))
    assert p.server.continue_bytes() == b""


# --- errors -------------------------------------------------------------------------------------


def test_error_after_a_complete_request_keeps_the_connection() -> None:
    p = ConnectionPair()
    p.send(h11.Request(method="GET", target="/", headers=[("Host", "h")]), h11.EndOfMessage())
    got = p.client_events(p.server.error_response(502, "backend down"))
    assert got[0].status_code == 502
    assert got[1].data == b"backend down\n"
    assert p.server.start_next_cycle()


def test_error_for_head_request_has_no_body() -> None:
    p = ConnectionPair()
    p.send(h11.Request(method="HEAD", target="/", headers=[("Host", "h")]), h11.EndOfMessage())
    got = p.client_events(p.server.error_response(404, "no route"))
    assert [type(e) for e in got] == [h11.Response, h11.EndOfMessage]
    assert got[0].status_code == 404


def test_error_before_the_request_is_complete_closes() -> None:
    p = ConnectionPair()
    req = h11.Request(method="POST", target="/", headers=[("Host", "h"), ("Content-Length", "9")])
    p.send(req, h11.Data(data=b"abc"))
    data = p.server.error_response(413, "too large")
    assert data.startswith(b"HTTP/1.1 413 ")
    assert b"connection: close\r\n" in data
    assert p.server.error_response(500, "again") == b""  # only one response
    assert not p.server.start_next_cycle()


def test_error_after_response_started_sends_nothing() -> None:
    p = ConnectionPair()
    p.send(h11.Request(method="GET", target="/", headers=[("Host", "h")]), h11.EndOfMessage())
    p.server.response_head(200, [(b"content-length", b"10")])
    assert p.server.error_response(502, "x") == b""


def test_error_on_a_malformed_head_says_close() -> None:
    s = ClientSession()
    s.receive_data(b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x01\r\n\r\n")
    with pytest.raises(ClientError) as info:
        s.next_event()
    data = s.error_response(info.value.status_hint, info.value.reason)
    c = h11.Connection(h11.CLIENT)
    c.send(h11.Request(method="GET", target="/", headers=[("Host", "h")]))
    c.receive_data(data)
    resp = c.next_event()
    assert isinstance(resp, h11.Response) and resp.status_code == 400
    assert (b"connection", b"close") in resp.headers
    assert not s.start_next_cycle()


LIMITS = HeadLimits(max_header_bytes=1024, max_headers=8, max_uri_bytes=128, max_body=1000)
GET = b"GET / HTTP/1.1\r\nHost: h\r\n"

MALFORMED = [
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
        id="cl-and-te",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        400,
        id="te-and-cl",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        400,
        id="two-cl-differing",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        400,
        id="two-cl-identical",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 3\r\n\r\nabc",
        400,
        id="cl-list-identical",
    ),
    pytest.param(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +3\r\n\r\nabc", 400, id="cl-sign"),
    pytest.param(
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, id="te-on-http10"
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", 501, id="te-gzip"
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        501,
        id="te-gzip-chunked",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        501,
        id="te-chunked-twice",
    ),
    pytest.param(GET + b"X-A: a\r\n b\r\n\r\n", 400, id="obs-fold"),
    pytest.param(GET + b"X-A: a\r\n\tb\r\n\r\n", 400, id="obs-fold-tab"),
    pytest.param(b"GET / HTTP/1.1\r\n Host: h\r\n\r\n", 400, id="leading-space-line"),
    pytest.param(b"GET / HTTP/1.1\nHost: h\n\n", 400, id="bare-lf-everywhere"),
    pytest.param(GET + b"X-A: a\nX-B: b\r\n\r\n", 400, id="bare-lf"),
    pytest.param(GET + b"X-A: a\n\r\n", 400, id="bare-lf-before-end"),
    pytest.param(GET + b"X-A: a\rX-B: b\r\n\r\n", 400, id="bare-cr"),
    pytest.param(GET + b"X-A: a\r\r\n\r\n", 400, id="bare-cr-eol"),
    pytest.param(GET + b"X-A: a\x01b\r\n\r\n", 400, id="ctl-x01"),
    pytest.param(GET + b"X-A: a\x7fb\r\n\r\n", 400, id="ctl-del"),
    pytest.param(GET + b"X-A: a\x00b\r\n\r\n", 400, id="nul"),
    pytest.param(b"GET /a\x00 HTTP/1.1\r\nHost: h\r\n\r\n", 400, id="nul-in-target"),
    pytest.param(GET + b"X_Forwarded_For: 1.2.3.4\r\n\r\n", 400, id="underscore-name"),
    pytest.param(GET + b"X-A : a\r\n\r\n", 400, id="space-before-colon"),
    pytest.param(b"GET / HTTP/1.1\r\nX-A: a\r\n\r\n", 400, id="missing-host"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, id="two-hosts"),
    pytest.param(
        GET + b"".join(b"X-%d: v\r\n" % i for i in range(8)) + b"\r\n", 431, id="too-many-headers"
    ),
    pytest.param(GET + b"X-Big: " + b"v" * 1100 + b"\r\n\r\n", 431, id="head-too-large-one-read"),
    pytest.param(GET + b"X-Big: " + b"v" * 1100, 431, id="head-too-large-unfinished"),
    pytest.param(b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 414, id="uri-too-long"),
    pytest.param(b"GET /" + b"a" * 300, 414, id="uri-too-long-unfinished"),
    pytest.param(b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505, id="http2-request-line"),
    pytest.param(b"GET / HTTP/1.2\r\nHost: h\r\n\r\n", 505, id="http1.2"),
    pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", (505, 400), id="h2-preface"),
    pytest.param(b"GET / HTTP/1.1 extra\r\nHost: h\r\n\r\n", 400, id="bad-request-line"),
    pytest.param(b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n", 400, id="space-in-target"),
    pytest.param(
        b"GET http://b.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
        400,
        id="absolute-form-host-mismatch",
    ),
    pytest.param(
        b"GET http://u@a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n", 400, id="absolute-form-userinfo"
    ),
    pytest.param(b"GET ftp://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n", 400, id="ftp-target"),
    pytest.param(b"GET /a#frag HTTP/1.1\r\nHost: h\r\n\r\n", 400, id="fragment"),
    pytest.param(b"GET * HTTP/1.1\r\nHost: h\r\n\r\n", 400, id="asterisk-not-options"),
    pytest.param(b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n", 501, id="connect"),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1001\r\n\r\n",
        413,
        id="content-length-over-max-body",
    ),
]


@pytest.mark.parametrize(("raw", "status"), MALFORMED)
@pytest.mark.parametrize("one_byte", [False, True], ids=["whole", "bytewise"])
def test_malformed_heads(raw: bytes, status: int | tuple[int, ...], one_byte: bool) -> None:
    s = ClientSession(LIMITS)
    chunks = [raw[i : i + 1] for i in range(len(raw))] if one_byte else [raw]
    with pytest.raises(ClientError) as info:
        for chunk in chunks:
            s.receive_data(chunk)
            ev = s.next_event()
            # nothing may be forwarded: not even the head
            assert ev is NEED_DATA, ev
        s.receive_data(b"")
        s.next_event()
    allowed = status if isinstance(status, tuple) else (status,)
    assert info.value.status_hint in allowed, info.value


@pytest.mark.parametrize(
    "raw",
    [
        GET + b"".join(b"X-%d: v\r\n" % i for i in range(7)) + b"\r\n",  # max_headers exactly
        b"GET /" + b"a" * 127 + b" HTTP/1.1\r\nHost: h\r\n\r\n",  # max_uri_bytes exactly
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\n",  # max_body exactly
        GET + b"X-A: a\tb \xc3\xa9\r\n\r\n",  # HTAB and obs-text are fine
        b"GET / HTTP/1.0\r\n\r\n",  # no Host is fine on 1.0
        b"get / HTTP/1.1\r\nHost: h\r\n\r\n",  # methods are case-sensitive tokens
    ],
)
def test_limits_are_inclusive_and_legal_heads_pass(raw: bytes) -> None:
    s = ClientSession(LIMITS)
    s.receive_data(raw)
    assert isinstance(s.next_event(), RequestHead)


def test_head_limit_counts_the_whole_head() -> None:
    raw = GET + b"X-Big: " + b"v" * (1024 - len(GET) - 11) + b"\r\n\r\n"
    assert len(raw) == 1024
    s = ClientSession(LIMITS)
    s.receive_data(raw)
    assert isinstance(s.next_event(), RequestHead)
    s = ClientSession(LIMITS)
    s.receive_data(raw.replace(b"X-Big: ", b"X-Big: v"))
    with pytest.raises(ClientError) as info:
        s.next_event()
    assert info.value.status_hint == 431


@pytest.mark.parametrize("one_byte", [False, True])
def test_chunked_body_over_max_body(one_byte: bool) -> None:
    raw = (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"200\r\n"
        + b"x" * 512
        + b"\r\n"
        + b"200\r\n"
        + b"y" * 512
        + b"\r\n0\r\n\r\n"
    )
    s = ClientSession(LIMITS)
    chunks = [raw[i : i + 1] for i in range(len(raw))] if one_byte else [raw]
    received = 0
    with pytest.raises(ClientError) as info:
        for chunk in chunks:
            s.receive_data(chunk)
            while (ev := s.next_event()) is not NEED_DATA:
                assert not isinstance(ev, EndOfRequest)
                if isinstance(ev, Body):
                    received += len(ev.data)
    assert info.value.status_hint == 413
    assert received <= LIMITS.max_body


def test_chunked_body_at_max_body_passes() -> None:
    raw = (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"3e8\r\n"
        + b"x" * 1000
        + b"\r\n0\r\n\r\n"
    )
    _, out = serve([raw], LIMITS)
    assert out.startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nabc\r\n0\r\n\r\n",  # bad chunk size
        b"3\nabc\r\n0\r\n\r\n",  # bare LF after the size
        b"3\r\nabcd\r\n0\r\n\r\n",  # chunk longer than announced
    ],
)
def test_malformed_chunked_body(body: bytes) -> None:
    s = ClientSession()
    s.receive_data(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert isinstance(s.next_event(), RequestHead)
    s.receive_data(body)
    with pytest.raises(ClientError) as info:
        while s.next_event() is not NEED_DATA:
            pass
    assert info.value.status_hint == 400


@pytest.mark.parametrize(
    "trailer",
    [
        b"X-A: a\x01b\r\n",  # control character
        b"X-A: a\nX-B: b\r\n",  # bare LF
        b"X-A: a\r\n b\r\n",  # obs-fold
        b"X-A: a\rb\r\n",  # bare CR
        b"X A: b\r\n",  # name outside token
        b"\n",  # the section ended by a bare LF
    ],
    ids=["ctl", "bare-lf", "obs-fold", "bare-cr", "bad-name", "bare-lf-end"],
)
@pytest.mark.parametrize("one_byte", [False, True], ids=["whole", "bytewise"])
def test_malformed_request_trailers_are_refused(trailer: bytes, one_byte: bool) -> None:
    """h11 accepts these trailer sections; the same bytes in a head are refused, so they are
    refused here too (before h11 parses them), and never forwarded."""
    s = ClientSession()
    raw = (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n" + trailer + b"\r\n"
    )
    chunks = [raw[i : i + 1] for i in range(len(raw))] if one_byte else [raw]
    events: list[Event] = []
    with pytest.raises(ClientError) as info:
        for chunk in chunks:
            s.receive_data(chunk)
            events += drain(s)
    assert info.value.status_hint == 400
    assert not any(isinstance(e, EndOfRequest) for e in events)


def test_well_formed_trailers_are_dropped_even_framing_ones() -> None:
    """Trailer fields naming framing or routing fields (content-length, transfer-encoding,
    host) must never reach the backend: every request trailer is dropped."""
    s = ClientSession()
    s.receive_data(
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nContent-Length: 99\r\nHost: evil\r\n"
        b"Transfer-Encoding: chunked\r\nX-Checksum: 1\r\n\r\n"
    )
    assert isinstance(s.next_event(), RequestHead)
    assert s.next_event() == Body(b"abc")
    assert s.next_event() == EndOfRequest([])


# --- edge hardening: what h11 accepts and an edge proxy must not -------------------------------


def events_of(raw: bytes, limits: HeadLimits | None = None) -> list[Event]:
    s = ClientSession(limits or HeadLimits())
    s.receive_data(raw)
    return drain(s)


def refusal(raw: bytes, limits: HeadLimits | None = None, *, one_byte: bool = False) -> int:
    """The status a session refuses ``raw`` with (fed whole or bytewise); no head may come out."""
    s = ClientSession(limits or HeadLimits())
    chunks = [raw[i : i + 1] for i in range(len(raw))] if one_byte else [raw]
    with pytest.raises(ClientError) as info:
        for chunk in chunks:
            s.receive_data(chunk)
            assert drain(s) == []
    return info.value.status_hint


def test_te_mutation_matrix_is_refused_or_unambiguous() -> None:
    """All 1520 variants of the smuggling scanners' exhaustive Transfer-Encoding matrix:
    refused at the head (nothing forwarded), or forwarded once, framed by Content-Length, in
    agreement with a strict RFC 9112 reading (which sees no Transfer-Encoding field)."""
    from tests.corpus import reference
    from tests.corpus.te_matrix import BODY, matrix

    forwarded = []
    for name, raw in matrix():
        s = ClientSession()
        s.receive_data(raw)
        try:
            events = drain(s)
        except ClientError as exc:
            assert exc.status_hint in (400, 501), name
            continue
        forwarded.append(name)
        assert merge_bodies(events)[1:] == [Body(BODY), EndOfRequest([])], name
        (ref,) = reference.parse(raw).requests
        assert ref.complete and ref.body == BODY, name
        assert b"transfer-encoding" not in [n for n, _ in ref.headers], name
    assert len(forwarded) == 10


CHUNKED = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    "body",
    [
        b"000000000000000F\r\n" + b"x" * 15 + b"\r\n0\r\n\r\n",  # 16 hex digits: the most
        b"5;name\r\nhello\r\n0\r\n\r\n",
        b'5; a=b ;c="d \\" e"\r\nhello\r\n0\r\n\r\n',
        b"5 \r\nhello\r\n0 \r\n\r\n",  # trailing whitespace: h11 and nginx accept it too
        b"5\r\nhello\r\n0\r\nX-T: a\tb \xc3\xa9\r\nX-U:\r\n\r\n",
    ],
)
@pytest.mark.parametrize("one_byte", [False, True], ids=["whole", "bytewise"])
def test_valid_chunked_bodies_pass_the_scanner(body: bytes, one_byte: bool) -> None:
    p = ConnectionPair()
    events = p.feed(CHUNKED + body, one_byte=one_byte)
    assert isinstance(events[0], RequestHead)
    assert isinstance(events[-1], EndOfRequest) and events[-1].trailers == []
    assert len(events[1].data) in (5, 15) if isinstance(events[1], Body) else False


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"00000000000000005\r\nhello\r\n0\r\n\r\n", 400),
        (b"5;\r\nhello\r\n0\r\n\r\n", 400),  # ";" without a name: h11 takes it
        (b"5 ;a\r\nhello\r\n0\r\n\r\n", 400),  # space before ";": h11 refuses, so do we
        (b"5;a=\r\nhello\r\n0\r\n\r\n", 400),
        (b'5;a="b\r\nhello\r\n0\r\n\r\n', 400),
        (b"5;a\rb\r\nhello\r\n0\r\n\r\n", 400),
        (b"5;a=\x7f\r\nhello\r\n0\r\n\r\n", 400),
        (b"5;" + b"a" * 5000 + b"\r\nhello\r\n0\r\n\r\n", 400),
        (b"5;" + b"a" * 5000, 400),  # too long before its end even arrives
        (b"5\r\nhelloXX", 400),
        (b"40000001\r\n", 413),  # declared past max_body: refused before any data
        (b"3e8\r\n" + b"x" * 1000 + b"\r\n1\r\n", 413),
        (b"0\r\n" + b"X-T: v\r\n" * 9 + b"\r\n", 431),  # more trailer fields than max_headers
        (b"0\r\nX-T: " + b"v" * 1100 + b"\r\n\r\n", 431),
    ],
    ids=lambda v: repr(v)[:40] if isinstance(v, bytes) else str(v),
)
@pytest.mark.parametrize("one_byte", [False, True], ids=["whole", "bytewise"])
def test_chunked_bodies_the_scanner_refuses(body: bytes, status: int, one_byte: bool) -> None:
    small = status == 431 or body.startswith(b"3e8")  # LIMITS: 1000-byte body, 8 fields
    s = ClientSession(LIMITS if small else HeadLimits())
    chunks = [body[i : i + 1] for i in range(len(body))] if one_byte else [body]
    s.receive_data(CHUNKED)
    assert isinstance(s.next_event(), RequestHead)
    with pytest.raises(ClientError) as info:
        for chunk in chunks:
            s.receive_data(chunk)
            for ev in drain(s):
                assert not isinstance(ev, EndOfRequest)
    assert info.value.status_hint == status


def test_bad_body_in_the_same_read_as_its_head_refuses_the_head() -> None:
    """Nothing is forwarded when the body that came with the head is already known bad."""
    assert refusal(CHUNKED + b"00000000000000005\r\nhello\r\n0\r\n\r\n") == 400


def test_scanner_stops_at_the_end_of_the_body() -> None:
    """The bytes after a chunked body are the next request's: checked as a head, not a chunk."""
    events, _ = serve([CHUNKED + b"3\r\nabc\r\n0\r\n\r\nGET /next HTTP/1.1\r\nHost: h\r\n\r\n"])
    assert [e.target for e in events if isinstance(e, RequestHead)] == [b"/", b"/next"]


@pytest.mark.parametrize(
    "host",
    [b"a.test", b"A.Test:8080", b"127.0.0.1:80", b"[::1]", b"[2001:db8::1]:443", b"a%41.test",
     b"xn--bcher-kva.example", b"a.test:"],
)
def test_valid_hosts(host: bytes) -> None:
    rh = events_of(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")[0]
    assert isinstance(rh, RequestHead) and rh.authority == host


@pytest.mark.parametrize(
    "host",
    [b"", b"a b", b"a/b", b"u@a", b"a\\b", b"a%zz", b"[::1", b"a:80:80", b"a:123456", b'"a"'],
)
def test_invalid_hosts_are_refused(host: bytes) -> None:
    assert refusal(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n") == 400


def test_absolute_form_authority_is_checked_like_a_host() -> None:
    assert refusal(b"GET http://a%zz/ HTTP/1.0\r\n\r\n") == 400


@pytest.mark.parametrize("one_byte", [False, True])
def test_two_empty_lines_are_ignored_a_third_is_refused(one_byte: bool) -> None:
    ok = b"\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n"
    p = ConnectionPair()
    assert isinstance(p.feed(ok, one_byte=one_byte)[0], RequestHead)
    assert refusal(b"\r\n" + ok, one_byte=one_byte) == 400


@pytest.mark.parametrize(
    "partial",
    [
        b"GET / HTTP/1.1\r\nHost: h\n",
        b"GET / HTTP/1.1\r\nHost: h\rX",
        b"GET / HTTP/1.1\r\nHost: h\r\n X",
        b"GET / HTTP/1.1\r\nHost: h\x01",
        b"\n",
    ],
)
def test_incomplete_heads_are_refused_as_soon_as_they_are_bad(partial: bytes) -> None:
    """Not when header_timeout ends them: the bad byte is seen in the read that brings it."""
    assert refusal(partial) == 400
    assert refusal(partial, one_byte=True) == 400


def test_a_cr_at_the_end_of_a_read_waits_for_its_lf() -> None:
    s = ClientSession()
    for piece in (b"GET / HTTP/1.1\r", b"\nHost: h\r", b"\n\r"):
        s.receive_data(piece)
        assert s.next_event() is NEED_DATA
    s.receive_data(b"\n")
    assert isinstance(s.next_event(), RequestHead)


def test_a_large_head_trickled_byte_by_byte_is_read_once() -> None:
    raw = GET + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 500) for i in range(60)) + b"\r\n"
    s = ClientSession()
    for i in range(len(raw)):
        s.receive_data(raw[i : i + 1])
        ev = s.next_event()
        assert ev is NEED_DATA or i == len(raw) - 1
    assert isinstance(ev, RequestHead) and len(ev.headers) == 61
    assert s._scanned == 0  # reset for the next head


@pytest.mark.parametrize(
    ("policy", "field", "outcome"),
    [
        ("reject", b"X_A: 1", 400),
        ("drop", b"X_A: 1", []),
        ("allow", b"X_A: 1", [(b"x_a", b"1")]),
        ("allow", b"X_Forwarded_For: 1", 400),
        ("allow", b"Content_Length: 1", 400),
        ("allow", b"Transfer_Encoding: chunked", 400),
        ("drop", b"Transfer_Encoding: chunked", []),
    ],
)
def test_underscore_policies(
    policy: Any, field: bytes, outcome: int | list[Header]
) -> None:
    raw = b"GET / HTTP/1.1\r\nHost: h\r\n" + field + b"\r\n\r\n"
    limits = HeadLimits(underscore_headers=policy)
    if isinstance(outcome, int):
        assert refusal(raw, limits) == outcome
    else:
        rh = events_of(raw, limits)[0]
        assert isinstance(rh, RequestHead) and rh.headers == [(b"host", b"h"), *outcome]


@pytest.mark.parametrize("one_byte", [False, True], ids=["whole", "bytewise"])
def test_one_framer_hands_bytes_after_any_body_to_the_next_head(one_byte: bool) -> None:
    """Content-Length and chunked bodies are framed by the session itself: the bytes after a
    body (here the next pipelined request) go back to the head buffer, whatever the framing."""
    s = ClientSession()
    wire = (
        b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
        b"POST /b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n"
        b"GET /c HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    for piece in [wire[i : i + 1] for i in range(len(wire))] if one_byte else [wire]:
        s.receive_data(piece)
    seen: list[tuple[bytes, bytes]] = []
    while True:
        head = s.next_event()
        assert isinstance(head, RequestHead)
        body = b""
        while True:
            ev = s.next_event()
            if isinstance(ev, Body):
                body += ev.data
                continue
            assert isinstance(ev, EndOfRequest) and ev.trailers == []
            break
        seen.append((head.target, body))
        assert s.request_complete
        s.response_head(204, [])
        s.response_end()
        if head.target == b"/c":
            break
        assert s.start_next_cycle()
    assert seen == [(b"/a", b"hello"), (b"/b", b"abcde"), (b"/c", b"")]


def test_eof_inside_a_content_length_body_is_refused() -> None:
    s = ClientSession()
    s.receive_data(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")
    assert isinstance(s.next_event(), RequestHead)
    assert s.next_event() == Body(b"abc")
    assert s.next_event() is NEED_DATA
    s.receive_data(b"")
    with pytest.raises(ClientError) as e:
        s.next_event()
    assert e.value.status_hint == 400 and not s.request_complete
