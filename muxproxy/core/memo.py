"""Memos of peer-controlled data, bounded in bytes as well as in entries.

Theory of operation
-------------------
The hot path memoises pure functions of what peers send: response fields already checked
(:mod:`~muxproxy.core.headers`), encoded request fields, whole HPACK blocks and Huffman strings
(:mod:`~muxproxy.core.hpack_codec`).  Real traffic repeats a few small values (``server``,
``content-type``, the ``date`` of this second), so a small memo gets nearly every hit; a peer
sending a different large value every time must not turn the memo into its storage.

:class:`Memo` holds a plain ``dict``, :attr:`Memo.data`, that the hot path reads directly
(its ``get`` and ``in`` are the C ones, as before the budget), and one way in,
:meth:`Memo.admit`: an entry larger than ``item_max`` bytes is not kept at all (computing it
again costs what it costs anyway, and that is linear in its size), and an entry that would take
the total past ``budget`` bytes or ``count`` entries empties the memo first (in place: readers
keep their reference).  So a memo never holds more than ``budget`` bytes of what it was given,
whatever the peer sends.  Sizes are the caller's estimate of the payload bytes it keeps (keys
and values), not ``sys.getsizeof``.
"""

from __future__ import annotations

from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Memo(Generic[K, V]):
    """A dict that admits entries only within a byte and entry budget."""

    __slots__ = ("budget", "count", "data", "item_max", "size")

    def __init__(self, *, budget: int, item_max: int, count: int) -> None:
        self.data: dict[K, V] = {}  # read it directly; write only through admit()
        self.budget = budget  # bytes held at most
        self.item_max = item_max  # larger entries are never kept
        self.count = count  # entries held at most
        self.size = 0  # bytes held now

    def admit(self, key: K, value: V, size: int) -> None:
        """Keep ``key → value`` (``size`` bytes) if it fits the budget."""
        if size > self.item_max:
            return
        data = self.data
        if self.size + size > self.budget or len(data) >= self.count:
            data.clear()
            self.size = 0
        data[key] = value
        self.size += size

    def clear(self) -> None:
        self.data.clear()
        self.size = 0


class ByIdentity(Generic[K, V]):
    """What was derived from an immutable object that comes back as the *same* object.

    A hit of the HPACK block memo returns the same tuple of fields each time, so what is
    derived from a response head (its checks, its content-length, its HTTP/1.1 field lines)
    can be kept beside it and found by identity, at the cost of one dict lookup and an ``is``.
    The object itself is held with its value, so its ``id`` cannot be reused while the entry
    lives.  Only tuples handed out by a bounded memo go in, so the objects held are bounded by
    that memo's ``item_max``, ``count`` times; a full table is emptied.
    """

    __slots__ = ("count", "data")

    def __init__(self, count: int) -> None:
        self.count = count
        self.data: dict[int, tuple[K, V]] = {}

    def get(self, key: K) -> V | None:
        hit = self.data.get(id(key))
        if hit is not None and hit[0] is key:
            return hit[1]
        return None

    def put(self, key: K, value: V) -> None:
        data = self.data
        if len(data) >= self.count:
            data.clear()
        data[id(key)] = (key, value)
