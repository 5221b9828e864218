"""Our HPACK codec against the hpack library as the reference peer, both directions."""

from __future__ import annotations

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from muxproxy.core.hpack_codec import Decoder, Encoder, HPACKError, encode_field

Header = tuple[bytes, bytes]

NAME = st.one_of(
    st.sampled_from([b"content-type", b"server", b"date", b"etag", b"x-a", b"set-cookie"]),
    st.from_regex(rb"\A[a-z0-9\-_.]{1,30}\Z"),
)
VALUE = st.from_regex(rb"\A([!-~]([ !-~]{0,60}[!-~])?)?\Z")
FIELDS = st.lists(st.tuples(NAME, VALUE), max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.lists(FIELDS, min_size=1, max_size=6), st.booleans())
def test_decoder_follows_the_reference_encoder(blocks: list[list[Header]], huffman: bool) -> None:
    """Blocks from hpack's encoder (incremental indexing, Huffman or raw, table eviction with a
    small table) decode to what was encoded, block after block: the dynamic tables stay in
    step."""
    ref = hpack.Encoder()
    ref.header_table_size = 256  # small: entries are evicted all the time
    ours = Decoder(max_table_size=4096)
    for block in blocks:
        data = ref.encode(block, huffman=huffman)
        fields, too_large, bad = ours.decode(data)
        assert (list(fields), too_large, bad) == (block, False, None)


@settings(max_examples=300, deadline=None)
@given(st.lists(FIELDS, min_size=1, max_size=6))
def test_reference_decoder_reads_our_encoder(blocks: list[list[Header]]) -> None:
    ours = Encoder()
    ref = hpack.Decoder()
    for block in blocks:
        assert ref.decode(ours.encode(block), raw=True) == block


def test_never_indexed_for_credentials_and_static_indexes() -> None:
    assert encode_field(b":method", b"GET") == b"\x82"  # fully indexed (static 2)
    assert encode_field(b"cookie", b"a=1")[0] & 0xF0 == 0x10  # never indexed
    assert encode_field(b"x-a", b"1")[0] == 0x00  # literal without indexing, new name


@pytest.mark.parametrize(
    "name,value",
    [(b"X-Upper", b"1"), (b"x a", b"1"), (b"x", b"a\r\nb"), (b"x", b"\x00"), (b"x", b" lead")],
)
def test_encoder_refuses_what_http2_forbids(name: bytes, value: bytes) -> None:
    with pytest.raises(ValueError):
        encode_field(name, value)


def test_our_blocks_announce_a_zero_table_once() -> None:
    enc = Encoder()
    assert enc.encode([(b":method", b"GET")]) == b"\x20\x82"
    assert enc.encode([(b":method", b"GET")]) == b"\x82"


@pytest.mark.parametrize(
    "block",
    [
        b"\x80",  # index 0
        b"\xbf",  # index 63: beyond static (61) + empty dynamic table
        b"\x40\x05abc",  # string runs past the block
        b"\x3f\xe2\x1f",  # size update to 4097, above the 4096 we advertised
        b"\x82\x20",  # size update after a field
        b"\x00\x81\xff\x01a",  # invalid Huffman (EOS)
        b"\xff\xff\xff\xff\xff\xff\x01",  # integer overflow
        b"\x82\xff",  # truncated integer
    ],
)
def test_undecodable_blocks(block: bytes) -> None:
    with pytest.raises(HPACKError):
        Decoder().decode(block)


def test_malformed_fields_are_flagged_even_through_the_table() -> None:
    """A bad value entered with incremental indexing is flagged, and so is every later
    reference to that table entry (the table must still hold it to stay in step)."""
    dec = Decoder()
    fields, _, bad = dec.decode(b"\x40\x01x\x03a\nb")
    assert bad == b"x" and fields == [(b"x", b"a\nb")]
    _, _, bad = dec.decode(b"\xbe")  # index 62: that entry
    assert bad == b"x"
    _, _, bad = dec.decode(b"\x00\x01X\x011")  # upper-case literal name
    assert bad == b"X"


def test_header_list_size_is_bounded_but_the_table_kept_in_step() -> None:
    ref = hpack.Encoder()
    dec = Decoder(max_header_list_size=200)
    big = [(b"x-%d" % i, b"v" * 40) for i in range(10)]
    fields, too_large, _ = dec.decode(ref.encode(big))
    assert too_large and fields == []
    small = [(b"x-9", b"v" * 40)]  # now an indexed reference into the table
    fields, too_large, bad = dec.decode(ref.encode(small))
    assert (list(fields), too_large, bad) == (small, False, None)


def test_table_eviction_matches_sizes() -> None:
    ref = hpack.Encoder()
    dec = Decoder(max_table_size=4096)
    for i in range(200):  # ~ 200 × 70 bytes: the 4 KiB table evicts continuously
        block = [(b"x-name-%d" % i, b"value-%d" % i), (b"x-name-%d" % (i // 2), b"v")]
        assert list(dec.decode(ref.encode(block))[0]) == block


def test_repeated_blocks_replay_their_insertions() -> None:
    """nginx sends the same block for every response within a second, inserting each field
    into the table (literal with incremental indexing).  A block seen before comes from the
    cache, and its insertions must still happen: a later reference by index sees them."""
    dec = Decoder(max_table_size=200)  # room for about two entries: evictions too
    nginx_like = (
        b"\x88"  # :status 200, static
        + b"\x76\x05nginx"  # server, incremental indexing
        + b"\x61\x1dMon, 23 Nov 2026 11:37:29 GMT"  # date, incremental indexing
    )
    want = [
        (b":status", b"200"),
        (b"server", b"nginx"),
        (b"date", b"Mon, 23 Nov 2026 11:37:29 GMT"),
    ]
    for _ in range(3):
        fields, too_large, bad = dec.decode(nginx_like)
        assert (list(fields), too_large, bad) == (want, False, None)
    # Now the same bytes are a cache hit; a different block inserting one entry, then refs.
    assert list(dec.decode(b"\x40\x01x\x011")[0]) == [(b"x", b"1")]
    assert list(dec.decode(nginx_like)[0]) == want  # hit: inserts server, date (evicting x)
    assert list(dec.decode(b"\xbe\xbf")[0]) == [want[2], want[1]]  # 62 = newest (date), 63 = server


def _indexed_literals(fields: list[Header]) -> bytes:
    """A block as nginx writes one: every field a literal with incremental indexing and a
    literal name, so the block means the same whatever the table holds (our cache takes it)."""
    out = bytearray()
    for name, value in fields:
        out.append(0x40)
        for s in (name, value):
            out += hpack.hpack.encode_integer(len(s), 7) + s
    return bytes(out)


CLEAN_VALUE = st.from_regex(rb"\A([!-~]([ !-~\x80-\xff]{0,150}[!-~])?)?\Z")


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.lists(st.tuples(NAME, CLEAN_VALUE), max_size=5), min_size=1, max_size=4),
    st.lists(st.integers(0, 3), min_size=1, max_size=20),
    st.sampled_from([64, 150, 300, 4096]),
)
def test_cached_blocks_insert_as_the_reference_decoder_does(
    pool: list[list[Header]], order: list[int], table_size: int
) -> None:
    """Repeated blocks come from the cache and replay their insertions in bulk; the dynamic
    table (entries and eviction, including an entry larger than the whole table) must stay
    exactly where hpack's own decoder has it."""
    ours = Decoder(max_table_size=table_size)
    ref = hpack.Decoder(max_header_list_size=1 << 20)
    ref.header_table.maxsize = table_size
    for i in order:
        block = _indexed_literals(pool[i % len(pool)])
        assert list(ours.decode(block)[0]) == ref.decode(block, raw=True)
        assert list(ours._table) == list(ref.header_table.dynamic_entries)
        assert ours._size == sum(len(n) + len(v) + 32 for n, v in ours._table)


def test_a_block_seen_before_is_the_same_tuple_so_its_readers_can_memoise_by_identity() -> None:
    """Decoder.decode hands out the memo's tuple on a hit (ByIdentity memos rely on it), and a
    block decoded for the first time as a new list, never shared."""
    ref = hpack.Encoder()
    block = [(b":status", b"200"), (b"content-type", b"text/plain")]
    data = ref.encode(block, huffman=True)
    dec = Decoder()
    first = dec.decode(data)[0]
    assert type(first) is list and first == block
    again, again2 = dec.decode(data)[0], dec.decode(data)[0]
    assert type(again) is tuple and again is again2 and list(again) == block
