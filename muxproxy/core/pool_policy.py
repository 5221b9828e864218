"""Pool policy, pure: which connection takes a stream, when to grow, queue, eject, back off.

Theory of operation
-------------------
The I/O pool (``io/pool.py``) owns sockets, tasks and timers; every *decision* it takes is made
here, from plain numbers and the ``now`` it passes in, and handed back as a value.  Nothing here
awaits, reads a clock or draws a random number of its own (the jitter source is injected), so
every rule is a row in a table test.

* **Pick** (:class:`Scheduler`): ``least_streams`` takes the connection with the fewest open
  streams across backends; ``round_robin`` takes backends in turn (skipping full ones) and,
  within one, the fewest open streams.  Only connections with a free stream slot (the backend's
  SETTINGS_MAX_CONCURRENT_STREAMS and our cap, not draining) are candidates.  The snapshot may be
  the live connections themselves (anything with ``free`` and ``open``), so a pick allocates
  nothing: it is on every request's path.
* **Growth** (:func:`grow_target`): past ``connections`` only while every connection is full,
  one connection at a time per backend, never past ``max_connections``.
* **Queue** (:class:`WaitQueue`): a FIFO bounded by ``max_pending``; each waiter has a deadline
  ``now + pending_timeout``.  A replay (a stream the backend provably did not process) goes to
  the front: it is older than everything behind it.
* **Failures** (:class:`Health`): connect failures and connections lost to errors are counted;
  after ``eject_after`` consecutive ones a backend of a cluster with more than one is ejected for
  an exponentially growing pause.  Reconnects back off exponentially with jitter
  (:func:`retry_delay`).  A backend is *down* from its first failure to its next success: that
  is logged once each way, and the attempts in between at most once per ``DOWN_LOG_EVERY`` with
  a count (:class:`RateLimit`).
* **Unreachable** (:func:`unreachable`): answer 503 at once rather than queue when no backend is
  usable, or each is known down (failed, no live connection, not connecting).
* **Capacity** (:func:`capacity_limited`): every connection at its stream limit and growth
  impossible: the pool's configuration is the limit, worth one warning a minute.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

BACKOFF_MIN = 0.05  # seconds: first reconnect delay, and the unit of the ejection pause
BACKOFF_MAX = 5.0
DOWN_LOG_EVERY = 60.0  # a down backend's failed attempts are summarised this often
CAPACITY_WARN_EVERY = 60.0


# --- pick ---------------------------------------------------------------------------------


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


# --- growth and capacity --------------------------------------------------------------------


def should_grow(live: int, connecting: int, cap: int, all_full: bool) -> bool:
    """Open one more connection to a backend: only when every one is full, one at a time."""
    return all_full and connecting == 0 and live < cap


@dataclass(frozen=True, slots=True)
class BackendView:
    """What the pool-wide rules need of one backend, at one instant."""

    usable: bool  # not ejected, active checks pass, not removed
    live: int  # connections that take streams (not retired)
    connecting: int
    failures: int  # consecutive failures (0 once a connection came up)


def grow_target(backends: Sequence[BackendView], connections: int, cap: int) -> int | None:
    """The backend to open one more connection to, when a request is about to queue because
    every connection is full; None when ``max_connections`` does not allow growth."""
    if cap <= connections:
        return None
    for i, b in enumerate(backends):
        if b.usable and b.live and should_grow(b.live, b.connecting, cap, all_full=True):
            return i
    return None


def capacity_limited(conns: Sequence[Slots], connecting: int, can_grow: bool) -> bool:
    """Every connection is up and at its stream limit, none is coming, and the pool may not
    grow: requests queue because of the configuration, not because of a passing burst."""
    return bool(conns) and connecting == 0 and not can_grow and all(c.free <= 0 for c in conns)


def unreachable(backends: Sequence[BackendView]) -> bool:
    """Answer 503 at once rather than queue: no backend is usable, or every one is known down
    (its last attempt failed, it has no live connection and none is being opened).  A backend
    that merely lost a connection and is reconnecting still queues requests."""
    return all(
        not b.usable or (not b.live and b.failures > 0 and not b.connecting) for b in backends
    )


# --- failures, ejection, backoff -------------------------------------------------------------


def retry_delay(attempt: int, rand: Callable[[], float]) -> float:
    """Delay before reconnect ``attempt`` (1 = the first retry): exponential from BACKOFF_MIN,
    capped at BACKOFF_MAX, times a jitter in [0.5, 1.5) from ``rand`` (uniform in [0, 1))."""
    base = min(BACKOFF_MAX, BACKOFF_MIN * 2.0 ** max(0, attempt - 1))
    return base * (0.5 + rand())


def ejection_pause(failures: int) -> float:
    return min(BACKOFF_MAX, BACKOFF_MIN * 2.0**failures)


@dataclass(slots=True)
class RateLimit:
    """At most one line per ``every`` seconds; the lines held back are counted."""

    every: float
    next_at: float = float("-inf")
    suppressed: int = 0

    def hit(self, now: float) -> int | None:
        """None: stay quiet.  Otherwise log now, mentioning the count returned (held back)."""
        if now < self.next_at:
            self.suppressed += 1
            return None
        held, self.suppressed = self.suppressed, 0
        self.next_at = now + self.every
        return held

    def reset(self) -> None:
        self.next_at = float("-inf")
        self.suppressed = 0


@dataclass(frozen=True, slots=True)
class FailureDecision:
    went_down: bool  # first failure: log once that the backend is down
    still_down: int | None  # log a summary now, with this many attempts held back; None: quiet
    eject_for: float  # > 0: no new streams for that long
    retry_in: float  # the reconnect delay


@dataclass(slots=True)
class Health:
    """One backend's failure and health state."""

    failures: int = 0  # consecutive connect failures or connections lost to errors
    last_error: str = ""
    ejected_until: float = 0.0  # passive ejection: no new streams before this time
    checks_ok: bool = True  # the last active health check passed (or none is configured)
    removed: bool = False  # no longer in the cluster's backend set: draining
    down_log: RateLimit = field(default_factory=lambda: RateLimit(DOWN_LOG_EVERY))
    # usable(now) is ``now >= open_at``: one comparison on the pick's path.  Kept in step by
    # the methods below; change the three fields above only through them.
    open_at: float = 0.0

    def __post_init__(self) -> None:
        self._update()

    def _update(self) -> None:
        self.open_at = (
            self.ejected_until if self.checks_ok and not self.removed else float("inf")
        )

    def usable(self, now: float) -> bool:
        return now >= self.open_at

    def remove(self) -> None:
        """The backend left the cluster's backend set: no new streams, ever."""
        self.removed = True
        self._update()

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def reachable(self, live: int, now: float) -> bool:
        """What ``muxproxy_backend_healthy`` says: usable, and not known down."""
        return self.usable(now) and (live > 0 or self.failures == 0)

    def failed(
        self,
        reason: str,
        now: float,
        *,
        backends: int,
        eject_after: int,
        rand: Callable[[], float],
    ) -> FailureDecision:
        """A connect attempt failed, or a connection was lost to an error."""
        self.failures += 1
        self.last_error = reason
        went_down = self.failures == 1
        if went_down:
            self.down_log.reset()
            self.down_log.hit(now)
            still = None
        else:
            still = self.down_log.hit(now)
        eject = 0.0
        if self.failures >= eject_after and backends > 1:
            eject = ejection_pause(self.failures)
            self.ejected_until = now + eject
            self._update()
        return FailureDecision(went_down, still, eject, retry_delay(self.failures, rand))

    def connected(self) -> int:
        """A connection came up.  Returns the failures it ends (> 0: log "reachable again")."""
        ended, self.failures = self.failures, 0
        self.ejected_until = 0.0
        self._update()
        return ended

    def checked(self, ok: bool) -> bool:
        """An active health check answered; True when that changes the state (log it)."""
        changed = ok != self.checks_ok
        self.checks_ok = ok
        self._update()
        return changed


# --- the queue --------------------------------------------------------------------------------


class Waiter(Protocol):
    done: bool  # served, failed or gone: skipped when reached


W = TypeVar("W", bound=Waiter)


class WaitQueue(Generic[W]):
    """The pending FIFO, bounded by ``limit``.  Waiters that leave (timeout, cancellation) are
    marked ``done`` and skipped lazily; ``live`` counts the others."""

    def __init__(self, limit: int, timeout: float) -> None:
        self.limit = limit
        self.timeout = timeout
        self._q: deque[W] = deque()
        self.live = 0

    def full(self) -> bool:
        return self.live >= self.limit

    def push(self, w: W, now: float, *, front: bool = False) -> float:
        """Queue ``w``; returns its deadline.  A replay goes to the front."""
        if front:
            self._q.appendleft(w)
        else:
            self._q.append(w)
        self.live += 1
        return now + self.timeout

    def first(self) -> W | None:
        """The oldest waiter still waiting."""
        q = self._q
        while q:
            w = q[0]
            if not w.done:
                return w
            q.popleft()
        return None

    def take(self, w: W) -> None:
        """``w`` leaves the queue (served, failed, timed out or cancelled)."""
        if not w.done:
            w.done = True
            self.live -= 1

    def drain(self) -> Iterator[W]:
        """Every waiter still waiting, oldest first, each taken out."""
        while (w := self.first()) is not None:
            self.take(w)
            yield w
