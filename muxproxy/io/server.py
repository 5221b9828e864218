"""Listeners, pools and graceful shutdown: the proxy as one structured-concurrency tree.

    Proxy.serve ── pools (one per cluster) ── maintainers ── connections ── reader/writer
               └── listeners ── one task per client connection ── exchanges

Shutdown (:meth:`Proxy.shutdown`, wired to SIGTERM/SIGINT by the CLI): stop accepting, close
idle keep-alive connections, let in-flight exchanges finish within ``grace_period``, then
cancel whatever is left and close the pools.

Reload (:meth:`Proxy.reload`, wired to SIGHUP): the config in force is the tuple
(``config``, ``router``, ``pools``), replaced in one synchronous step; a request reads it once
when its head arrives and keeps its route and pool to the end (docs/ARCHITECTURE.md, "Reload
and logging").  Everything that can fail is done before that step.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
from anyio.streams.tls import TLSAttribute, TLSListener

from ..config import Address, Config, ConfigError, ListenerConfig, load
from ..core.metrics import Metrics
from ..core.outcome import Outcome
from ..router import Router
from .accesslog import UNLIMITED, AccessLog
from .admin import ProxyStatistics, serve_admin
from .backend import NETWORK_ERRORS
from .client import ClientConnection
from .client_h2 import H2ClientConnection, sniff_preface
from .fast_stream import TRIO_STREAMS, accepted_peer, asyncio_running, serve_fast
from .listen import (
    Listening,
    bind_error,
    bind_listener,
    listen,
    listener_certificates,
    listener_key,
    too_many,
)
from .pool import ClusterPool
from .proxy_header import read_proxy_header, start_tls
from .timers import TimerWheel

__all__ = ["Proxy", "Recorder", "ReloadError", "bind_error"]

log = logging.getLogger("muxproxy")

Recorder = Callable[[Outcome], None]


class ReloadError(Exception):
    """The new config cannot be applied; the old one stays.  The message is one line."""


class Proxy:
    """The whole proxy for one :class:`~muxproxy.config.Config`.

    ``await proxy.serve(task_status=...)`` binds every listener, reports the bound addresses
    through ``task_status.started({name: Address})`` and serves until :meth:`shutdown`.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.router = Router(config.routes)
        self.wheel = TimerWheel()
        self.pools = {c.name: ClusterPool(c, self.wheel) for c in config.clusters}
        self.draining = False
        # A worker retired by its supervisor (SIGUSR2): idle keep-alive connections are not
        # closed at once but after one more response (connection: close), within grace_period.
        self.retiring = False
        self.clients: set[ClientConnection | H2ClientConnection] = set()
        self._stop = anyio.Event()
        self._no_clients = anyio.Event()
        self._trusted = {
            lst.name: tuple(n.net for n in lst.trusted_proxies) for lst in config.listeners
        }
        self.refused_connections = 0
        # Open connections per (listener, client address), for max_connections_per_client.
        self._per_client: dict[tuple[str, str], int] = {}
        self.internal_errors = 0
        self.proxy_header_errors = 0  # PROXY protocol: untrusted peer, malformed, timed out
        # Certificates load here, so a bad file stops ``run`` before anything binds.  A reload
        # replaces the dict (listener name -> certificates) with the new config's.
        self.certificates = listener_certificates(config)
        # Reload (SIGHUP): generation 1 is the config the proxy started with.
        self.generation = 1
        self.reloads = 0
        self.reloads_failed = 0
        self.reload_lock = anyio.Lock()
        self._listening: dict[tuple[str, bool, bool], Listening] = {}
        self._pool_scopes: dict[ClusterPool, anyio.CancelScope] = {}
        self._pools_tg: anyio.abc.TaskGroup | None = None
        self._clients_tg: anyio.abc.TaskGroup | None = None
        self._accept_tg: anyio.abc.TaskGroup | None = None
        # The admin listener's task (a reload that moves [admin] cancels it) and address.
        self._admin_scope: anyio.CancelScope | None = None
        self._admin_closed = anyio.Event()  # set when that task has closed its socket
        self.admin_address: Address | None = None
        self._reuse_port = False
        # Called with each request's or tunnel's Outcome once it is over (access log,
        # metrics).
        self.recorders: list[Recorder] = []
        self.metrics = Metrics()  # request counters and histograms for /metrics
        self._observe = self.metrics.observe
        self.recorders.append(self._observe)
        self.access_log: AccessLog | None = None
        self._access_log_managed = False

    @property
    def describe(self) -> bool:
        """Whether a recorder reads an outcome's text fields (method, authority, path,
        protocol) and wall clock: the built-in metrics read neither, so with only them a
        request costs no decoding and a tunnel keeps no text."""
        recorders = self.recorders
        return len(recorders) > 1 or (len(recorders) == 1 and recorders[0] is not self._observe)

    def record(self, outcome: Outcome) -> None:
        """Hand one finished request's or tunnel's outcome to every recorder."""
        for recorder in self.recorders:
            try:
                recorder(outcome)
            except Exception:  # a broken recorder must not cost the request
                log.exception("outcome recorder %r failed", recorder)

    def reload_certificates(self) -> None:
        """Re-read every listener's certificate files; ConfigError (nothing changed for the
        listener at fault) if one does not load."""
        for certs in self.certificates.values():
            certs.reload()

    def attach_access_log(self, access_log: AccessLog | None) -> None:
        """Subscribe the access-log writer (None: ``access_log = "off"``)."""
        self.access_log = access_log
        self._access_log_managed = True  # from now on reloads follow [proxy].access_log
        if access_log is not None:
            self.recorders.append(access_log)

    def reload_statistics(self) -> dict[str, int]:
        """Reload and access-log figures, for /pools and /metrics."""
        out = {
            "config_generation": self.generation,
            "reloads": self.reloads,
            "reloads_failed": self.reloads_failed,
        }
        if self.access_log is not None:
            out.update(self.access_log.statistics())
        return out

    def is_trusted(self, listener: ListenerConfig, ip: str) -> bool:
        nets = self._trusted.get(listener.name)
        if not nets:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in n for n in nets)

    def internal_error(self, what: str, exc: BaseException) -> None:
        """A bug of ours ended ``what`` (a connection, a stream): logged and counted
        (``muxproxy_internal_errors_total``); the caller has contained it."""
        if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]  # (except* wraps even a lone error: name the error)
        log.error("%s: internal error: %r", what, exc, exc_info=log.isEnabledFor(10))
        self.internal_errors += 1

    def statistics(self) -> ProxyStatistics:
        return ProxyStatistics(
            draining=self.draining,
            client_connections=len(self.clients),
            refused_connections=self.refused_connections,
            pools={name: pool.statistics() for name, pool in self.pools.items()},
            proxy_header_errors=self.proxy_header_errors,
            internal_errors=self.internal_errors,
            metrics=self.metrics,
            reload=self.reload_statistics(),
        )

    def shutdown(self, retire: bool = False) -> None:
        """Begin a graceful shutdown (idempotent, never blocks).  ``retire``: a worker being
        replaced, whose keep-alive clients must not meet a close racing their next request:
        each is answered once more, with ``connection: close``, until ``grace_period``."""
        if not self.draining:
            log.info("shutting down: draining %d client connections", len(self.clients))
            self.draining = True
            self.retiring = retire
            for c in self.clients:
                if isinstance(c, H2ClientConnection):
                    c.drain()  # GOAWAY: the streams in flight finish
                elif c.idle and c.scope is not None and not retire:
                    c.scope.cancel()
            self._stop.set()

    async def serve(
        self,
        *,
        task_status: anyio.abc.TaskStatus[dict[str, Address]] = anyio.TASK_STATUS_IGNORED,
        reuse_port: bool = False,
    ) -> None:
        self._reuse_port = reuse_port
        # Bind first: a port in use stops the start before any backend is dialled.
        bound: dict[str, Address] = {}
        entries: list[Listening] = []
        admin: anyio.abc.Listener[anyio.abc.SocketStream] | None = None
        try:
            for i, lc in enumerate(self.config.listeners):
                entry = await bind_listener(lc, i, reuse_port, self.certificates.get(lc.name))
                entries.append(entry)
                bound[lc.name] = entry.address
            if self.config.admin is not None:
                admin = await listen(self.config.admin.listen, "admin.listen", reuse_port=False)
                bound["admin"] = _bound_address(admin)
        except BaseException:
            with anyio.CancelScope(shield=True):
                for entry in entries:
                    await entry.listener.aclose()
            raise
        async with anyio.create_task_group() as pools_tg:
            self._pools_tg = pools_tg
            self.wheel.tick(anyio.current_time())
            pools_tg.start_soon(self.wheel.run)
            for pool in self.pools.values():
                await pools_tg.start(self._run_pool, pool)
            async with anyio.create_task_group() as clients_tg:
                self._clients_tg = clients_tg
                async with anyio.create_task_group() as accept_tg:
                    self._accept_tg = accept_tg
                    for entry in entries:
                        self._listening[listener_key(entry.lc)] = entry
                        accept_tg.start_soon(self._accept_loop, entry)
                    if admin is not None:
                        self._start_admin(admin)
                    task_status.started(bound)
                    await self._stop.wait()
                    deadline = anyio.current_time() + self.config.proxy.grace_period
                    accept_tg.cancel_scope.cancel()
                for entry in self._listening.values():
                    await entry.listener.aclose()
                with anyio.move_on_after(self.config.proxy.grace_period):
                    if self.clients:
                        await self._no_clients.wait()
                for client in list(self.clients):  # tunnels with no task of their own
                    if client.detached is not None:
                        client.detached.finish()
                # A connection accepted just before the listeners closed may have no client
                # yet (its task not started): it ends on its own (a retiring worker answers
                # it once), bounded by grace_period like the rest; the admin port closes now.
                if self._admin_scope is not None:
                    self._admin_scope.cancel()
                clients_tg.cancel_scope.deadline = deadline
            pools_tg.cancel_scope.cancel()

    def _start_admin(self, admin: anyio.abc.Listener[anyio.abc.SocketStream]) -> None:
        """Serve the admin endpoints on ``admin`` until a reload moves them (in the clients'
        group: /healthz answers 503 while draining)."""
        assert self._clients_tg is not None
        scope = self._admin_scope = anyio.CancelScope()
        closed = self._admin_closed = anyio.Event()
        self.admin_address = _bound_address(admin)
        self._clients_tg.start_soon(self._serve_admin, admin, scope, closed, self._clients_tg)

    async def _serve_admin(
        self,
        admin: anyio.abc.Listener[anyio.abc.SocketStream],
        scope: anyio.CancelScope,
        closed: anyio.Event,
        tg: anyio.abc.TaskGroup,
    ) -> None:
        try:
            with scope:
                await admin.serve(partial(serve_admin, self.statistics), tg)
        finally:
            with anyio.CancelScope(shield=True):
                await admin.aclose()
            closed.set()

    async def _run_pool(
        self, pool: ClusterPool, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        """Run one pool in a scope of its own, so a reload can retire it alone."""
        with anyio.CancelScope() as scope:
            self._pool_scopes[pool] = scope
            await pool.run(task_status=task_status)
        self._pool_scopes.pop(pool, None)

    async def _retire_pool(self, pool: ClusterPool, grace: float) -> None:
        """A reload dropped or changed the cluster: in-flight streams and tunnels finish
        (within ``grace_period``), then the pool's connections close."""
        await pool.drain(grace)  # (ends pool.run: its connections are closed)
        scope = self._pool_scopes.get(pool)
        if scope is not None:
            scope.cancel()
        log.info("cluster %s: old pool closed after a reload", pool.cfg.name)

    async def _accept_loop(self, entry: Listening) -> None:
        assert self._clients_tg is not None
        handler = self._handler(entry)
        listener = entry.listener
        with entry.scope:
            if entry.lc.tls is None and asyncio_running():  # (the key keeps TLS or not)
                sock = listener.extra(anyio.abc.SocketAttribute.raw_socket)
                await serve_fast(sock, handler, self._clients_tg)
            elif entry.lc.tls is None and TRIO_STREAMS:  # trio, on Linux
                from .trio_stream import serve_trio  # (trio is imported only when it runs)

                sock = listener.extra(anyio.abc.SocketAttribute.raw_socket)
                await serve_trio(sock, handler, self._clients_tg)
            else:
                await listener.serve(handler, task_group=self._clients_tg)
        # Only a reload cancels entry.scope alone (a shutdown cancels the group around it).
        await listener.aclose()

    def _handler(
        self, entry: Listening
    ) -> Callable[[anyio.abc.ByteStream], Coroutine[Any, Any, None]]:
        open_here = entry.open_here  # this listener's share of self.clients

        async def handle(stream: anyio.abc.ByteStream) -> None:
            lc = entry.lc  # read per connection: a reload may have changed the limits
            # (A retiring worker still serves what it had accepted: one answer, then close.)
            if len(open_here) >= lc.limits.max_connections or (
                self.draining and not self.retiring
            ):
                self.refused_connections += 1
                await stream.aclose()
                return
            try:
                peer = accepted_peer(stream)
            except (*NETWORK_ERRORS, anyio.TypedAttributeLookupError):  # gone already (trio)
                await stream.aclose()
                return
            early = b""
            direct = ""
            if lc.proxy_protocol:  # in this connection's task, never in the accept loop
                got = await read_proxy_header(self, lc, stream, peer)
                if got is None:
                    self.proxy_header_errors += 1
                    await anyio.aclose_forcefully(stream)
                    return
                if got[0][0] != peer[0]:
                    direct = peer[0]  # the balancer: the Outcome's peer_addr
                peer, early = got
                certs = self.certificates.get(lc.name)
                if certs is not None:
                    tls = await start_tls(stream, early, certs.context, lc.limits.header_timeout)
                    if tls is None:
                        await anyio.aclose_forcefully(stream)
                        return
                    stream, early = tls, b""
            per_client = lc.limits.max_connections_per_client
            if per_client is not None:
                key = (lc.name, peer[0])
                if self._per_client.get(key, 0) >= per_client:
                    self.refused_connections += 1
                    await too_many(stream)
                    return
                self._per_client[key] = self._per_client.get(key, 0) + 1
            client = await self._client(stream, lc, peer, early, direct)
            if client is None:
                await stream.aclose()
                return
            self.clients.add(client)
            open_here.add(client)
            client.open_here = open_here
            try:
                await client.run()
            except* Exception as bugs:  # a bug must cost one connection, never the proxy
                # (except*: on trio a bug met while the connection is being cancelled comes
                # as a group with trio's Cancelled, which must go on up; the bug stops here.)
                self.internal_error(f"client {peer}", bugs)
                if client.detached is not None:
                    client.detached.finish()
            finally:
                if client.detached is None:  # else the tunnel forgets it when it ends
                    self.forget(client)

        return handle

    async def _client(
        self,
        stream: anyio.abc.ByteStream,
        lc: ListenerConfig,
        peer: Any,
        first: bytes,
        direct: str = "",
    ) -> ClientConnection | H2ClientConnection | None:
        """The connection for the protocol the client speaks: ALPN on TLS, the connection
        preface on a plain listener offering h2c (prior knowledge).  None: none we speak."""
        protocols = lc.client_protocols
        if lc.tls is not None:
            alpn = stream.extra(TLSAttribute.alpn_protocol, None)
            h2 = alpn == "h2" or (alpn is None and "http1" not in protocols)
        elif "h2" not in protocols:
            h2 = False
        elif "http1" not in protocols:
            h2 = True
        else:
            h2, first = await sniff_preface(stream, lc.limits.header_timeout, first)
            if not first:
                return None
        if h2:
            ws = any(r.websocket for r in self.config.routes)
            return H2ClientConnection(stream, lc, self, peer, first, websockets=ws, direct=direct)
        if "http1" not in protocols:
            return None
        client = ClientConnection(stream, lc, self, peer, direct)
        if first:
            client.session.receive_data(first)
        return client

    # --- reload --------------------------------------------------------------------------

    async def reload(self, cfg: Config) -> None:
        """Apply a validated config in place; on any error raise :class:`ReloadError` and
        keep the old one.  Unchanged clusters keep their pool (and its streams and tunnels);
        a changed or removed cluster's pool drains; new listeners bind, removed ones stop
        accepting; certificates are read again.  Serialised by ``reload_lock``."""
        async with self.reload_lock:
            try:
                await self._reload(cfg)
            except ReloadError:
                self.reloads_failed += 1
                raise

    async def reload_file(
        self, path: str | Path, adjust: Callable[[Config], Config] | None = None
    ) -> bool:
        """SIGHUP: read, validate and apply the config file (passed through ``adjust`` first:
        a worker moves its admin port as at start).  On error the old config stays, ONE line
        says why and ``reloads_failed`` counts it."""
        try:
            cfg = await anyio.to_thread.run_sync(load, path)
            if adjust is not None:
                cfg = adjust(cfg)
        except ConfigError as exc:
            self.reloads_failed += 1
            return self._reload_failed(path, exc)
        try:
            await self.reload(cfg)  # (counts its own failures)
        except ReloadError as exc:
            return self._reload_failed(path, exc)
        return True

    def _reload_failed(self, path: str | Path, exc: Exception) -> bool:
        """The one line a failed reload logs (never rate-limited)."""
        log.error(
            "reload failed, keeping generation %d: %s: %s",
            self.generation,
            path,
            exc,
            extra=UNLIMITED,
        )
        return False

    async def _reload(self, cfg: Config) -> None:
        if self._pools_tg is None or self._accept_tg is None or self.draining:
            raise ReloadError("the proxy is not serving")
        # 1. Everything that can fail, before anything changes.
        try:
            certificates = listener_certificates(cfg)
        except ConfigError as exc:
            raise ReloadError(str(exc)) from None
        by_cfg = {p.cfg: p for p in self.pools.values()}
        pools: dict[str, ClusterPool] = {}
        fresh: list[ClusterPool] = []
        for i, c in enumerate(cfg.clusters):
            kept = by_cfg.get(c)
            if kept is not None:
                pools[c.name] = kept
                continue
            try:
                pool = ClusterPool(c, self.wheel)
            except (OSError, ValueError) as exc:  # (ssl.SSLError is an OSError)
                raise ReloadError(f"clusters[{i}].tls: {exc}") from None
            pools[c.name] = pool
            fresh.append(pool)
        added: list[Listening] = []
        try:
            for i, lc in enumerate(cfg.listeners):
                key = listener_key(lc)
                if key not in self._listening:
                    try:
                        added.append(
                            await bind_listener(lc, i, self._reuse_port, certificates.get(lc.name))
                        )
                    except ConfigError as exc:
                        raise ReloadError(str(exc)) from None
            admin = None
            if cfg.admin != self.config.admin and cfg.admin is not None:
                try:
                    admin = await listen(cfg.admin.listen, "admin.listen", reuse_port=False)
                except ConfigError as exc:
                    raise ReloadError(str(exc)) from None
        except BaseException:
            for entry in added:
                await entry.listener.aclose()
            raise
        for pool in fresh:
            await self._pools_tg.start(self._run_pool, pool)
        # 2. The swap: no await from here to the end of the listener bookkeeping.
        old_pools = self.pools
        old_admin: anyio.Event | None = None
        if cfg.admin != self.config.admin:  # [admin] moved, came or went
            if self._admin_scope is not None:
                self._admin_scope.cancel()
                old_admin = self._admin_closed
                self._admin_scope = self.admin_address = None
            if admin is not None:
                self._start_admin(admin)
        self.config = cfg
        self.router = Router(cfg.routes)
        self.pools = pools
        self._trusted = {
            lst.name: tuple(n.net for n in lst.trusted_proxies) for lst in cfg.listeners
        }
        self.generation += 1
        self.reloads += 1
        wanted = {listener_key(lc): lc for lc in cfg.listeners}
        for key, entry in list(self._listening.items()):
            new_lc = wanted.get(key)
            if new_lc is None:
                del self._listening[key]
                self._stop_listening(entry)
                continue
            entry.lc = new_lc
            certs = certificates.get(new_lc.name)
            if certs is not None and isinstance(entry.listener, TLSListener):
                entry.listener.ssl_context = certs.context  # new handshakes: the files read now
        # (PROXY-protocol listeners start TLS themselves, with self.certificates.)
        self.certificates = certificates
        for entry in added:
            self._listening[listener_key(entry.lc)] = entry
            self._accept_tg.start_soon(self._accept_loop, entry)
        in_use = set(pools.values())
        grace = cfg.proxy.grace_period
        for pool in old_pools.values():
            if pool not in in_use:
                self._pools_tg.start_soon(self._retire_pool, pool, grace)
        self._reconfigure_access_log(cfg)
        if old_admin is not None:
            await old_admin.wait()  # (reload returns once the old admin port is closed)
        log.info(
            "reloaded %s: generation %d, %d new pool(s), %d listener(s) added",
            cfg.source,
            self.generation,
            len(fresh),
            len(added),
            extra=UNLIMITED,
        )

    def _reconfigure_access_log(self, cfg: Config) -> None:
        """A reload reopens the access log (logrotate), and may turn it on, off or elsewhere."""
        current = self.access_log
        if not self._access_log_managed:
            return
        if current is None:
            self.attach_access_log(AccessLog.from_config(cfg.proxy))
        elif cfg.proxy.access_log == "off":
            self.recorders.remove(current)
            self.access_log = None
            current.close(timeout=0)  # (the writer finishes what it has on its own)
        else:
            current.reconfigure(cfg.proxy)

    def _stop_listening(self, entry: Listening) -> None:
        """A listener left the config: stop accepting; its idle connections close now, busy
        ones after their current request (tunnels stay until they end)."""
        entry.scope.cancel()  # (the accept loop then closes the socket)
        for c in entry.open_here:
            if isinstance(c, H2ClientConnection):
                c.drain()  # GOAWAY: its streams finish, no new ones
            elif c.idle and c.scope is not None:
                c.scope.cancel()
            else:
                c.must_close = True

    def forget(self, client: ClientConnection | H2ClientConnection) -> None:
        """The client connection is closed: it counts no more."""
        if client.listener.limits.max_connections_per_client is not None:
            key = (client.listener.name, client.fwd.client_ip)
            left = self._per_client.get(key, 1) - 1
            if left > 0:
                self._per_client[key] = left
            else:
                self._per_client.pop(key, None)
        self.clients.discard(client)
        client.open_here.discard(client)
        if self.draining and not self.clients:
            self._no_clients.set()


def _bound_address(listener: anyio.abc.Listener[anyio.abc.SocketStream]) -> Address:
    sock = listener.extra(anyio.abc.SocketAttribute.raw_socket)
    host, port = sock.getsockname()[:2]
    return Address(host, port)
