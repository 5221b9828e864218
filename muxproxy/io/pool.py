"""A cluster's fixed pool of persistent backend connections, executing the pool policy.

Each backend gets ``connections`` slots; a maintainer task keeps each slot filled: it connects,
runs the connection, and opens the replacement the moment the connection retires (GOAWAY,
stream ids running out, or death) while the old one drains.  Every decision — which connection
takes a stream, when to queue, grow, eject, back off, give up, warn — is taken by the pure
:mod:`muxproxy.core.pool_policy` from numbers and ``now``; this module only executes them
(tasks, sleeps, logging) and keeps the connections.

Public API used by reload and DNS discovery: :meth:`ClusterPool.set_backends` (the backend set
changes: new addresses get their connections, vanished ones drain) and
:meth:`ClusterPool.drain` (the whole pool stops taking streams, lets in-flight ones and tunnels
finish, and closes by a deadline).
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import anyio
import anyio.abc

from ..config import Address, ClusterConfig
from ..core.pool_policy import (
    CAPACITY_WARN_EVERY,
    BackendView,
    ConnView,
    Health,
    RateLimit,
    Scheduler,
    Slots,
    WaitQueue,
    capacity_limited,
    grow_target,
    retry_delay,
    unreachable,
)
from ..core.relay import StreamState
from ..errors import BackendUnavailable, NoExtendedConnect
from .backend import BackendConnection, ConnectionStatistics, Signal
from .discovery import Discovery, is_name
from .protocols import PROTOCOLS
from .timers import TimerWheel

log = logging.getLogger("muxproxy.pool")

Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True, eq=False)
class _Backend:
    address: Address
    conns: list[BackendConnection] = field(default_factory=list)  # usable (not retired)
    draining: set[BackendConnection] = field(default_factory=set)
    connecting: int = 0
    health: Health = field(default_factory=Health)
    reconnects: int = 0
    retired_counters: Counter[str] = field(default_factory=Counter)
    removed: bool = False  # gone from the backend set (DNS): its connections drain

    def view(self, now: float) -> BackendView:
        h = self.health
        return BackendView(h.usable(now), len(self.conns), self.connecting, h.failures)

    # (read by tests and the admin page)
    @property
    def healthy(self) -> bool:
        return self.health.checks_ok

    @property
    def failures(self) -> int:
        return self.health.failures


@dataclass(slots=True, eq=False)
class _Pending:
    headers: Headers
    end_stream: bool
    connect_protocol: bool  # needs a backend with SETTINGS_ENABLE_CONNECT_PROTOCOL
    signal: Signal = field(default_factory=Signal)
    result: tuple[BackendConnection, StreamState] | None = None
    error: str | None = None
    done: bool = False


@dataclass(frozen=True, slots=True)
class BackendStatistics:
    address: str
    healthy: bool  # usable and not known down (0 when unreachable, even as the only backend)
    ejected: bool
    connecting: int
    reconnects: int
    consecutive_failures: int
    open_connections: int  # TCP (h2) or QUIC (h3) connections open to it from this worker
    connections: tuple[ConnectionStatistics, ...]  # usable and draining
    resets_received: int  # over the pool's life, closed connections included
    refused_received: int
    ping_timeouts: int
    removed: bool = False  # left the backend set (reload or DNS): draining


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    cluster: str
    connections: int  # usable now
    draining: int
    connecting: int
    streams_open: int
    pending: int
    counters: dict[str, int]
    backends: tuple[BackendStatistics, ...]


class ClusterPool:
    """The connections of one cluster, its queue and its backends' health.

    ``rand`` is the jitter source of reconnect delays (uniform in [0, 1)); tests may pin it.
    """

    def __init__(
        self,
        cfg: ClusterConfig,
        wheel: TimerWheel,
        *,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.cfg = cfg
        self.wheel = wheel
        self.rand = rand
        self.protocol = PROTOCOLS[cfg.protocol]
        self.tls = self.protocol.tls_context(cfg)
        self.backends = [_Backend(a) for a in cfg.backends]
        self.removed: list[_Backend] = []  # left the backend set, still draining
        self.scheduler = Scheduler(cfg.balance)
        self.queue: WaitQueue[_Pending] = WaitQueue(cfg.max_pending, cfg.pending_timeout)
        self.counters: Counter[str] = Counter()
        self._tg: anyio.abc.TaskGroup | None = None
        self._closing = False  # drain() began: no new streams, no reconnects
        self._retiring: set[BackendConnection] = set()  # retired by us: close when idle
        self._capacity_log = RateLimit(CAPACITY_WARN_EVERY)
        self._unreachable_log = RateLimit(CAPACITY_WARN_EVERY)
        self.discovery: Discovery | None = None  # when some backend is a DNS name

    # --- lifecycle ---------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect every slot and keep it connected until cancelled or drained."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            if any(is_name(a.host) for a in self.cfg.backends):
                self.discovery = Discovery(self.cfg, self.set_backends)
                self.backends = [b for b in self.backends if not is_name(b.address.host)]
            for b in self.backends:
                self._start_backend(b)
            if self.discovery is not None:
                await tg.start(self.discovery.run)  # the first answers are in before we serve
            task_status.started()

    def _start_backend(self, b: _Backend) -> None:
        assert self._tg is not None
        for _ in range(self.cfg.connections):
            b.connecting += 1  # counted now: a request may arrive before the task runs
            self._tg.start_soon(self._maintain, b, True)
        if self.cfg.health is not None:
            self._tg.start_soon(self._health_checks, b)

    def set_backends(self, addresses: Iterable[Address]) -> None:
        """Make ``addresses`` the cluster's backend set (reload, DNS discovery).

        A new address gets its ``connections`` at once; one that vanished takes no new streams
        and drains: its in-flight streams (tunnels included) finish, then each of its
        connections closes, and it is not reconnected.  An address that stays keeps its
        connections untouched.  Call it after :meth:`run` has started.
        """
        wanted = list(dict.fromkeys(addresses))
        current = {b.address: b for b in self.backends}
        keep: list[_Backend] = []
        for addr in wanted:
            b = current.pop(addr, None)
            if b is None:
                b = _Backend(addr)
                log.info("cluster %s: backend %s added", self.cfg.name, addr)
                if self._tg is not None and not self._closing:
                    self._start_backend(b)
            keep.append(b)
        self.backends = keep
        for b in current.values():
            log.info("cluster %s: backend %s removed: draining", self.cfg.name, b.address)
            self._retire_backend(b)
        self.removed = [b for b in self.removed if b.conns or b.draining or b.connecting]
        self._serve_queue()

    def _retire_backend(self, b: _Backend) -> None:
        b.health.remove()
        self.removed.append(b)
        for conn in list(b.conns):
            self._retire(conn)

    def _retire(self, conn: BackendConnection) -> None:
        """No new streams on ``conn``; close it once its last stream ends."""
        conn.retired.set()
        self._retiring.add(conn)
        self._close_if_idle(conn)

    def _close_if_idle(self, conn: BackendConnection) -> None:
        core = conn.core
        if core.closed:
            self._retiring.discard(conn)
        elif not core.streams:
            core.close()  # GOAWAY (h2) / CONNECTION_CLOSE (h3); the writer then closes
            conn.schedule_flush()
            self._retiring.discard(conn)

    async def drain(self, timeout: float = math.inf) -> None:
        """Stop taking streams and close the pool, gracefully within ``timeout`` seconds.

        New :meth:`open_stream` calls get 503 at once; requests already queued are still
        served; in-flight streams and tunnels finish; each connection closes when its last
        stream ends; at the deadline whatever is left is closed (its streams fail) and the
        pool's tasks end (:meth:`run` returns).  Reload calls it on a changed or removed
        cluster's old pool (it may instead bound the wait itself and cancel :meth:`run`).
        """
        self._closing = True
        with anyio.move_on_after(timeout) as scope:
            while self.queue.live:
                await anyio.sleep(0.05)  # (bounded by pending_timeout) then retire
            for b in (*self.backends, *self.removed):
                for conn in list(b.conns):
                    self._retire(conn)
            while any(b.conns or b.draining for b in (*self.backends, *self.removed)):
                await anyio.sleep(0.05)
        if scope.cancel_called:
            log.warning("cluster %s: drain deadline reached: closing what is left",
                        self.cfg.name)
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    async def _maintain(self, b: _Backend, permanent: bool) -> None:
        """Keep one connection slot filled (``permanent``), or fill it once (growth).
        The caller has already counted this slot in ``b.connecting``."""
        attempt = 0  # consecutive failures of this slot: its reconnect backoff
        idle_closes = 0  # consecutive idle closes of connections that carried nothing
        counted = True  # this slot is in b.connecting: requests queue for it rather than fail
        try:
            while not (self._closing or b.health.removed):
                if not counted:
                    b.connecting += 1
                    counted = True
                conn = BackendConnection(
                    b.address,
                    self.cfg,
                    self.protocol,
                    tls=self.tls,
                    on_capacity=self._on_capacity,
                    wheel=self.wheel,
                )
                try:
                    await conn.connect()
                except BackendUnavailable as exc:
                    b.connecting -= 1
                    counted = False
                    self.counters["connect_failures"] += 1
                    self._failed(b, exc.reason)
                    self._fail_pending_if_unreachable()
                    if not permanent:
                        return
                    attempt += 1
                    await anyio.sleep(retry_delay(attempt, self.rand))
                    continue
                b.connecting -= 1
                counted = False
                attempt = 0
                ended = b.health.connected()
                if ended:
                    log.info("cluster %s: backend %s reachable again (after %d failures)",
                             self.cfg.name, b.address, ended)
                b.conns.append(conn)
                if self.counters["connections_opened"] >= self.cfg.connections * len(
                    self.backends
                ):
                    b.reconnects += 1
                self.counters["connections_opened"] += 1
                assert self._tg is not None
                self._tg.start_soon(self._run_conn, b, conn)
                if self._closing or b.health.removed:
                    self._retire(conn)
                self._on_capacity(conn)
                await conn.retired.wait()
                if conn in b.conns:
                    b.conns.remove(conn)
                if not conn.closed.is_set():
                    b.draining.add(conn)
                if conn.core.goaway_last_stream_id is not None:
                    self.counters["goaway_received"] += 1
                if not permanent or self._closing or b.health.removed:
                    return  # (retired by us: closed by us, never a failure)
                core = conn.core
                if core.closed and core.goaway_last_stream_id is None:
                    if conn.streams_lost_at_close == 0:
                        # An idle connection closed by the peer (its idle timeout): routine,
                        # not a failure.  Reopened at once, unless it keeps happening to
                        # connections that never carried a stream: then with backoff.
                        log.info("%r: backend closed the idle connection (%s); reopening",
                                 conn, core.close_reason)
                        idle_closes = 0 if conn.streams_opened else idle_closes + 1
                        if idle_closes > 1:
                            await anyio.sleep(retry_delay(idle_closes - 1, self.rand))
                        continue
                    # Died rather than drained: count it towards ejection, do not hammer it,
                    # and let requests queue for the replacement meanwhile.
                    self._failed(b, core.close_reason)
                    b.connecting += 1
                    counted = True
                    attempt += 1
                    await anyio.sleep(retry_delay(attempt, self.rand))
        finally:
            if counted:
                b.connecting -= 1

    def _failed(self, b: _Backend, reason: str) -> None:
        now = self.wheel.now
        d = b.health.failed(
            reason, now, backends=len(self.backends), eject_after=self.cfg.eject_after,
            rand=self.rand,
        )
        if d.went_down:
            log.warning("cluster %s: backend %s down: %s", self.cfg.name, b.address, reason)
        elif d.still_down is not None:
            log.info("cluster %s: backend %s still down after %d failures "
                     "(%d attempts not logged): %s", self.cfg.name, b.address,
                     b.health.failures, d.still_down, reason)
        if d.eject_for:
            self.counters["ejections"] += 1
            log.warning(
                "cluster %s: ejecting %s for %.1fs after %d failures",
                self.cfg.name,
                b.address,
                d.eject_for,
                b.health.failures,
            )

    async def _run_conn(self, b: _Backend, conn: BackendConnection) -> None:
        try:
            await conn.serve()
        except* Exception as exc:  # a bug must cost one connection, never the proxy
            # (except*: a bug met while cancelled comes grouped with trio's Cancelled)
            log.error("%r: internal error: %r", conn, exc, exc_info=log.isEnabledFor(10))
            self.counters["internal_errors"] += 1
        finally:
            if conn in b.conns:
                b.conns.remove(conn)
            b.draining.discard(conn)
            self._retiring.discard(conn)
            gone = b.health.removed and not (b.conns or b.draining or b.connecting)
            if gone and b in self.removed:
                self.removed.remove(b)  # fully drained: forgotten
            core = conn.core
            b.retired_counters["resets_received"] += core.resets_received
            b.retired_counters["refused_received"] += core.refused_received
            b.retired_counters["ping_timeouts"] += conn.ping_timeouts

    async def _health_checks(self, b: _Backend) -> None:
        """Active checks over the pooled connections: GET ``health.path`` every interval;
        a non-2xx answer or none within the timeout takes the backend out of rotation."""
        hc = self.cfg.health
        assert hc is not None
        authority = str(b.address).encode()
        head = [
            (b":method", b"GET"),
            (b":scheme", b"https" if self.tls else b"http"),
            (b":authority", authority),
            (b":path", hc.path.encode()),
            (b"user-agent", b"muxproxy-health"),
        ]
        while not (self._closing or b.health.removed):
            # No connection is the pool's business (backoff, ejection), not the checker's.
            conns = [c for c in b.conns if c.core.free_streams() > 0]
            if conns:
                conn = conns[0]
                st = conn.open_stream(list(head), True)
                news = Signal()
                conn.news[st.stream_id] = news
                try:
                    with anyio.move_on_after(hc.timeout):
                        while st.headers is None and st.reset_code is None:
                            await news.wait()
                    status = dict(st.headers or ()).get(b":status", b"")
                finally:
                    conn.release(st)
                ok = status[:1] == b"2"
                if b.health.checked(ok):
                    log.warning(
                        "cluster %s: backend %s is %s (health check: %s)",
                        self.cfg.name,
                        b.address,
                        "healthy again" if ok else "unhealthy",
                        f"status {status.decode()}" if status else "no answer in time",
                    )
                    if ok:
                        self._on_capacity(conn)
            await anyio.sleep(hc.interval)

    # --- stream admission --------------------------------------------------------------

    def _pick(self, connect_protocol: bool = False) -> BackendConnection | None:
        now = self.wheel.now
        if connect_protocol:  # (rare: a WebSocket) only connections that allow RFC 8441
            views: list[Sequence[Slots]] = [
                [ConnView(c.free if c.core.enable_connect_protocol else 0, c.open) for c in b.conns]
                if now >= b.health.open_at  # (Health.usable, inlined: every request)
                else ()
                for b in self.backends
            ]
        else:  # (a loop, not a comprehension: one frame fewer per request)
            views = []
            for b in self.backends:
                views.append(b.conns if now >= b.health.open_at else ())
        choice = self.scheduler.pick(views)
        if choice is None:
            return None
        return self.backends[choice[0]].conns[choice[1]]

    def _try_open(
        self, headers: Headers, end_stream: bool, connect_protocol: bool = False
    ) -> tuple[BackendConnection, StreamState] | None:
        conn = self._pick(connect_protocol)
        if conn is None:
            return None
        return conn, conn.open_stream(headers, end_stream)

    async def open_stream(
        self, headers: Headers, end_stream: bool, *, connect_protocol: bool = False,
        replay: bool = False,
    ) -> tuple[BackendConnection, StreamState]:
        """Open a stream carrying the request head, waiting in the FIFO if every connection is
        full (a ``replay`` waits at its front).  Raises BackendUnavailable (503) when the queue
        is full, the wait exceeds ``pending_timeout``, no backend can be reached, or the pool
        is draining; NoExtendedConnect (502) when ``connect_protocol`` is asked and no
        connected backend supports RFC 8441."""
        if self._closing:
            raise BackendUnavailable("cluster is being replaced (draining)")
        queue = self.queue
        if not queue.live:
            got = self._try_open(headers, end_stream, connect_protocol)
            if got is not None:
                return got
        if connect_protocol and not self.supports_connect_protocol():
            raise NoExtendedConnect("backend does not support WebSockets over HTTP/2 (RFC 8441)")
        now = self.wheel.now
        if unreachable([b.view(now) for b in self.backends]):
            # The details (addresses, errors) are for the log, not for clients.
            self._log_unreachable(now)
            raise BackendUnavailable("no backend reachable")
        if queue.full():
            self.counters["pending_overflow"] += 1
            raise BackendUnavailable("too many requests waiting for a backend stream")
        self._maybe_grow(now)
        w = _Pending(headers, end_stream, connect_protocol)
        queue.push(w, now, front=replay)
        self.counters["queued"] += 1
        try:
            with anyio.move_on_after(queue.timeout):
                while w.result is None and w.error is None:
                    await w.signal.wait()
        except BaseException:
            queue.take(w)
            if w.result is not None:
                w.result[0].release(w.result[1])
            raise
        queue.take(w)
        if w.result is not None:
            return w.result
        self.counters["pending_timeout"] += 1
        raise BackendUnavailable(w.error or "no backend stream became free within pending_timeout")

    def _on_capacity(self, conn: BackendConnection) -> None:
        """A stream closed, a connection came up, or SETTINGS changed: serve the queue."""
        if self._retiring and conn in self._retiring:
            self._close_if_idle(conn)
        if self.queue.live:
            self._serve_queue()

    def _serve_queue(self) -> None:
        queue = self.queue
        while (w := queue.first()) is not None:
            got = self._try_open(w.headers, w.end_stream, w.connect_protocol)
            if got is None:
                return
            w.result = got
            queue.take(w)
            w.signal.set()

    def supports_connect_protocol(self) -> bool:
        """Some connected backend announced SETTINGS_ENABLE_CONNECT_PROTOCOL = 1, or no
        connection is up yet to say otherwise."""
        conns = [c for b in self.backends for c in b.conns]
        return not conns or any(c.core.enable_connect_protocol for c in conns)

    def pick_backend(self) -> Address:
        """A usable backend address, for a dedicated (non-pooled) connection."""
        now = self.wheel.now
        usable = [b for b in self.backends if b.health.usable(now) and b.conns] or self.backends
        b = usable[self.counters["dedicated"] % len(usable)]
        self.counters["dedicated"] += 1
        return b.address

    def _maybe_grow(self, now: float) -> None:
        """About to queue: open one more connection if the policy allows, or else say so once
        a minute when the configuration itself is the limit."""
        cap = self.cfg.connection_cap
        target = None
        if self._tg is not None:
            target = grow_target([b.view(now) for b in self.backends], self.cfg.connections, cap)
        if target is not None:
            b = self.backends[target]
            log.warning(
                "cluster %s: all %d connections to %s are full; opening one more (cap %d)",
                self.cfg.name,
                len(b.conns),
                b.address,
                cap,
            )
            self.counters["grown"] += 1
            b.connecting += 1
            assert self._tg is not None
            self._tg.start_soon(self._maintain, b, False)
            return
        conns = [c for b in self.backends if b.health.usable(now) for c in b.conns]
        connecting = sum(b.connecting for b in self.backends)
        if capacity_limited(conns, connecting, can_grow=False):
            held = self._capacity_log.hit(now)
            if held is not None:
                streams = sum(c.core.stream_limit() for c in conns)
                log.warning(
                    "cluster %s: pool capacity is the limit: %d connections, %d streams, all "
                    "in use; requests and WebSockets are queueing (%d times since the last "
                    "warning). Raise the backend's stream limit (SETTINGS_MAX_CONCURRENT_STREAMS"
                    ", and max_streams_per_connection) or set max_connections",
                    self.cfg.name, len(conns), streams, held + 1,
                )

    def _log_unreachable(self, now: float) -> None:
        held = self._unreachable_log.hit(now)
        if held is not None:
            log.info("cluster %s: no backend reachable (%d refusals not logged): %s",
                     self.cfg.name, held, self._last_error())

    def _last_error(self) -> str:
        return (
            "; ".join(b.health.last_error for b in self.backends if b.health.last_error)
            or "not connected"
        )

    def _fail_pending_if_unreachable(self) -> None:
        now = self.wheel.now
        if not unreachable([b.view(now) for b in self.backends]):
            return
        if self.queue.live:
            self._log_unreachable(now)
        for w in self.queue.drain():
            w.error = "no backend reachable"
            w.signal.set()

    # --- observation -------------------------------------------------------------------

    def statistics(self) -> PoolStatistics:
        now = self.wheel.now
        backends = []
        for b in (*self.backends, *self.removed):
            conns = tuple(c.statistics() for c in (*b.conns, *b.draining))
            h = b.health
            backends.append(
                BackendStatistics(
                    address=str(b.address),
                    healthy=h.reachable(len(b.conns), now),
                    ejected=h.ejected(now),
                    connecting=b.connecting,
                    reconnects=b.reconnects,
                    consecutive_failures=h.failures,
                    open_connections=len(b.conns) + len(b.draining),
                    connections=conns,
                    resets_received=b.retired_counters["resets_received"]
                    + sum(c.resets_received for c in conns),
                    refused_received=b.retired_counters["refused_received"]
                    + sum(c.refused_received for c in conns),
                    ping_timeouts=b.retired_counters["ping_timeouts"]
                    + sum(c.ping_timeouts for c in conns),
                    removed=h.removed,
                )
            )
        return PoolStatistics(
            cluster=self.cfg.name,
            connections=sum(len(b.conns) for b in self.backends),
            draining=sum(len(b.draining) for b in (*self.backends, *self.removed)),
            connecting=sum(b.connecting for b in self.backends),
            streams_open=sum(
                len(c.core.streams) for b in (*self.backends, *self.removed) for c in b.conns
            ),
            pending=self.queue.live,
            counters=dict(self.counters),
            backends=tuple(backends),
        )
