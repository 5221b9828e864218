"""Property tests: refuse, or forward exactly what a strict RFC 9112 parser reads.

Three sources of input, each fed whole and split at random points:
random bytes (mostly refused, never a crash), mutations of valid requests (the interesting
ones: near-valid heads, where parsers disagree), and the corpus files.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from muxproxy.core.frontend_h11 import HeadLimits
from tests.corpus import load, reference

from .invariant import check, run_session

SEEDS = [
    b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
    b"GET /p?q=1 HTTP/1.1\r\nHost: a.test:8080\r\nAccept: */*\r\nX-A: a b\r\n\r\n",
    b"POST /u HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /c HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'3;ext="v"\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n',
    b"GET /1 HTTP/1.1\r\nHost: a.test\r\n\r\n"
    b"POST /2 HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\n\r\nabc"
    b"GET /3 HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    b"GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\n\r\n",
    b"GET /old HTTP/1.0\r\n\r\n",
    b"\r\nPUT /e HTTP/1.1\r\nHost: [::1]:80\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
]
# Bytes and fragments that sit on the boundaries parsers disagree about.
ALPHABET = b'\r\n\t :;,_-"\\\x00\x01\x0b\x0c\x7f\x80\xa0\xff0159aAfFxX/?#@*'
FRAGMENTS = [
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b"\t",
    b"\r\n ",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked, gzip\r\n",
    b"Content-Length: 3\r\n",
    b"Content-Length: 0\r\n",
    b"Content-Length: 1, 1\r\n",
    b"Host: b.test\r\n",
    b"Connection: close, x-forwarded-for\r\n",
    b"X_Y: 1\r\n",
    b"0\r\n\r\n",
    b"5\r\nhello\r\n",
    b"ffffffffffffffffff\r\n",
    b"GET /smuggled HTTP/1.1\r\nHost: a.test\r\n\r\n",
    b"HTTP/1.1",
    b"chunked",
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 4))
        # Half the time, act right at a delimiter: that is where parsers disagree.
        marks = [i for i, b in enumerate(data) if b in b"\r\n:; ,"]
        if marks and draw(st.booleans()):
            at = draw(st.sampled_from(marks)) + draw(st.integers(0, 1))
        else:
            at = draw(st.integers(0, len(data)))
        if op == 0:  # insert a boundary byte
            data[at:at] = bytes([draw(st.sampled_from(ALPHABET))])
        elif op == 1:  # insert a fragment
            data[at:at] = draw(st.sampled_from(FRAGMENTS))
        elif op == 2 and data:  # delete a short range
            data[at : at + draw(st.integers(1, 3))] = b""
        elif op == 3 and at < len(data):  # replace one byte
            data[at] = draw(st.sampled_from(ALPHABET))
        else:  # flip the case of a short range
            n = draw(st.integers(1, 8))
            data[at : at + n] = bytes(data[at : at + n]).swapcase()
    return bytes(data)


def cuts_for(data: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(1, max(1, len(data) - 1)), max_size=6)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_property_mutated_requests(data: st.DataObject) -> None:
    raw = data.draw(mutated())
    check(raw, data.draw(cuts_for(raw)))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.lists(st.integers(1, 399), max_size=6))
def test_property_random_bytes(raw: bytes, cuts: list[int]) -> None:
    check(raw, cuts)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_property_valid_requests_are_forwarded_whole(data: st.DataObject) -> None:
    """The other half of the bargain: a strict parser's valid request is not refused (within
    the default limits and policies), whatever the read boundaries."""
    raw = data.draw(st.sampled_from(SEEDS))
    outcome = check(raw, data.draw(cuts_for(raw)))
    assert outcome.error is None
    assert [f.complete for f in outcome.forwarded] == [
        r.complete for r in reference.parse(raw).requests
    ]


@pytest.mark.parametrize("case", load(), ids=lambda c: c.name)
def test_corpus_holds_the_invariant_byte_by_byte(case: object) -> None:
    from tests.corpus import Case

    assert isinstance(case, Case)
    whole = check(case.raw)
    bytewise = check(case.raw, range(1, len(case.raw)))
    for outcome in (whole, bytewise):
        assert outcome.error is not None and outcome.error.status_hint == case.status
        assert not any(f.complete for f in outcome.forwarded)


def test_drop_policy_forwards_without_underscored_fields() -> None:
    raw = b"GET / HTTP/1.1\r\nHost: a.test\r\nX_Forwarded_For: 1.2.3.4\r\nX-A: b\r\n\r\n"
    outcome = run_session([raw], HeadLimits(underscore_headers="drop"))
    assert outcome.error is None
    assert outcome.forwarded[0].head.headers == [(b"host", b"a.test"), (b"x-a", b"b")]
