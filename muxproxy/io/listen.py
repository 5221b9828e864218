"""Binding a listener: its socket (a bind failure is one line naming the key), TLS on it,
and what a reload keeps a listener by (:func:`listener_key`).  Used by ``server.Proxy`` at
start and on reload."""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
from anyio.streams.tls import TLSListener

from ..config import Address, Config, ConfigError, ListenerConfig
from .backend import NETWORK_ERRORS
from .tls import ServerCertificates

__all__ = [
    "Listening",
    "QuietTLSListener",
    "bind_error",
    "bind_listener",
    "listen",
    "listener_certificates",
    "listener_key",
    "too_many",
]

log = logging.getLogger("muxproxy")


@dataclass(eq=False)
class Listening:
    """One bound listener: its current config (a reload may change name, limits, TLS),
    the socket, the task accepting on it, and its open client connections."""

    lc: ListenerConfig
    listener: anyio.abc.Listener[anyio.abc.ByteStream]
    address: Address
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    open_here: set[Any] = field(default_factory=set)  # its ClientConnection | H2ClientConnection


def listener_key(lc: ListenerConfig) -> tuple[str, bool, bool]:
    """Listeners are kept across a reload by address, TLS or not and PROXY protocol or not
    (these decide the listener's type): same key, same socket."""
    return (str(lc.listen), lc.tls is not None, lc.proxy_protocol)


def listener_certificates(cfg: Config) -> dict[str, ServerCertificates]:
    """Every TLS listener's certificates by listener name, their files read now (start and
    reload load them before anything binds or changes).

    Raises:
        ConfigError: a file is missing or unusable; the message names the listener's key.
    """
    return {
        lc.name: ServerCertificates(lc, f"listeners[{i}]")
        for i, lc in enumerate(cfg.listeners)
        if lc.tls is not None
    }


async def bind_listener(
    lc: ListenerConfig,
    index: int,
    reuse_port: bool,
    certs: ServerCertificates | None,
) -> Listening:
    """Bind ``listeners[index]``; ConfigError (one line naming the key) if it cannot."""
    tcp = await listen(lc.listen, f"listeners[{index}].listen", reuse_port=reuse_port)
    sock = tcp.extra(anyio.abc.SocketAttribute.raw_socket)
    host, port = sock.getsockname()[:2]
    listener: anyio.abc.Listener[anyio.abc.ByteStream] = tcp
    if certs is not None and not lc.proxy_protocol:  # (else: TLS after the PROXY header)
        listener = QuietTLSListener(
            tcp,
            certs.context,
            standard_compatible=False,
            handshake_timeout=lc.limits.header_timeout,
        )
    return Listening(lc, listener, Address(host, port))


_TOO_MANY = (
    b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 36\r\nconnection: close\r\n\r\ntoo many connections from one client\n"
)


async def too_many(stream: anyio.abc.ByteStream) -> None:
    """max_connections_per_client: a short 429, then close (never read what it sent)."""
    with anyio.move_on_after(1.0):
        try:
            await stream.send(_TOO_MANY)
        except NETWORK_ERRORS:
            pass
    await anyio.aclose_forcefully(stream)


async def listen(
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


class QuietTLSListener(TLSListener):
    """A failed client handshake is the client's problem: one debug line, no traceback."""

    @staticmethod
    async def handle_handshake_error(exc: BaseException, stream: anyio.abc.AnyByteStream) -> None:
        log.debug("TLS handshake failed: %r", exc)
        with anyio.CancelScope(shield=True):
            await anyio.aclose_forcefully(stream)
        if not isinstance(exc, Exception):
            raise exc
