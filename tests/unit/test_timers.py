"""The timer wheel (pure): deadlines fire within one resolution, never early, once."""

from __future__ import annotations

import math

import pytest

from muxproxy.core.timers import TimerWheel


class Obj:
    def __init__(self, name: str, fired: list[str]) -> None:
        self.name = name
        self.deadline = math.inf
        self.timer_bucket: int | None = None
        self.fired = fired

    def on_deadline(self) -> None:
        self.fired.append(self.name)


def make(*names: str) -> tuple[TimerWheel, list[str], list[Obj]]:
    fired: list[str] = []
    w = TimerWheel(resolution=0.1)
    w.tick(100.0)
    return w, fired, [Obj(n, fired) for n in names]


@pytest.mark.parametrize(
    ("timeout", "ticks", "fired_at"),
    [
        (1.0, [100.5, 100.95, 101.0, 101.1], 101.0),  # at the deadline, not before
        (1.0, [100.5, 100.99], None),  # a tick short of it: still waiting
        (1.0, [103.0], 103.0),  # a late tick catches up on every bucket passed
        (0.0, [100.0, 100.15], 100.15),  # filed during a tick: a later one
        (math.inf, [200.0], None),  # no deadline
    ],
)
def test_fires_once_at_or_after_its_deadline(
    timeout: float, ticks: list[float], fired_at: float | None
) -> None:
    w, fired, (a,) = make("a")
    w.start(a, timeout)
    at = None
    for t in ticks:
        w.tick(t)
        if fired and at is None:
            at = t
    assert at == fired_at
    assert len(fired) == (0 if fired_at is None else 1)


def test_moving_later_is_refiled_and_earlier_moves_up() -> None:
    w, fired, (a, b) = make("a", "b")
    w.start(a, 0.5)
    w.set(a, 102.0)  # later: stays in its bucket, re-filed when that comes up
    w.start(b, 2.0)
    w.set(b, 100.3)  # earlier: moved to the earlier bucket
    w.tick(100.6)
    assert fired == ["b"]
    assert a.timer_bucket is not None and a.deadline == 102.0
    w.tick(102.0)
    assert fired == ["b", "a"]


def test_clear_and_discard() -> None:
    w, fired, (a, b) = make("a", "b")
    w.start(a, 0.2)
    w.start(b, 0.2)
    w.clear(a)  # lazily: dropped when its bucket comes up
    w.discard(b)  # at once
    assert b.timer_bucket is None
    w.tick(101.0)
    assert fired == []
    assert a.timer_bucket is None


def test_on_deadline_may_restart_its_own_timer() -> None:
    w, fired, (a,) = make("a")

    def again() -> None:
        fired.append("a")
        w.start(a, 1.0)

    a.on_deadline = again  # type: ignore[method-assign]
    w.start(a, 1.0)
    for t in (101.0, 101.5, 102.0, 103.0):
        w.tick(t)
    assert fired == ["a", "a", "a"]
    assert w.now == 103.0
