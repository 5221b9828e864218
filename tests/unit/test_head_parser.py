"""parse_head against h11 as the oracle: whatever h11 refuses we refuse, and what we accept
h11 parses to the same fields.  (We refuse more than h11: that is check_raw_head's job and is
covered by the corpus; here the point is never to accept what h11 would not.)"""

from __future__ import annotations

import h11
from hypothesis import example, given, settings
from hypothesis import strategies as st

from muxproxy.core.frontend_h11 import HeadLimits, RequestHead, check_raw_head, parse_head
from muxproxy.core.request_head import UnderscorePolicy, common_head, read_head
from muxproxy.errors import ClientError

LIMITS = HeadLimits(underscore_headers="allow")

NAME = st.one_of(
    st.sampled_from([b"Host", b"host", b"X-A", b"content-length", b"Transfer-Encoding", b"a b"]),
    st.binary(min_size=0, max_size=8).filter(lambda b: b":" not in b and b"\r" not in b),
)
VALUE = st.one_of(
    st.sampled_from(
        [b"a.test", b"5", b"chunked", b"Chunked", b" x ", b"\tv\t", b"", b"a\x00b", b"\xff"]
    ),
    st.binary(max_size=12).filter(lambda b: b"\r" not in b and b"\n" not in b),
)
LINE = st.one_of(
    st.builds(lambda n, sep, v: n + sep + v, NAME, st.sampled_from([b":", b": ", b" :"]), VALUE),
    st.binary(max_size=10).filter(lambda b: b"\r" not in b and b"\n" not in b),
)
TARGET = st.one_of(
    st.sampled_from([b"/", b"/a?b", b"*", b"http://a.test/x"]), st.binary(max_size=6)
)


def h11_parse(raw: bytes) -> list[tuple[bytes, bytes]] | None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    try:
        ev = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    assert isinstance(ev, h11.Request)
    return [(n, v) for n, v in ev.headers]


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from([b"GET", b"POST", b"G T"]),
    TARGET,
    st.sampled_from([b"1.1", b"1.0"]),
    st.lists(LINE, max_size=5),
)
@example(b"GET", b"/", b"1.1", [b"Host : a"])
@example(b"GET", b"/", b"1.1", [b"Host: a", b"Host: b"])
@example(b"GET", b"/", b"1.1", [b"X: a"])
@example(b"GET", b"/\xff", b"1.1", [b"Host: a"])
@example(b"GET", b"/", b"1.1", [b"Host: a", b"X: a\x00"])
def test_never_accept_what_h11_refuses(
    method: bytes, target: bytes, version: bytes, lines: list[bytes]
) -> None:
    raw = (
        b"%s %s HTTP/%s\r\n" % (method, target, version)
        + b"".join(line + b"\r\n" for line in lines)
        + b"\r\n"
    )
    try:
        check_raw_head(raw, LIMITS)
        head = parse_head(raw, LIMITS)
    except ClientError:
        return
    fields = h11_parse(raw)
    assert fields is not None, "accepted a head h11 refuses"
    if target[:1] == b"/":
        assert head.target == target
    assert head.headers == fields


def full_parse(raw: bytes, limits: HeadLimits) -> RequestHead | ClientError:
    try:
        check_raw_head(raw, limits)
        return parse_head(raw, limits)
    except ClientError as exc:
        return exc


COMMON_NAME = st.sampled_from(
    [
        b"Host",
        b"host",
        b"Content-Length",
        b"Connection",
        b"Expect",
        b"Upgrade",
        b"X_Y",
        b"Transfer-Encoding",
        b"Accept",
        b"x-a",
        b"a b",
        b"",
    ]
)
COMMON_VALUE = st.sampled_from(
    [
        b"a.test",
        b"a.test:80",
        b"[::1]:8",
        b"bad host",
        b"5",
        b"05",
        b"1,1",
        b"-1",
        b"0",
        b"close",
        b"Keep-Alive, Close",
        b"keep-alive",
        b"100-continue",
        b"websocket",
        b"chunked",
        b" x ",
        b"\tv\t",
        b"",
        b"\xff",
        b"a\x7fb",
        b"a\x00b",
        b"9" * 21,
    ]
)
COMMON_LINE = st.builds(
    lambda n, sep, v: n + sep + v, COMMON_NAME, st.sampled_from([b":", b": ", b" :"]), COMMON_VALUE
)


@settings(max_examples=1500, deadline=None)
@given(
    st.sampled_from([b"GET", b"POST", b"CONNECT", b"G T", b"HEAD"]),
    st.sampled_from([b"/", b"/a?b", b"/#f", b"*", b"http://a.test/x", b"/\xff", b"/" + b"a" * 40]),
    st.sampled_from([b"1.1", b"1.0", b"2.0", b"1.2"]),
    st.lists(COMMON_LINE, max_size=5),
    st.sampled_from(["reject", "drop", "allow"]),
    st.sampled_from([(64 * 1024, 100, 8 * 1024, 1024**3), (60, 2, 20, 4)]),
)
@example(
    b"GET",
    b"/",
    b"1.1",
    [b"Host: a.test", b"Connection: close"],
    "reject",
    (64 * 1024, 100, 8 * 1024, 1024**3),
)
def test_fast_path_agrees_with_the_full_parser(
    method: bytes,
    target: bytes,
    version: bytes,
    lines: list[bytes],
    underscores: UnderscorePolicy,
    sizes: tuple[int, int, int, int],
) -> None:
    """common_head answers a head only as check_raw_head + parse_head would, field for field;
    anything they refuse it leaves to them (so refusals and their reasons have one source)."""
    limits = HeadLimits(*sizes, underscore_headers=underscores)
    raw = (
        b"%s %s HTTP/%s\r\n" % (method, target, version)
        + b"".join(line + b"\r\n" for line in lines)
        + b"\r\n"
    )
    fast = common_head(raw, limits)
    full = full_parse(raw, limits)
    if fast is not None:
        assert fast == full
    got = read_head(raw, limits) if not isinstance(full, ClientError) else None
    assert got == (None if isinstance(full, ClientError) else full)


def test_fast_path_takes_the_common_heads() -> None:
    """The plain requests of browsers, curl and load generators do take the fast path."""
    limits = HeadLimits()
    for raw in [
        b"GET /small HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"POST /api HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nConnection: keep-alive\r\n"
        b"User-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n",
        b"GET /x?q=1 HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\nCookie: a=b; c=d\r\n\r\n",
    ]:
        head = common_head(raw, limits)
        assert head is not None and head == full_parse(raw, limits), raw
