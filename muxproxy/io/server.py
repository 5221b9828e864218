"""Listeners, pools and graceful shutdown: the proxy as one structured-concurrency tree.

    Proxy.serve ── pools (one per cluster) ── maintainers ── connections ── reader/writer
               └── listeners ── one task per client connection ── exchanges

Shutdown (:meth:`Proxy.shutdown`, wired to SIGTERM/SIGINT by the CLI): stop accepting, close
idle keep-alive connections, let in-flight exchanges finish within ``grace_period``, then
cancel whatever is left and close the pools.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

import anyio
import anyio.abc
from anyio.streams.tls import TLSAttribute, TLSListener

from ..config import Address, Config, ConfigError, ListenerConfig
from ..core.metrics import Metrics
from ..core.outcome import Outcome
from ..router import Router
from .admin import ProxyStatistics, serve_admin
from .backend import NETWORK_ERRORS
from .client import ClientConnection
from .client_h2 import H2ClientConnection, sniff_preface
from .fast_stream import asyncio_running, serve_fast
from .pool import ClusterPool
from .proxy_header import read_proxy_header, start_tls
from .timers import TimerWheel
from .tls import ServerCertificates

log = logging.getLogger("muxproxy")


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
        # Certificates load here, so a bad file stops ``run`` before anything binds.
        self.certificates = {
            lc.name: ServerCertificates(lc, f"listeners[{i}]")
            for i, lc in enumerate(config.listeners)
            if lc.tls is not None
        }
        # Called with each request's or tunnel's Outcome once it is over (access log,
        # metrics).  Empty by default: then nothing is called.
        self.recorders: list[Callable[[Outcome], None]] = []
        self.metrics = Metrics()  # request counters and histograms for /metrics
        self.recorders.append(self.metrics.observe)

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

    def is_trusted(self, listener: ListenerConfig, ip: str) -> bool:
        nets = self._trusted.get(listener.name)
        if not nets:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in n for n in nets)

    def statistics(self) -> ProxyStatistics:
        return ProxyStatistics(
            draining=self.draining,
            client_connections=len(self.clients),
            refused_connections=self.refused_connections,
            pools={name: pool.statistics() for name, pool in self.pools.items()},
            proxy_header_errors=self.proxy_header_errors,
            metrics=self.metrics,
        )

    def shutdown(self) -> None:
        """Begin a graceful shutdown (idempotent, never blocks)."""
        if not self.draining:
            log.info("shutting down: draining %d client connections", len(self.clients))
            self.draining = True
            for c in self.clients:
                if isinstance(c, H2ClientConnection):
                    c.drain()  # GOAWAY: the streams in flight finish
                elif c.idle and c.scope is not None:
                    c.scope.cancel()
            self._stop.set()

    async def serve(
        self,
        *,
        task_status: anyio.abc.TaskStatus[dict[str, Address]] = anyio.TASK_STATUS_IGNORED,
        reuse_port: bool = False,
    ) -> None:
        # Bind first: a port in use stops the start before any backend is dialled.
        bound: dict[str, Address] = {}
        listeners: list[anyio.abc.Listener[anyio.abc.ByteStream]] = []
        admin: anyio.abc.Listener[anyio.abc.SocketStream] | None = None
        try:
            for lc in self.config.listeners:
                listener, bound[lc.name] = await self._bind(lc, reuse_port)
                listeners.append(listener)
            if self.config.admin is not None:
                admin = await _listen(self.config.admin.listen, "admin.listen", reuse_port=False)
                sock = admin.extra(anyio.abc.SocketAttribute.raw_socket)
                bound["admin"] = Address(*sock.getsockname()[:2])
        except BaseException:
            with anyio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()
            raise
        async with anyio.create_task_group() as pools_tg:
            self.wheel.tick(anyio.current_time())
            pools_tg.start_soon(self.wheel.run)
            for pool in self.pools.values():
                await pools_tg.start(pool.run)
            async with anyio.create_task_group() as clients_tg:
                async with anyio.create_task_group() as accept_tg:
                    for lc, listener in zip(self.config.listeners, listeners, strict=True):
                        accept_tg.start_soon(self._accept_loop, listener, lc, clients_tg)
                    if admin is not None:
                        # In the clients' group: /healthz answers 503 while draining.
                        serve = partial(serve_admin, self.statistics)
                        clients_tg.start_soon(admin.serve, serve, clients_tg)
                    task_status.started(bound)
                    await self._stop.wait()
                    accept_tg.cancel_scope.cancel()
                for listener in listeners:
                    await listener.aclose()
                with anyio.move_on_after(self.config.proxy.grace_period):
                    if self.clients:
                        await self._no_clients.wait()
                for client in list(self.clients):  # tunnels with no task of their own
                    if client.detached is not None:
                        client.detached.finish()
                clients_tg.cancel_scope.cancel()
            pools_tg.cancel_scope.cancel()

    async def _bind(
        self, lc: ListenerConfig, reuse_port: bool
    ) -> tuple[anyio.abc.Listener[anyio.abc.ByteStream], Address]:
        index = self.config.listeners.index(lc)
        tcp = await _listen(lc.listen, f"listeners[{index}].listen", reuse_port=reuse_port)
        sock = tcp.extra(anyio.abc.SocketAttribute.raw_socket)
        host, port = sock.getsockname()[:2]
        listener: anyio.abc.Listener[anyio.abc.ByteStream] = tcp
        certs = self.certificates.get(lc.name)
        if certs is not None and not lc.proxy_protocol:  # (else: TLS after the PROXY header)
            listener = _QuietTLSListener(
                tcp,
                certs.context,
                standard_compatible=False,
                handshake_timeout=lc.limits.header_timeout,
            )
        return listener, Address(host, port)

    async def _accept_loop(
        self,
        listener: anyio.abc.Listener[anyio.abc.ByteStream],
        lc: ListenerConfig,
        tg: anyio.abc.TaskGroup,
    ) -> None:
        handler = self._handler(lc)
        if lc.tls is None and asyncio_running():
            sock = listener.extra(anyio.abc.SocketAttribute.raw_socket)
            await serve_fast(sock, handler, tg)
        else:
            await listener.serve(handler, task_group=tg)

    def _handler(
        self, lc: ListenerConfig
    ) -> Callable[[anyio.abc.ByteStream], Coroutine[Any, Any, None]]:
        cap = lc.limits.max_connections
        open_here: set[Any] = set()  # this listener's share of self.clients

        async def handle(stream: anyio.abc.ByteStream) -> None:
            if len(open_here) >= cap or self.draining:
                self.refused_connections += 1
                await stream.aclose()
                return
            try:
                peer = stream.extra(anyio.abc.SocketAttribute.remote_address)
                sock = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
                if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (*NETWORK_ERRORS, anyio.TypedAttributeLookupError):  # gone already (trio)
                await stream.aclose()
                return
            early = b""
            if lc.proxy_protocol:  # in this connection's task, never in the accept loop
                got = await read_proxy_header(self, lc, stream, peer)  # type: ignore[arg-type]
                if got is None:
                    self.proxy_header_errors += 1
                    await anyio.aclose_forcefully(stream)
                    return
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
                    await _too_many(stream)
                    return
                self._per_client[key] = self._per_client.get(key, 0) + 1
            client = await self._client(stream, lc, peer, early)
            if client is None:
                await stream.aclose()
                return
            self.clients.add(client)
            open_here.add(client)
            client.open_here = open_here
            try:
                await client.run()
            except Exception as exc:  # a bug must cost one connection, never the proxy
                log.error("client %s: internal error: %r", peer, exc, exc_info=log.isEnabledFor(10))
                self.internal_errors += 1
                if client.detached is not None:
                    client.detached.finish()
            finally:
                if client.detached is None:  # else the tunnel forgets it when it ends
                    self.forget(client)

        return handle

    async def _client(
        self, stream: anyio.abc.ByteStream, lc: ListenerConfig, peer: Any, first: bytes
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
            return H2ClientConnection(stream, lc, self, peer, first, websockets=ws)
        if "http1" not in protocols:
            return None
        client = ClientConnection(stream, lc, self, peer)
        if first:
            client.session.receive_data(first)
        return client

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


_TOO_MANY = (
    b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 36\r\nconnection: close\r\n\r\ntoo many connections from one client\n"
)


async def _too_many(stream: anyio.abc.ByteStream) -> None:
    """max_connections_per_client: a short 429, then close (never read what it sent)."""
    with anyio.move_on_after(1.0):
        try:
            await stream.send(_TOO_MANY)
        except NETWORK_ERRORS:
            pass
    await anyio.aclose_forcefully(stream)


async def _listen(
    addr: Address, where: str, *, reuse_port: bool
) -> anyio.abc.Listener[anyio.abc.SocketStream]:
    """Bind one listen address; a failure is a ConfigError naming the key (one line)."""
    try:
        return await anyio.create_tcp_listener(
            local_host=addr.host, local_port=addr.port, reuse_port=reuse_port, backlog=4096
        )
    except OSError as exc:
        raise ConfigError(bind_error(where, addr, exc)) from None


def bind_error(where: str, addr: Address, exc: OSError) -> str:
    """The one line for a listen address that cannot be bound."""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        reason += " (another process, or another listener here, has this port)"
    return f"{where}: cannot listen on {addr}: {reason}"


class _QuietTLSListener(TLSListener):
    """A failed client handshake is the client's problem: one debug line, no traceback."""

    @staticmethod
    async def handle_handshake_error(exc: BaseException, stream: anyio.abc.AnyByteStream) -> None:
        log.debug("TLS handshake failed: %r", exc)
        with anyio.CancelScope(shield=True):
            await anyio.aclose_forcefully(stream)
        if not isinstance(exc, Exception):
            raise exc
