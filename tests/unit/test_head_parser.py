"""parse_head against h11 as the oracle: whatever h11 refuses we refuse, and what we accept
h11 parses to the same fields.  (We refuse more than h11: that is check_raw_head's job and is
covered by the corpus; here the point is never to accept what h11 would not.)"""

from __future__ import annotations

import h11
from hypothesis import example, given, settings
from hypothesis import strategies as st

from muxproxy.core.frontend_h11 import HeadLimits, check_raw_head, parse_head
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
