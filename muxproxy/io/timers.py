"""The timer wheel's clock: one task ticking :class:`muxproxy.core.timers.TimerWheel`.

The wheel (buckets, deadlines, re-filing) is pure and lives in ``core/``; this is the loop that
reads the clock every ``resolution`` seconds and hands it to :meth:`TimerWheel.tick`.
"""

from __future__ import annotations

import anyio

from ..core.timers import Timed
from ..core.timers import TimerWheel as _Wheel


class TimerWheel(_Wheel):
    async def run(self) -> None:
        self.tick(anyio.current_time())
        while True:
            await anyio.sleep(self.resolution)
            self.tick(anyio.current_time())


__all__ = ["Timed", "TimerWheel"]
