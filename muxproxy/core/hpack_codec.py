"""HPACK (RFC 7541) for the client role of a backend connection, tuned for the proxy's hot path.

Theory of operation
-------------------
**Encoding** never uses the dynamic table: the first header block says "my table is 0 bytes"
(a dynamic table size update, §6.3) and every field is either a static-table index or a literal
*without indexing* (a literal *never indexed* for credentials, §7.1.3).  With no table there is
no state, so the encoding of each ``(name, value)`` pair is a pure function and is memoised: a
request whose fields were seen before is encoded by a few dictionary lookups and one join.
Values are sent raw, not Huffman-coded: a few bytes more on loopback-class links, far less CPU.

**Decoding** is complete: indexed fields, the three literal forms, Huffman strings, the dynamic
table with eviction, and table size updates (only at the start of a block, never above what we
advertised).  Huffman strings are memoised too: backends such as nginx send the same few values
(``server``, ``content-type``, the ``date`` of this second) as Huffman literals on every response.
Every memo is a :class:`~muxproxy.core.memo.Memo`, bounded in bytes per connection; large values
bypass it (issue 16: a backend sending a new 200 KB field each time must not fill memory).
A block that decodes past ``max_header_list_size`` (§6.5.2 of RFC 9113, 32 bytes of overhead
per field) is still decoded to the end, so the table stays in step with the peer, but its fields
are dropped and the caller is told: a decompression bomb costs the peer a stream, not us memory.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from hpack.exceptions import HPACKDecodingError
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

from .memo import Memo

Header = tuple[bytes, bytes]

STATIC_TABLE: tuple[Header, ...] = HeaderTable.STATIC_TABLE
_STATIC_LEN = len(STATIC_TABLE)  # 61
_STATIC_FULL = {field: i + 1 for i, field in reversed(list(enumerate(STATIC_TABLE)))}
_STATIC_NAME = {name: i + 1 for i, (name, _) in reversed(list(enumerate(STATIC_TABLE)))}
_SENSITIVE = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"})

# RFC 9113 §8.2.1: a name is a lower-case token (pseudo-headers start with one colon); a value
# has no NUL, CR or LF and neither starts nor ends with whitespace.
FIELD_NAME = re.compile(rb":?[!#$%&'*+\-.^_`|~0-9a-z]+\Z")
BAD_FIELD_VALUE = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")

# Memo budgets, per connection (a backend controls what it sends, a client what it asks).
# Each keeps nginx-like traffic (a few hundred bytes of fields per block) fully cached.
ENCODE_BUDGET, ENCODE_ITEM_MAX = 256 * 1024, 4096
BLOCKS_BUDGET, BLOCKS_ITEM_MAX = 256 * 1024, 8192
HUFFMAN_BUDGET, HUFFMAN_ITEM_MAX = 64 * 1024, 1024


@dataclass(frozen=True, slots=True)
class MemoSizes:
    """The memos of one connection's encoder and decoder: (bytes, item bytes, entries) each.
    The defaults suit the few pooled backend connections; a client-facing connection, one of
    thousands, takes :data:`CLIENT_MEMOS`."""

    encode: tuple[int, int, int] = (ENCODE_BUDGET, ENCODE_ITEM_MAX, 4096)
    blocks: tuple[int, int, int] = (BLOCKS_BUDGET, BLOCKS_ITEM_MAX, 256)
    huffman: tuple[int, int, int] = (HUFFMAN_BUDGET, HUFFMAN_ITEM_MAX, 4096)


BACKEND_MEMOS = MemoSizes()
# A client connection: a response's fields and a browser's values stay cached; a client
# sending new values every time makes the proxy hold at most a few tens of KiB for it.
CLIENT_MEMOS = MemoSizes(encode=(16384, 1024, 128), blocks=(8192, 2048, 16),
                         huffman=(4096, 512, 128))  # fmt: skip


# A cached block: its fields, the entries it inserts (in order), their sizes and their total.
_Block = tuple[tuple[Header, ...], tuple[Header, ...], tuple[int, ...], int]


class HPACKError(Exception):
    """The peer's header block cannot be decoded: a connection error (COMPRESSION_ERROR)."""


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer (§5.1) whose first byte carries ``first`` in the bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(data: bytes) -> bytes:
    return _integer(len(data), 7, 0) + data


def encode_field(name: bytes, value: bytes) -> bytes:
    """One field, without using the dynamic table.  Raises ValueError for a field HTTP/2
    forbids (the proxy validates what it forwards; this is the last line)."""
    index = _STATIC_FULL.get((name, value))
    if index is not None:
        return _integer(index, 7, 0x80)
    if not FIELD_NAME.match(name) or BAD_FIELD_VALUE.search(value):
        raise ValueError(f"refusing to send the header field {name[:40]!r}")
    first = 0x10 if name in _SENSITIVE else 0x00
    index = _STATIC_NAME.get(name)
    if index is not None:
        return _integer(index, 4, first) + _literal(value)
    return bytes((first,)) + _literal(name) + _literal(value)


# Fields whose value differs on every request: memoising them would only churn the memo.  A
# value of letters and digits only (always valid) is encoded on the spot after its name's
# literal, prepared once.
_PER_REQUEST = {b"x-request-id": b"\x00" + _literal(b"x-request-id")}


class Encoder:
    """Stateless HPACK encoding with a memo of every field it encoded."""

    __slots__ = ("_announced", "_cache", "_memo")

    def __init__(self, memos: MemoSizes = BACKEND_MEMOS) -> None:
        budget, item_max, count = memos.encode
        self._memo: Memo[Header, bytes] = Memo(budget=budget, item_max=item_max, count=count)
        self._cache = self._memo.data
        self._announced = False

    def memo_bytes(self) -> int:
        return self._memo.size

    def encode(self, headers: list[Header]) -> bytes:
        cache = self._cache
        parts: list[bytes] = []
        if not self._announced:
            parts.append(b"\x20")  # dynamic table size update: 0 — we never index
            self._announced = True
        for field in headers:
            enc = cache.get(field)
            if enc is None:
                prefix = _PER_REQUEST.get(field[0])
                if prefix is not None and len(field[1]) < 127 and field[1].isalnum():
                    parts.append(b"%s%c%s" % (prefix, len(field[1]), field[1]))
                    continue
                enc = encode_field(*field)
                self._memo.admit(field, enc, len(field[0]) + len(field[1]) + len(enc))
            parts.append(enc)
        return b"".join(parts)


class Decoder:
    """HPACK decoding with a dynamic table of at most ``max_table_size`` bytes."""

    __slots__ = (
        "_block_memo",
        "_blocks",
        "_huffman",
        "_huffman_memo",
        "_limit",
        "_max",
        "_size",
        "_sizes",
        "_table",
        "_tainted",
        "max_header_list_size",
    )

    def __init__(
        self,
        max_table_size: int = 4096,
        max_header_list_size: int = 1 << 20,
        memos: MemoSizes = BACKEND_MEMOS,
    ) -> None:
        self._table: deque[Header] = deque()  # newest first
        self._sizes: deque[int] = deque()  # each entry's size (RFC 7541 §4.1), in step
        self._size = 0
        self._max = max_table_size  # current maximum, changed by size updates
        self._limit = max_table_size  # what we advertised: size updates may not exceed it
        self.max_header_list_size = max_header_list_size
        self._tainted = False  # a malformed field entered the dynamic table
        # Whole blocks that only use the static table and literals: the same bytes always mean
        # the same fields and the same insertions (nginx sends identical blocks, inserting
        # every field, for every response within a second).
        budget, item_max, count = memos.blocks
        self._block_memo: Memo[bytes, _Block] = Memo(budget=budget, item_max=item_max, count=count)
        self._blocks = self._block_memo.data
        # raw → (decoded, valid)
        budget, item_max, count = memos.huffman
        self._huffman_memo: Memo[bytes, tuple[bytes, bool]] = Memo(
            budget=budget, item_max=item_max, count=count
        )
        self._huffman = self._huffman_memo.data

    def memo_bytes(self) -> int:
        """Bytes held by this decoder's memos (whole blocks and Huffman strings)."""
        return self._block_memo.size + self._huffman_memo.size

    def _add(self, name: bytes, value: bytes, size: int) -> None:
        """Insert an entry of ``size`` (= len(name) + len(value) + 32) and evict (§4.4)."""
        table = self._table
        sizes = self._sizes
        if size > self._max:
            table.clear()
            sizes.clear()
            self._size = 0
            return
        table.appendleft((name, value))
        sizes.appendleft(size)
        self._size += size
        if self._size > self._max:
            self._evict(self._max)

    def _evict(self, size: int) -> None:
        """Drop the oldest entries until the table holds at most ``size`` bytes."""
        table = self._table
        sizes = self._sizes
        total = self._size
        while total > size:
            table.pop()
            total -= sizes.pop()
        self._size = total

    def _resize(self, size: int) -> None:
        if size > self._limit:
            raise HPACKError(f"table size update to {size} above the advertised {self._limit}")
        self._max = size
        self._evict(size)

    def _field(self, index: int) -> Header:
        if index <= 0:
            raise HPACKError("index 0")
        if index <= _STATIC_LEN:
            return STATIC_TABLE[index - 1]
        try:
            return self._table[index - _STATIC_LEN - 1]
        except IndexError:
            raise HPACKError(f"index {index} outside the tables") from None

    def decode(self, data: bytes) -> tuple[Sequence[Header], bool, bytes | None]:
        """Decode one complete header block: ``(fields, too_large, bad)``, where ``bad`` names
        a field whose name or value RFC 9113 §8.2.1 forbids (the block is malformed, but it was
        decoded to the end: the dynamic table is in step).  Raises HPACKError.

        A block seen before returns the very tuple it returned then (never to be changed by
        the caller): what callers derive from it can be memoised by identity
        (:class:`~muxproxy.core.memo.ByIdentity`).  A block decoded now returns a new list."""
        hit = self._blocks.get(data)
        if hit is not None:  # seen before, and its meaning does not depend on the table
            fields, added_fields, added_sizes, added = hit
            if added_fields:
                # Inserting them all, then evicting from the old end, leaves the table as one
                # at a time would: evictions only ever take the oldest entries (and an entry
                # larger than the table, which empties it, is itself evicted with all older).
                self._table.extendleft(added_fields)
                self._sizes.extendleft(added_sizes)
                self._size += added
                self._evict(self._max)
            return fields, False, None
        out: list[Header] = []
        inserts: list[Header] = []
        sizes: list[int] = []
        cacheable = True  # no reference into the dynamic table, no size update
        total = 0
        limit = self.max_header_list_size
        too_large = False
        bad: bytes | None = None
        pos = 0
        end = len(data)
        fields_seen = False
        try:
            while pos < end:
                b = data[pos]
                if b & 0x80:  # indexed field: checked when it entered a table
                    if b != 0xFF:
                        index = b & 0x7F
                        pos += 1
                    else:
                        index, pos = _read_int(data, pos, 7)
                    if index > _STATIC_LEN:
                        cacheable = False
                    name, value = self._field(index)
                    if self._tainted and index > _STATIC_LEN and not _valid(name, value):
                        bad = bad or name
                else:
                    if b & 0x40:  # literal with incremental indexing
                        index, pos = _read_int(data, pos, 6)
                        indexing = True
                    elif b & 0x20:  # dynamic table size update
                        if fields_seen:
                            raise HPACKError("table size update after a field")
                        size, pos = _read_int(data, pos, 5)
                        self._resize(size)
                        cacheable = False
                        continue
                    else:  # literal without indexing (0000) or never indexed (0001)
                        index, pos = _read_int(data, pos, 4)
                        indexing = False
                    if index:
                        if index > _STATIC_LEN:
                            cacheable = False
                        name = self._field(index)[0]
                    else:
                        name, pos, ok = self._string(data, pos)
                        if not FIELD_NAME.match(name):
                            bad = bad or name
                    value, pos, ok = self._string(data, pos)
                    if not ok:
                        bad = bad or name
                    if indexing:
                        size = len(name) + len(value) + 32
                        self._add(name, value, size)
                        inserts.append((name, value))
                        sizes.append(size)
                        if bad is not None:
                            self._tainted = True  # indexed fields need checking from now on
                fields_seen = True
                total += len(name) + len(value) + 32
                if total > limit:
                    too_large = True
                    out.clear()
                elif not too_large:
                    out.append((name, value))
        except IndexError:
            raise HPACKError("header block truncated") from None
        if cacheable and not too_large and bad is None and len(data) <= self._block_memo.item_max:
            # The block's bytes plus the fields it decodes to (never more than 8 × its size).
            kept = len(data) + sum(len(n) + len(v) for n, v in out)
            self._block_memo.admit(
                bytes(data), (tuple(out), tuple(inserts), tuple(sizes), sum(sizes)), kept
            )
        return out, too_large, bad

    def _string(self, data: bytes, pos: int) -> tuple[bytes, int, bool]:
        """A string literal at ``pos``: ``(value, next position, valid as a field value)``."""
        b = data[pos]
        if b & 0x7F != 0x7F:
            length = b & 0x7F
            pos += 1
        else:
            length, pos = _read_int(data, pos, 7)
        end = pos + length
        if end > len(data):
            raise HPACKError("string runs past the header block")
        raw = data[pos:end]
        if not b & 0x80:
            return raw, end, BAD_FIELD_VALUE.search(raw) is None
        hit = self._huffman.get(raw)
        if hit is None:
            try:
                out = decode_huffman(raw)
            except HPACKDecodingError as exc:
                raise HPACKError(f"bad Huffman string: {exc}") from None
            hit = (out, BAD_FIELD_VALUE.search(out) is None)
            self._huffman_memo.admit(raw, hit, len(raw) + len(out))
        return hit[0], end, hit[1]


def _valid(name: bytes, value: bytes) -> bool:
    return FIELD_NAME.match(name) is not None and BAD_FIELD_VALUE.search(value) is None


def _read_int(data: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    """Decode an HPACK integer at ``pos``; returns ``(value, next position)``."""
    mask = (1 << prefix_bits) - 1
    value = data[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    while True:
        b = data[pos]
        pos += 1
        value += (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 28:
            raise HPACKError("integer too large")
