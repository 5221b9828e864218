"""CreditCap (pure): a stream over its buffered-bytes cap for longer than the grace is reset."""

from __future__ import annotations

import pytest

from muxproxy.core.credit import CreditCap


@pytest.mark.parametrize(
    ("observations", "reset_at"),
    [
        # (now, buffered) in order; the first observation that says "reset now"
        ([(0.0, 100), (20.0, 1000)], None),  # at the cap is not over it
        ([(0.0, 1001), (4.9, 1001)], None),  # over, but within the grace
        ([(0.0, 1001), (5.0, 2000)], 5.0),  # over for the whole grace
        ([(0.0, 1001), (3.0, 10), (6.0, 5000), (10.9, 5000)], None),  # a dip restarts it
        ([(0.0, 1001), (3.0, 10), (6.0, 5000), (11.0, 5000)], 11.0),
        ([(2.0, 9999)], None),  # a burst is tolerated
    ],
)
def test_observe(observations: list[tuple[float, int]], reset_at: float | None) -> None:
    cap = CreditCap(cap=1000, grace=5.0)
    got = next((now for now, n in observations if cap.observe(7, n, now)), None)
    assert got == reset_at


def test_overdue_on_timers_and_forget() -> None:
    cap = CreditCap(cap=10, grace=1.0)
    cap.observe(1, 50, now=0.0)
    cap.observe(2, 50, now=0.5)
    cap.observe(3, 5, now=0.0)
    assert cap.overdue(0.9) == []
    assert cap.overdue(1.0) == [1]
    assert sorted(cap.overdue(2.0)) == [1, 2]
    cap.forget(1)
    cap.forget(99)  # unknown: harmless
    assert cap.overdue(2.0) == [2]
