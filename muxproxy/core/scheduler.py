"""Pool decisions, pure: which connection takes the next stream, and when to grow.

Theory of operation
-------------------
The pool hands the scheduler a snapshot — per backend, the free stream slots and open streams of
each usable connection — and gets back a choice.  Nothing here awaits, counts on its own or
remembers anything but the round-robin cursor, so every rule is a table test.

The snapshot may be :class:`ConnView` records or the live connections themselves: anything with
``free`` and ``open`` (the pool passes its connections, so a pick allocates nothing).

* ``least_streams``: the usable connection with the fewest open streams, across backends.
* ``round_robin``: backends in turn (skipping full ones); within one, the fewest open streams.
* A connection is *usable* when it has a free slot (the backend's SETTINGS_MAX_CONCURRENT_STREAMS
  and our cap, counting open and half-closed streams) and is not draining.
* Growth past ``connections`` happens only when no connection anywhere has a free slot, one
  connection at a time, never past ``max_connections``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class Slots(Protocol):
    @property
    def free(self) -> int:
        """Streams that may still be opened (0 when draining or full)."""

    @property
    def open(self) -> int:
        """Streams open now."""


@dataclass(frozen=True, slots=True)
class ConnView:
    free: int
    open: int


@dataclass(slots=True)
class Scheduler:
    balance: str = "least_streams"
    cursor: int = 0

    def pick(self, backends: Sequence[Sequence[Slots]]) -> tuple[int, int] | None:
        """(backend index, connection index) for the next stream, or None if all are full."""
        if self.balance == "round_robin":
            n = len(backends)
            for step in range(n):
                b = (self.cursor + step) % n
                c = _least(backends[b])
                if c is not None:
                    self.cursor = (b + 1) % n
                    return b, c
            return None
        best: tuple[int, int] | None = None
        best_open = 0
        for b, conns in enumerate(backends):
            for c, view in enumerate(conns):
                n = view.open
                if (best is None or n < best_open) and view.free > 0:
                    best, best_open = (b, c), n
        return best


def _least(conns: Sequence[Slots]) -> int | None:
    best: int | None = None
    best_open = 0
    for i, view in enumerate(conns):
        n = view.open
        if (best is None or n < best_open) and view.free > 0:
            best, best_open = i, n
    return best


def should_grow(live: int, connecting: int, cap: int, all_full: bool) -> bool:
    """Open one more connection to a backend: only when every one is full, one at a time."""
    return all_full and connecting == 0 and live < cap
