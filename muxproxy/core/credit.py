"""Per-stream caps on buffered response bytes, for transports without consumption-tied credit.

HTTP/2 gives the proxy real backpressure: it acknowledges DATA only once written to the client.
aioquic's QUIC stream windows grow as data *arrives*, so over HTTP/3 a backend may keep sending
to a client that reads nothing.  :class:`CreditCap` bounds the damage: a stream whose unsent
bytes exceed ``cap`` for longer than ``grace`` seconds is to be reset (H3_REQUEST_CANCELLED),
which ends that one exchange and frees its memory; brief bursts over the cap are tolerated.
Pure bookkeeping: time is passed in.
"""

from __future__ import annotations


class CreditCap:
    def __init__(self, cap: int, grace: float) -> None:
        self.cap = cap
        self.grace = grace
        self._over_since: dict[int, float] = {}  # stream id → when it went over the cap

    def observe(self, stream_id: int, buffered: int, now: float) -> bool:
        """Record a stream's buffered bytes; True when it must be reset now."""
        if buffered <= self.cap:
            self._over_since.pop(stream_id, None)
            return False
        since = self._over_since.setdefault(stream_id, now)
        return now - since >= self.grace

    def overdue(self, now: float) -> list[int]:
        """Streams over the cap for longer than the grace period (checked on timers)."""
        return [sid for sid, since in self._over_since.items() if now - since >= self.grace]

    def forget(self, stream_id: int) -> None:
        self._over_since.pop(stream_id, None)
