"""Memos of peer-controlled data, bounded in bytes as well as in entries.

Theory of operation
-------------------
The hot path memoises pure functions of what peers send: response fields already checked
(:mod:`~muxproxy.core.headers`), encoded request fields, whole HPACK blocks and Huffman strings
(:mod:`~muxproxy.core.hpack_codec`).  Real traffic repeats a few small values (``server``,
``content-type``, the ``date`` of this second), so a small memo gets nearly every hit; a peer
sending a different large value every time must not turn the memo into its storage.

:class:`Memo` is a ``dict`` (lookups stay the C ``dict.get`` and ``in``) with one way in,
:meth:`Memo.admit`: an entry larger than ``item_max`` bytes is not kept at all (computing it
again costs what it costs anyway, and that is linear in its size), and an entry that would take
the total past ``budget`` bytes or ``count`` entries empties the memo first.  So a memo never
holds more than ``budget`` bytes of what it was given, whatever the peer sends.  Sizes are
the caller's estimate of the payload bytes it keeps (keys and values), not ``sys.getsizeof``.
"""

from __future__ import annotations

from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Memo(dict[K, V], Generic[K, V]):
    """A dict that admits entries only within a byte and entry budget."""

    __slots__ = ("budget", "count", "item_max", "size")

    def __init__(self, *, budget: int, item_max: int, count: int) -> None:
        super().__init__()
        self.budget = budget  # bytes held at most
        self.item_max = item_max  # larger entries are never kept
        self.count = count  # entries held at most
        self.size = 0  # bytes held now

    def admit(self, key: K, value: V, size: int) -> None:
        """Keep ``key → value`` (``size`` bytes) if it fits the budget."""
        if size > self.item_max:
            return
        if self.size + size > self.budget or len(self) >= self.count:
            self.clear()
        self[key] = value
        self.size += size

    def clear(self) -> None:
        super().clear()
        self.size = 0
