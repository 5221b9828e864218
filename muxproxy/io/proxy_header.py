"""Reading a connection's PROXY protocol header (see core/proxy_protocol.py for the format).

Runs in the connection's own task, before the HTTP session starts, so a slow or silent peer
only holds its own connection, for at most ``limits.proxy_protocol_timeout``; the deadline
covers the header only and is gone once it is parsed.  On a TLS listener the header comes
first, in clear, and the TLS handshake starts after it (:func:`start_tls`): the bytes read
past the header are the start of the ClientHello.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import anyio
import anyio.abc
from anyio.streams.tls import TLSStream

from ..config import ListenerConfig
from ..core.proxy_protocol import ProxyHeaderError, parse
from .backend import NETWORK_ERRORS


class Proxy(Protocol):
    """What the PROXY header check needs of ``server.Proxy`` (no import: no circle)."""

    def is_trusted(self, listener: ListenerConfig, ip: str) -> bool: ...


log = logging.getLogger("muxproxy.proxy_protocol")


async def read_proxy_header(
    proxy: Proxy, lc: ListenerConfig, stream: anyio.abc.ByteStream, peer: tuple[str, int]
) -> tuple[tuple[str, int], bytes] | None:
    """The client address the header names (the direct peer's for LOCAL/UNKNOWN) and the
    bytes read past the header; None if the connection must be closed (untrusted peer,
    malformed header, timeout, the peer went away)."""
    if not proxy.is_trusted(lc, peer[0]):
        log.debug("%s: PROXY header from untrusted peer %s refused", lc.name, peer[0])
        return None
    buf = bytearray()
    with anyio.move_on_after(lc.limits.proxy_protocol_timeout):
        try:
            while True:
                got = parse(buf)
                if got is not None:
                    header, used = got
                    if header.local or header.family == "unix":
                        return peer, bytes(buf[used:])
                    return (header.src_addr, header.src_port), bytes(buf[used:])
                buf += await stream.receive(65536)
        except ProxyHeaderError as exc:
            log.debug("%s: bad PROXY header from %s: %s", lc.name, peer[0], exc)
            return None
        except (anyio.EndOfStream, *NETWORK_ERRORS):
            return None
    log.debug("%s: no PROXY header from %s in time", lc.name, peer[0])
    return None


class _Prefixed(anyio.abc.ByteStream):
    """A stream that first returns bytes already read from it (the TLS handshake's start)."""

    def __init__(self, inner: anyio.abc.ByteStream, prefix: bytes) -> None:
        self._inner = inner
        self._prefix = prefix

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            return data
        return await self._inner.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self._inner.send(item)

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def aclose(self) -> None:
        await self._inner.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._inner.extra_attributes


async def start_tls(
    stream: anyio.abc.ByteStream, early: bytes, context: ssl.SSLContext, timeout: float
) -> anyio.abc.ByteStream | None:
    """The TLS handshake after a PROXY header; None if it failed or took too long."""
    transport = _Prefixed(stream, early) if early else stream
    with anyio.move_on_after(timeout):
        try:
            return await TLSStream.wrap(
                transport, server_side=True, ssl_context=context, standard_compatible=False
            )
        except (ssl.SSLError, anyio.EndOfStream, *NETWORK_ERRORS) as exc:
            log.debug("TLS handshake after a PROXY header failed: %r", exc)
    return None
