"""Coarse deadlines for very many objects, at O(1) per change (a timer wheel, as HAProxy does).

Theory of operation
-------------------

A cancel scope per read, write and wait was measured at about a tenth of a proxied request's
cost.  Instead every object that can time out carries a ``deadline`` attribute and sits in at
most one bucket of the wheel, the bucket of the deadline it had when it was filed.  Moving a
deadline *later* is one attribute write (the object is re-filed when its old bucket comes up);
moving it *earlier* moves it to an earlier bucket.  One task (``io/timers.py``) calls
:meth:`TimerWheel.tick` with the time every ``resolution`` seconds, which calls
``on_deadline()`` on each object whose deadline has passed; the wheel itself is pure (time is
passed in).  Deadlines are therefore honoured within one ``resolution`` (50 ms by default),
which is plenty for timeouts measured in seconds.
"""

from __future__ import annotations

import math
from typing import Protocol


class Timed(Protocol):
    deadline: float  # anyio clock; math.inf when none
    timer_bucket: int | None  # owned by the wheel

    def on_deadline(self) -> None: ...


class TimerWheel:
    def __init__(self, resolution: float = 0.05) -> None:
        self.resolution = resolution
        self.now = 0.0  # the clock at the last tick: cheap to read, never ahead of real time
        self._buckets: dict[int, set[Timed]] = {}
        self._next = 0  # the first bucket the next tick will look at

    def start(self, obj: Timed, timeout: float) -> None:
        """Give ``obj`` a deadline ``timeout`` seconds from now (replacing any other)."""
        self.set(obj, self.now + timeout)

    def set(self, obj: Timed, deadline: float) -> None:
        obj.deadline = deadline
        if deadline == math.inf:
            return
        key = max(math.ceil(deadline / self.resolution), self._next)
        old = obj.timer_bucket
        if old is not None:
            if old <= key:
                return  # re-filed when its earlier bucket comes up
            self._buckets[old].discard(obj)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = set()
        bucket.add(obj)
        obj.timer_bucket = key

    @staticmethod
    def clear(obj: Timed) -> None:
        obj.deadline = math.inf  # its bucket entry is dropped when that bucket comes up

    def discard(self, obj: Timed) -> None:
        """Forget ``obj`` entirely (it is going away)."""
        obj.deadline = math.inf
        if obj.timer_bucket is not None:
            bucket = self._buckets.get(obj.timer_bucket)
            if bucket is not None:
                bucket.discard(obj)
            obj.timer_bucket = None

    def tick(self, now: float) -> None:
        self.now = now
        upto = math.floor(now / self.resolution)
        first = self._next if self._next else upto
        self._next = upto + 1  # anything filed from here on waits for the next tick
        buckets = self._buckets
        for key in range(first, upto + 1):
            bucket = buckets.pop(key, None)
            if not bucket:
                continue
            for obj in bucket:
                obj.timer_bucket = None
                if obj.deadline <= now:
                    obj.deadline = math.inf
                    obj.on_deadline()
                elif obj.deadline != math.inf:
                    self.set(obj, obj.deadline)
