"""Pool policy (pure), table by table: pick, growth, capacity, the unreachable rule, failures
with ejection and backoff, health, the queue.  Each row is (state, event, now) → decision."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from muxproxy.core.pool_policy import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    DOWN_LOG_EVERY,
    BackendView,
    ConnView,
    Health,
    RateLimit,
    Scheduler,
    WaitQueue,
    capacity_limited,
    grow_target,
    retry_delay,
    should_grow,
    unreachable,
)

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


B = BackendView  # (usable, live, connecting, failures)


@pytest.mark.parametrize(
    ("backends", "connections", "cap", "target"),
    [
        ([B(True, 2, 0, 0)], 2, 2, None),  # no max_connections: never
        ([B(True, 2, 0, 0)], 2, 3, 0),
        ([B(True, 3, 0, 0)], 2, 3, None),  # at the cap
        ([B(True, 2, 1, 0)], 2, 4, None),  # one already connecting: one at a time
        ([B(True, 0, 0, 3)], 2, 4, None),  # nothing live: reconnecting, not growing
        ([B(False, 2, 0, 0), B(True, 2, 0, 0)], 2, 4, 1),  # an ejected backend is skipped
        ([B(True, 4, 0, 0), B(True, 2, 0, 0)], 2, 4, 1),  # the first that may grow
        ([], 2, 4, None),
    ],
)
def test_grow_target(backends: list[BackendView], connections: int, cap: int,
                     target: int | None) -> None:
    assert grow_target(backends, connections, cap) == target


@pytest.mark.parametrize(
    ("conns", "connecting", "can_grow", "limited"),
    [
        ([FULL, FULL], 0, False, True),  # the configuration is the limit
        ([FULL, V(1, 9)], 0, False, False),  # a free slot
        ([FULL, FULL], 1, False, False),  # a connection is coming
        ([FULL, FULL], 0, True, False),  # the pool may still grow
        ([], 0, False, False),  # nothing connected: not a capacity problem
        ([V(0, 128), V(0, 128)], 0, False, True),
    ],
)
def test_capacity_limited(conns: list[ConnView], connecting: int, can_grow: bool,
                          limited: bool) -> None:
    assert capacity_limited(conns, connecting, can_grow) is limited


@pytest.mark.parametrize(
    ("backends", "answer"),
    [
        ([B(True, 1, 0, 0)], False),
        ([B(True, 0, 1, 0)], False),  # connecting for the first time: queue
        ([B(True, 0, 0, 0)], False),  # between a lost connection and the reconnect
        ([B(True, 0, 0, 2)], True),  # known down: failed, nothing live, nothing connecting
        ([B(True, 0, 1, 2)], False),  # down but an attempt is on its way: queue
        ([B(False, 2, 0, 0)], True),  # ejected or unhealthy: not usable
        ([B(False, 2, 0, 0), B(True, 0, 0, 1)], True),
        ([B(False, 2, 0, 0), B(True, 1, 0, 0)], False),
        ([], True),
    ],
)
def test_unreachable(backends: list[BackendView], answer: bool) -> None:
    assert unreachable(backends) is answer


@pytest.mark.parametrize(
    ("attempt", "rand", "delay"),
    [
        (1, 0.5, BACKOFF_MIN),
        (1, 0.0, BACKOFF_MIN * 0.5),  # jitter: [0.5, 1.5) times the base
        (1, 0.999, BACKOFF_MIN * 1.499),
        (2, 0.5, BACKOFF_MIN * 2),
        (4, 0.5, BACKOFF_MIN * 8),
        (30, 0.5, BACKOFF_MAX),  # capped
        (30, 0.0, BACKOFF_MAX * 0.5),
        (0, 0.5, BACKOFF_MIN),
    ],
)
def test_retry_delay(attempt: int, rand: float, delay: float) -> None:
    assert retry_delay(attempt, lambda: rand) == pytest.approx(delay)


def test_rate_limit() -> None:
    r = RateLimit(60.0)
    assert [r.hit(t) for t in (0.0, 1.0, 30.0, 59.9, 60.0, 61.0, 200.0)] == [
        0, None, None, None, 3, None, 1,
    ]


def _fail(h: Health, now: float, backends: int = 2, eject_after: int = 3) -> tuple[
        bool, int | None, float]:
    d = h.failed("refused", now, backends=backends, eject_after=eject_after, rand=lambda: 0.5)
    return d.went_down, d.still_down, d.eject_for


def test_failures_log_once_down_then_a_summary_a_minute_then_once_up() -> None:
    h = Health()
    # 32 failed attempts in 35 s: one line when it goes down, nothing more within the minute
    rows = [_fail(h, t, backends=1) for t in range(35)]
    assert rows[0] == (True, None, 0.0)
    assert all(r == (False, None, 0.0) for r in rows[1:])
    assert _fail(h, DOWN_LOG_EVERY + 1, backends=1) == (False, 34, 0.0)  # counted summary
    assert h.connected() == 36  # came back: log once, with the count
    assert h.failures == 0
    assert _fail(h, 100.0, backends=1)[0] is True  # down again: logged again at once


@pytest.mark.parametrize(
    ("backends", "eject_after", "failures", "ejected_for"),
    [
        (2, 3, 1, 0.0),
        (2, 3, 2, 0.0),
        (2, 3, 3, BACKOFF_MIN * 8),  # the third consecutive failure ejects
        (2, 3, 4, BACKOFF_MIN * 16),  # exponentially longer
        (2, 3, 10, BACKOFF_MAX),  # capped
        (1, 3, 10, 0.0),  # a cluster's only backend is never ejected (nothing to fail over)
        (3, 1, 1, BACKOFF_MIN * 2),
    ],
)
def test_ejection(backends: int, eject_after: int, failures: int, ejected_for: float) -> None:
    h = Health()
    for _ in range(failures - 1):
        _fail(h, 10.0, backends, eject_after)
    assert _fail(h, 10.0, backends, eject_after)[2] == pytest.approx(ejected_for)
    assert h.usable(10.0) is (ejected_for == 0)
    assert h.usable(10.0 + ejected_for)  # the pause ends by itself


@pytest.mark.parametrize(
    ("failures", "live", "checks_ok", "removed", "ejected", "reachable"),
    [
        (0, 0, True, False, False, True),  # starting up: not known down
        (0, 2, True, False, False, True),
        (25, 0, True, False, False, False),  # the only backend, 25 failures: down (issue 13)
        (1, 1, True, False, False, True),  # a live connection and a failing slot: up
        (0, 2, False, False, False, False),  # active health check failed
        (0, 2, True, True, False, False),  # removed from the set: draining
        (0, 2, True, False, True, False),  # ejected
    ],
)
def test_reachable(failures: int, live: int, checks_ok: bool, removed: bool, ejected: bool,
                   reachable: bool) -> None:
    h = Health(failures=failures, checks_ok=checks_ok, removed=removed,
               ejected_until=100.0 if ejected else 0.0)
    assert h.reachable(live, now=50.0) is reachable


def test_health_check_changes_are_reported_once() -> None:
    h = Health()
    assert [h.checked(ok) for ok in (True, False, False, True, True)] == [
        False, True, False, True, False,
    ]


class _W:
    def __init__(self, name: str) -> None:
        self.name = name
        self.done = False


def test_queue_bounded_fifo_with_deadline_and_replays_first() -> None:
    q: WaitQueue[_W] = WaitQueue(limit=3, timeout=5.0)
    a, b, c, r = _W("a"), _W("b"), _W("c"), _W("replay")
    assert q.push(a, 10.0) == 15.0  # the deadline: now + pending_timeout
    q.push(b, 11.0)
    assert not q.full()
    q.push(r, 12.0, front=True)  # a replay is older than everything behind it
    assert q.full() and q.live == 3
    assert q.first() is r
    q.take(r)
    q.take(b)  # a waiter leaving from the middle (timed out) is skipped later
    assert q.live == 1 and q.first() is a
    q.push(c, 13.0)
    assert [w.name for w in q.drain()] == ["a", "c"]
    assert q.live == 0 and q.first() is None
    q.take(a)  # taking twice is harmless
    assert q.live == 0
