"""Reading a connection's PROXY protocol header (see core/proxy_protocol.py for the format).

Runs in the connection's own task, before the HTTP session starts, so a slow or silent peer
only holds its own connection, for at most ``limits.proxy_protocol_timeout``; the deadline
covers the header only and is gone once it is parsed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from ..config import ListenerConfig
from ..core.proxy_protocol import ProxyHeaderError, parse
from .backend import NETWORK_ERRORS

if TYPE_CHECKING:
    from .server import Proxy

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
