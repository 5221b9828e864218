"""The registry of backend protocols: what ``protocol = "..."`` in a cluster means.

Each entry names the sans-IO core factory (a :class:`~muxproxy.core.relay.BackendCore`), the
connector that opens its transport (:mod:`muxproxy.io.transport`), the ALPN it needs under TLS,
and whether the cluster gets a TLS client context.  The pool looks a cluster's protocol up once;
the connection driver (:mod:`muxproxy.io.backend`) is the same for every entry.  Adding a
protocol is a core, an entry here, and the name in ``ClusterConfig.protocol``.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass

from ..config import Address, ClusterConfig
from ..core.backend_h1 import H1Backend
from ..core.backend_h2 import H2Backend
from ..core.relay import BackendCore
from .quic import connect_datagram, h3_core
from .transport import Connector, client_tls_context, connect_paced, connect_stream


@dataclass(frozen=True, slots=True)
class BackendProtocol:
    name: str
    make_core: Callable[[Address, ClusterConfig], BackendCore]
    connect: Connector
    alpn: str | None  # required of the peer when TLS is used over TCP
    tls: bool  # a TLS client context over TCP (QUIC brings its own)
    opening: str = "connect"  # what timed out, for the 503's log line
    # True: many streams share a connection, so PING liveness and write progress are watched.
    # False (HTTP/1.1): one request per connection at a time, no PING (the exchange's timeouts
    # govern), and a WebSocket takes a dedicated Upgrade connection (the tunnel's HTTP/1.1 path).
    multiplexed: bool = True

    def tls_context(self, cfg: ClusterConfig) -> ssl.SSLContext | None:
        return client_tls_context(cfg, self.alpn) if self.tls else None


def _h2_core(address: Address, cfg: ClusterConfig) -> BackendCore:
    return H2Backend(stream_window=cfg.stream_window, max_streams=cfg.max_streams_per_connection)


def _h1_core(address: Address, cfg: ClusterConfig) -> BackendCore:
    return H1Backend(stream_window=cfg.stream_window)


PROTOCOLS: dict[str, BackendProtocol] = {
    "h2c": BackendProtocol("h2c", _h2_core, connect_stream, None, tls=False),
    "h2": BackendProtocol("h2", _h2_core, connect_stream, "h2", tls=True),
    "h3": BackendProtocol(
        "h3", h3_core, connect_datagram, "h3", tls=False, opening="QUIC handshake"
    ),
    "http1": BackendProtocol("http1", _h1_core, connect_paced, None, tls=False, multiplexed=False),
}
