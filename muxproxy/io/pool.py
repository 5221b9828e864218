"""A cluster's fixed pool of persistent HTTP/2 connections, and its bounded FIFO queue.

Each backend gets ``connections`` slots; a maintainer task keeps each slot filled: it connects
(with backoff and jitter after failures), runs the connection, and opens the replacement the
moment the connection retires (GOAWAY, stream ids running out, or death) while the old one
drains.  Requests take a stream on the connection the scheduler picks; when every connection
is full they wait in a FIFO bounded by ``max_pending`` for at most ``pending_timeout`` (then
503).  The pool grows past ``connections`` only if ``max_connections`` allows it, only while
every connection is full, one connection at a time, and says so in the log.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import anyio
import anyio.abc

from ..config import Address, ClusterConfig
from ..core.relay import StreamState
from ..core.scheduler import ConnView, Scheduler, Slots, should_grow
from ..errors import BackendUnavailable, NoExtendedConnect
from .backend import BackendConnection, ConnectionStatistics, Signal, client_tls_context
from .discovery import Discovery, is_name
from .quic import QuicBackendConnection
from .timers import TimerWheel

log = logging.getLogger("muxproxy.pool")

BACKOFF_MIN = 0.05
BACKOFF_MAX = 5.0

Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class _Backend:
    address: Address
    conns: list[BackendConnection] = field(default_factory=list)  # usable (not retired)
    draining: set[BackendConnection] = field(default_factory=set)
    connecting: int = 0
    failures: int = 0  # consecutive connect failures or connections lost to errors
    last_error: str = ""
    ejected_until: float = 0.0  # passive ejection: no new streams before this time
    healthy: bool = True  # the last active health check passed (or none is configured)
    reconnects: int = 0
    retired_counters: Counter[str] = field(default_factory=Counter)
    removed: bool = False  # gone from the backend set (DNS): its connections drain

    def usable(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until


@dataclass(slots=True)
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
    healthy: bool  # active checks pass and not passively ejected
    ejected: bool
    connecting: int
    reconnects: int
    consecutive_failures: int
    connections: tuple[ConnectionStatistics, ...]  # usable and draining
    resets_received: int  # over the pool's life, closed connections included
    refused_received: int
    ping_timeouts: int


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
    def __init__(self, cfg: ClusterConfig, wheel: TimerWheel) -> None:
        self.cfg = cfg
        self.wheel = wheel
        self.tls = client_tls_context(cfg) if cfg.protocol == "h2" else None
        self._connection_class: type[BackendConnection] = (
            QuicBackendConnection if cfg.protocol == "h3" else BackendConnection
        )
        self.backends = [_Backend(a) for a in cfg.backends]
        self.scheduler = Scheduler(cfg.balance)
        self._pending: deque[_Pending] = deque()
        self._pending_live = 0
        self.counters: Counter[str] = Counter()
        self._tg: anyio.abc.TaskGroup | None = None
        self._leaving: set[BackendConnection] = set()  # of removed backends: close when idle
        self.discovery: Discovery | None = None  # when some backend is a DNS name

    # --- lifecycle ---------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect every slot and keep it connected until cancelled."""
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
        """Make ``addresses`` the backend set: a new address gets its ``connections``; a
        vanished one is drained (no new streams; each connection closes once its in-flight
        streams are done)."""
        old = {b.address: b for b in self.backends}
        backends = []
        for a in dict.fromkeys(addresses):
            if a in old:
                backends.append(old.pop(a))
            else:
                backends.append(_Backend(a))
                self._start_backend(backends[-1])
        self.backends = backends
        for b in old.values():
            b.removed = True
            for conn in list(b.conns):
                self._drain(b, conn)
        self._fail_pending_if_unreachable()

    def _drain(self, b: _Backend, conn: BackendConnection) -> None:
        if conn in b.conns:
            b.conns.remove(conn)
        b.draining.add(conn)
        self._leaving.add(conn)
        conn.retired.set()
        self._close_if_idle(conn)

    def _close_if_idle(self, conn: BackendConnection) -> None:
        core = conn.core
        if not core.streams and not core.closed:
            core.close()  # GOAWAY; the writer sends it and closes the socket
            conn.schedule_flush()
        if core.closed:
            self._leaving.discard(conn)

    async def _maintain(self, b: _Backend, permanent: bool) -> None:
        """Keep one connection slot filled (``permanent``), or fill it once (growth).
        The caller has already counted this slot in ``b.connecting``."""
        backoff = BACKOFF_MIN
        counted = True  # this slot is in b.connecting: requests queue for it rather than fail
        while True:
            if b.removed:
                if counted:
                    b.connecting -= 1
                return
            if not counted:
                b.connecting += 1
                counted = True
            conn = self._connection_class(
                b.address, self.cfg, tls=self.tls, on_capacity=self._on_capacity, wheel=self.wheel
            )
            try:
                await conn.connect()
            except BackendUnavailable as exc:
                self._failed(b, exc.reason)
                self.counters["connect_failures"] += 1
                b.connecting -= 1
                counted = False
                self._fail_pending_if_unreachable()
                if not permanent:
                    return
                await anyio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            b.connecting -= 1
            counted = False
            if b.failures:
                log.info("cluster %s: backend %s reachable again", self.cfg.name, b.address)
            b.failures = 0
            b.ejected_until = 0.0
            backoff = BACKOFF_MIN
            b.conns.append(conn)
            if self.counters["connections_opened"] >= self.cfg.connections * len(self.backends):
                b.reconnects += 1
            self.counters["connections_opened"] += 1
            assert self._tg is not None
            self._tg.start_soon(self._run_conn, b, conn)
            if b.removed:  # removed while connecting
                self._drain(b, conn)
            self._on_capacity(conn)
            await conn.retired.wait()
            if conn in b.conns:
                b.conns.remove(conn)
            if not conn.closed.is_set():
                b.draining.add(conn)
            if conn.core.goaway_last_stream_id is not None:
                self.counters["goaway_received"] += 1
            if not permanent or b.removed:
                return
            if conn.core.closed and conn.core.goaway_last_stream_id is None:
                # Died rather than drained: count it towards ejection, do not hammer it, and
                # let requests queue for the replacement meanwhile.
                self._failed(b, conn.core.close_reason)
                b.connecting += 1
                counted = True
                await anyio.sleep(BACKOFF_MIN * (0.5 + random.random()))

    def _failed(self, b: _Backend, reason: str) -> None:
        b.failures += 1
        b.last_error = reason
        if b.failures == 1:
            log.warning("cluster %s: %s", self.cfg.name, reason)
        if b.failures >= self.cfg.eject_after and len(self.backends) > 1:
            pause = min(BACKOFF_MAX, BACKOFF_MIN * 2**b.failures)
            b.ejected_until = anyio.current_time() + pause
            self.counters["ejections"] += 1
            log.warning(
                "cluster %s: ejecting %s for %.1fs after %d failures",
                self.cfg.name,
                b.address,
                pause,
                b.failures,
            )

    async def _run_conn(self, b: _Backend, conn: BackendConnection) -> None:
        try:
            await conn.serve()
        except Exception as exc:  # a bug must cost one connection, never the proxy
            log.error("%r: internal error: %r", conn, exc, exc_info=log.isEnabledFor(10))
            self.counters["internal_errors"] += 1
        finally:
            if conn in b.conns:
                b.conns.remove(conn)
            b.draining.discard(conn)
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
        while not b.removed:
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
                if ok != b.healthy:
                    b.healthy = ok
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
                if b.usable(now)
                else ()
                for b in self.backends
            ]
        else:
            views = [b.conns if b.usable(now) else () for b in self.backends]
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
        self, headers: Headers, end_stream: bool, *, connect_protocol: bool = False
    ) -> tuple[BackendConnection, StreamState]:
        """Open a stream carrying the request head, waiting in the FIFO if every connection is
        full.  Raises BackendUnavailable (503) when the queue is full, the wait exceeds
        ``pending_timeout``, or no backend can be reached; NoExtendedConnect (502) when
        ``connect_protocol`` is asked and no connected backend supports RFC 8441."""
        if not self._pending_live:
            got = self._try_open(headers, end_stream, connect_protocol)
            if got is not None:
                return got
        if connect_protocol and not self.supports_connect_protocol():
            raise NoExtendedConnect("backend does not support WebSockets over HTTP/2 (RFC 8441)")
        if self._unreachable():
            # The details (addresses, errors) are for the log, not for clients.
            log.info("cluster %s: no backend reachable: %s", self.cfg.name, self._last_error())
            raise BackendUnavailable("no backend reachable")
        if self._pending_live >= self.cfg.max_pending:
            self.counters["pending_overflow"] += 1
            raise BackendUnavailable("too many requests waiting for a backend stream")
        self._maybe_grow()
        w = _Pending(headers, end_stream, connect_protocol)
        self._pending.append(w)
        self._pending_live += 1
        self.counters["queued"] += 1
        try:
            with anyio.move_on_after(self.cfg.pending_timeout):
                while w.result is None and w.error is None:
                    await w.signal.wait()
        except BaseException:
            self._forget(w)
            if w.result is not None:
                w.result[0].release(w.result[1])
            raise
        self._forget(w)
        if w.result is not None:
            return w.result
        self.counters["pending_timeout"] += 1
        raise BackendUnavailable(w.error or "no backend stream became free within pending_timeout")

    def _forget(self, w: _Pending) -> None:
        if not w.done:
            w.done = True
            self._pending_live -= 1

    def _on_capacity(self, conn: BackendConnection) -> None:
        """A stream closed, a connection came up, or SETTINGS changed: serve the queue."""
        if self._leaving and conn in self._leaving:
            self._close_if_idle(conn)
            return
        pending = self._pending
        while pending:
            w = pending[0]
            if w.done:
                pending.popleft()
                continue
            got = self._try_open(w.headers, w.end_stream, w.connect_protocol)
            if got is None:
                return
            pending.popleft()
            w.result = got
            self._forget(w)
            w.signal.set()

    def supports_connect_protocol(self) -> bool:
        """Some connected backend announced SETTINGS_ENABLE_CONNECT_PROTOCOL = 1, or no
        connection is up yet to say otherwise."""
        conns = [c for b in self.backends for c in b.conns]
        return not conns or any(c.core.enable_connect_protocol for c in conns)

    def pick_backend(self) -> Address:
        """A usable backend address, for a dedicated (non-pooled) connection."""
        now = self.wheel.now
        usable = [b for b in self.backends if b.usable(now) and b.conns] or self.backends
        b = usable[self.counters["dedicated"] % len(usable)]
        self.counters["dedicated"] += 1
        return b.address

    def _maybe_grow(self) -> None:
        cap = self.cfg.connection_cap
        if cap <= self.cfg.connections or self._tg is None:
            return
        for b in self.backends:
            if should_grow(len(b.conns), b.connecting, cap, all_full=True) and b.conns:
                log.warning(
                    "cluster %s: all %d connections to %s are full; opening one more (cap %d)",
                    self.cfg.name,
                    len(b.conns),
                    b.address,
                    cap,
                )
                self.counters["grown"] += 1
                b.connecting += 1
                self._tg.start_soon(self._maintain, b, False)
                return

    def _unreachable(self) -> bool:
        """Answer 503 at once rather than queue: no backend is usable, or every one is known
        down (its last connection attempt failed and it has no live connection).  A backend
        that merely lost a connection and is reconnecting still queues requests."""
        now = self.wheel.now
        return all(
            not b.usable(now) or (not b.conns and b.failures > 0 and not b.connecting)
            for b in self.backends
        )

    def _last_error(self) -> str:
        return "; ".join(b.last_error for b in self.backends if b.last_error) or "not connected"

    def _fail_pending_if_unreachable(self) -> None:
        if not self._unreachable():
            return
        reason = "no backend reachable"
        log.info("cluster %s: no backend reachable: %s", self.cfg.name, self._last_error())
        while self._pending:
            w = self._pending.popleft()
            if not w.done:
                w.error = reason
                self._forget(w)
                w.signal.set()

    # --- observation -------------------------------------------------------------------

    def statistics(self) -> PoolStatistics:
        now = self.wheel.now
        backends = []
        for b in self.backends:
            conns = tuple(c.statistics() for c in (*b.conns, *b.draining))
            backends.append(
                BackendStatistics(
                    address=str(b.address),
                    healthy=b.usable(now),
                    ejected=now < b.ejected_until,
                    connecting=b.connecting,
                    reconnects=b.reconnects,
                    consecutive_failures=b.failures,
                    connections=conns,
                    resets_received=b.retired_counters["resets_received"]
                    + sum(c.resets_received for c in conns),
                    refused_received=b.retired_counters["refused_received"]
                    + sum(c.refused_received for c in conns),
                    ping_timeouts=b.retired_counters["ping_timeouts"]
                    + sum(c.ping_timeouts for c in conns),
                )
            )
        return PoolStatistics(
            cluster=self.cfg.name,
            connections=sum(len(b.conns) for b in self.backends),
            draining=sum(len(b.draining) for b in self.backends),
            connecting=sum(b.connecting for b in self.backends),
            streams_open=sum(len(c.core.streams) for b in self.backends for c in b.conns),
            pending=self._pending_live,
            counters=dict(self.counters),
            backends=tuple(backends),
        )
