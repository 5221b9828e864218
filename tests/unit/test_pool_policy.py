"""Scheduler: which connection takes the next stream, and when the pool may grow (pure)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from muxproxy.core.pool_policy import ConnView, Scheduler, should_grow

V = ConnView
FULL = V(0, 10)


@pytest.mark.parametrize(
    ("backends", "choice"),
    [
        ([], None),
        ([[]], None),
        ([[V(1, 0)]], (0, 0)),
        # fewest open streams among connections with a free slot
        ([[V(5, 5), V(2, 3)], [V(9, 4)]], (0, 1)),
        ([[V(5, 5), V(2, 3)], [V(9, 1)]], (1, 0)),
        # a full connection (free == 0) is never picked, even if it has the fewest open
        ([[V(0, 0), V(1, 7)], [V(0, 1)]], (0, 1)),
        # a draining connection reports free == 0 with open streams
        ([[V(0, 2)], [V(3, 9)]], (1, 0)),
        # ties go to the first in order
        ([[V(1, 2), V(1, 2)], [V(1, 2)]], (0, 0)),
        ([[FULL], [V(1, 4)], [V(1, 4)]], (1, 0)),
        # everything full
        ([[FULL, FULL], [FULL]], None),
    ],
)
def test_least_streams(
    backends: Sequence[Sequence[ConnView]], choice: tuple[int, int] | None
) -> None:
    s = Scheduler("least_streams")
    assert s.pick(backends) == choice
    assert s.pick(backends) == choice  # no hidden state


def test_least_streams_follows_the_snapshot() -> None:
    s = Scheduler("least_streams")
    assert s.pick([[V(5, 0), V(5, 0)]]) == (0, 0)
    assert s.pick([[V(4, 1), V(5, 0)]]) == (0, 1)
    assert s.pick([[V(4, 1), V(4, 1)]]) == (0, 0)


@pytest.mark.parametrize(
    ("backends", "picks"),
    [
        # backends in turn
        ([[V(1, 0)], [V(1, 0)], [V(1, 0)]], [(0, 0), (1, 0), (2, 0), (0, 0), (1, 0)]),
        # a full backend is skipped
        ([[V(1, 0)], [FULL], [V(1, 0)]], [(0, 0), (2, 0), (0, 0), (2, 0)]),
        ([[FULL], [FULL], [V(1, 0)]], [(2, 0), (2, 0)]),
        # within a backend: the usable connection with the fewest open streams
        ([[V(3, 7), V(3, 2), FULL], [V(1, 9), V(0, 0)]], [(0, 1), (1, 0), (0, 1)]),
        # nothing usable
        ([[FULL], [FULL]], [None, None]),
        ([], [None]),
    ],
)
def test_round_robin(
    backends: Sequence[Sequence[ConnView]], picks: list[tuple[int, int] | None]
) -> None:
    s = Scheduler("round_robin")
    assert [s.pick(backends) for _ in picks] == picks


def test_round_robin_cursor_survives_a_full_round() -> None:
    s = Scheduler("round_robin")
    two = [[V(1, 0)], [V(1, 0)]]
    assert s.pick(two) == (0, 0)
    assert s.pick([[FULL], [FULL]]) is None
    assert s.pick(two) == (1, 0)  # a miss does not move the turn
    assert s.pick([[V(1, 0)], [FULL]]) == (0, 0)
    assert s.pick(two) == (1, 0)


@pytest.mark.parametrize(
    ("live", "connecting", "cap", "all_full", "grow"),
    [
        (4, 0, 6, True, True),  # every connection full, below the cap: one more
        (5, 0, 6, True, True),
        (6, 0, 6, True, False),  # at the hard cap
        (7, 0, 6, True, False),
        (4, 1, 6, True, False),  # one already on its way: one at a time
        (4, 0, 6, False, False),  # a free slot somewhere: no growth
        (4, 0, 4, True, False),  # max_connections == connections: never
        (0, 0, 1, True, True),
    ],
)
def test_should_grow(live: int, connecting: int, cap: int, all_full: bool, grow: bool) -> None:
    assert should_grow(live, connecting, cap, all_full) is grow
