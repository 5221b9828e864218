"""Memos of peer-controlled data are bounded in bytes (issue 16 item 2), and keep their hits."""

from __future__ import annotations

import os

import hpack

from muxproxy.core import headers
from muxproxy.core.hpack_codec import (
    BLOCKS_BUDGET,
    ENCODE_BUDGET,
    HUFFMAN_BUDGET,
    Decoder,
    Encoder,
)
from muxproxy.core.memo import Memo


def test_memo_admits_within_its_budget_and_skips_large_entries() -> None:
    m: Memo[bytes, int] = Memo(budget=100, item_max=40, count=10)
    m.admit(b"big", 1, 41)
    assert b"big" not in m.data and m.size == 0
    data = m.data
    for i in range(10):
        m.admit(bytes([i]), i, 30)
        assert m.size <= 100 and len(m.data) <= 3
    assert bytes([9]) in m.data  # the newest entry always lands
    assert m.data is data  # emptied in place: readers keep their reference
    m.clear()
    assert m.size == 0 and not m.data


def test_memo_count_bound() -> None:
    m: Memo[int, int] = Memo(budget=10**9, item_max=10, count=5)
    for i in range(12):
        m.admit(i, i, 1)
        assert len(m.data) <= 5


def test_checked_response_fields_memo_holds_its_budget() -> None:
    """A different 200 KB field per response: checked every time, never kept."""
    for i in range(50):
        value = b"%d" % i + b"v" * 200_000
        status, fields = headers.response_from_h2([(b":status", b"200"), (b"x-big", value)])
        assert status == 200 and fields == [(b"x-big", value)]
        assert headers.memo_bytes() <= headers.SAFE_BUDGET
    assert all(len(v) <= headers.SAFE_ITEM_MAX for _, v in headers._SAFE)
    # Small distinct fields churn the memo but never take it past the budget either.
    for _ in range(5000):
        headers.response_from_h2([(b":status", b"200"), (b"x-id", os.urandom(500).hex().encode())])
        assert headers.memo_bytes() <= headers.SAFE_BUDGET


def test_decoder_memos_hold_their_budget_against_large_huffman_blocks() -> None:
    enc = hpack.Encoder()
    dec = Decoder(max_header_list_size=1 << 20)
    for i in range(30):  # (hpack's Huffman decoder is slow: 20 KB is past every item bound)
        block = enc.encode([(b":status", b"200"), (b"x-big", b"%d" % i + b"a" * 20_000)])
        fields, too_large, bad = dec.decode(block)
        assert not too_large and bad is None and fields[1][1].endswith(b"a" * 1000)
        assert dec.memo_bytes() <= BLOCKS_BUDGET + HUFFMAN_BUDGET
    assert dec.memo_bytes() < 4096


def test_decoder_memos_keep_hitting_on_nginx_like_traffic() -> None:
    """The same small blocks again and again: after the first, every block is a memo hit."""
    enc = hpack.Encoder()
    enc.header_table_size = 0  # literals only, as a block memo needs
    dec = Decoder()
    fields = [
        (b":status", b"200"),
        (b"server", b"nginx/1.22.1"),
        (b"date", b"Fri, 04 Dec 2026 16:34:54 GMT"),
        (b"content-type", b"text/html"),
        (b"content-length", b"615"),
    ]
    blocks = [hpack.Encoder().encode(fields) for _ in range(3)]
    dec.decode(blocks[0])
    assert blocks[0] in dec._blocks
    before = dict(dec._blocks)
    for b in blocks * 100:
        out, _, _ = dec.decode(b)
        assert list(out) == fields
    assert dec._blocks.keys() >= before.keys()


def test_encoder_memo_holds_its_budget() -> None:
    e = Encoder()
    for i in range(300):
        e.encode([(b":method", b"GET"), (b"x-big", b"%d" % i + b"v" * 100_000)])
        e.encode([(b"x-id", os.urandom(1000).hex().encode())])
        assert e.memo_bytes() <= ENCODE_BUDGET
    e.encode([(b"accept", b"*/*")])
    assert (b"accept", b"*/*") in e._cache


def test_by_identity_finds_only_the_same_object_and_stays_bounded() -> None:
    from muxproxy.core.memo import ByIdentity

    memo: ByIdentity[tuple[int, ...], str] = ByIdentity(4)
    key = (1, 2, 3)
    memo.put(key, "derived")
    assert memo.get(key) == "derived"
    assert memo.get(tuple([1, 2, 3])) is None  # equal, but not the same object: no hit
    keys = [tuple([i, i]) for i in range(10)]
    for k in keys:
        memo.put(k, "x")
    assert len(memo.data) <= 4  # emptied when full, never more than count
    assert memo.get(keys[-1]) == "x"
