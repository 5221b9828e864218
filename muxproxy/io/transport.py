"""The wire under one backend connection: a byte stream (TCP, TLS) or datagrams (QUIC).

The connection driver (:mod:`muxproxy.io.backend`) knows nothing of sockets or of a protocol's
framing: it asks its :class:`Transport` to ``receive`` once (feed what arrived to the protocol
core, return what changed) and to ``flush`` (write what the core queued).  A transport is bound
to its core when it is connected, so both calls take no arguments and cost one await each.

* :class:`StreamTransport` carries a core that speaks bytes (:class:`StreamCore`: HTTP/2 and
  HTTP/1.1).  A plain TCP stream is a :class:`~muxproxy.io.fast_stream.FastStream`, as for
  clients (asyncio's or trio's); TLS uses anyio's streams.
* :class:`~muxproxy.io.quic.DatagramTransport` carries a core that speaks datagrams and keeps its
  own timer (HTTP/3 over aioquic).

A connector (``connect_stream`` here, ``connect_datagram`` in :mod:`muxproxy.io.quic`) opens the
socket and returns the transport; it raises the network's exceptions (the driver maps them to
``BackendUnavailable`` once).
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from typing import Protocol, cast

import anyio
import anyio.abc
from anyio.streams.tls import TLSAttribute

from ..config import Address, ClusterConfig
from ..core.relay import BackendCore, Update
from ..errors import BackendUnavailable
from .fast_stream import TRIO_STREAMS, asyncio_running, fast_stream

# What a dead socket looks like, whichever loop runs it.
NETWORK_ERRORS = (
    OSError,
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    ssl.SSLError,
)

READ_SIZE = 65536


class Transport(Protocol):
    """What the connection driver needs of its wire (bound to one protocol core)."""

    def start(self, now: float) -> None:
        """Queue the core's opening (preface, SETTINGS, QUIC Initial); ``flush`` sends it."""

    async def receive(self) -> tuple[Update, bool]:
        """Wait for input once and feed it to the core: (what changed, whether the peer
        spoke).  A dead socket is fed as the peer's close, never raised."""

    async def flush(self) -> bool:
        """Write what the core queued.  Raises one of ``NETWORK_ERRORS``.  True when the write
        itself opened send windows (a core without flow control of its own)."""

    async def aclose(self) -> None: ...


class StreamCore(BackendCore, Protocol):
    """A protocol core fed bytes from a stream (HTTP/2, HTTP/1.1)."""

    def initiate(self) -> None: ...
    def receive_data(self, data: bytes) -> Update: ...
    def data_to_send(self) -> bytes: ...


class StreamTransport:
    """A byte stream carrying a :class:`StreamCore`."""

    __slots__ = ("_core", "_receive", "_send", "stream")

    def __init__(self, stream: anyio.abc.ByteStream, core: StreamCore) -> None:
        self.stream = stream
        self._core = core
        self._receive = stream.receive
        self._send = stream.send

    def start(self, now: float) -> None:
        self._core.initiate()

    async def receive(self) -> tuple[Update, bool]:
        try:
            data = await self._receive(READ_SIZE)
        except NETWORK_ERRORS:
            data = b""
        return self._core.receive_data(data), bool(data)

    async def flush(self) -> bool:
        data = self._core.data_to_send()
        if data:
            await self._send(data)
        return False

    async def aclose(self) -> None:
        await self.stream.aclose()


class PacedCore(StreamCore, Protocol):
    """A stream core without flow control on the wire (HTTP/1.1): it asks the transport to
    stop reading while the client has not taken what arrived, and its send windows are the
    room in its write buffer."""

    @property
    def read_paused(self) -> bool: ...


class PacedStreamTransport(StreamTransport):
    """A byte stream whose reading pauses while its core says so (TCP is the flow control);
    the writer's flushes, which follow every ``consumed``, let it resume.  Its input never
    counts as a liveness proof: the protocol has no PING, so the driver does not watch it."""

    __slots__ = ("_gate", "_paced")

    def __init__(self, stream: anyio.abc.ByteStream, core: PacedCore) -> None:
        super().__init__(stream, core)
        self._paced = core
        self._gate: anyio.Event | None = None

    async def receive(self) -> tuple[Update, bool]:
        while self._paced.read_paused and not self._paced.closed:
            gate = self._gate = anyio.Event()
            await gate.wait()
        up, _ = await super().receive()
        return up, False  # no PING to answer: liveness is the socket's and request_timeout's

    async def flush(self) -> bool:
        gate = self._gate
        if gate is not None and (not self._paced.read_paused or self._paced.closed):
            self._gate = None
            gate.set()
        await super().flush()
        return True


# (address, cluster, TLS context or None, ALPN or None, the core) → a connected transport
Connector = Callable[
    [Address, ClusterConfig, "ssl.SSLContext | None", "str | None", BackendCore],
    Awaitable[Transport],
]


async def connect_stream(
    address: Address,
    cfg: ClusterConfig,
    tls: ssl.SSLContext | None,
    alpn: str | None,
    core: BackendCore,
) -> Transport:
    """TCP, with TLS when ``tls`` is given (and ``alpn`` checked when named)."""
    return StreamTransport(await _open_tcp(address, cfg, tls, alpn), cast(StreamCore, core))


async def connect_paced(
    address: Address,
    cfg: ClusterConfig,
    tls: ssl.SSLContext | None,
    alpn: str | None,
    core: BackendCore,
) -> Transport:
    """As :func:`connect_stream`, for a core that paces reads itself (HTTP/1.1)."""
    return PacedStreamTransport(await _open_tcp(address, cfg, tls, alpn), cast(PacedCore, core))


async def _open_tcp(
    address: Address, cfg: ClusterConfig, tls: ssl.SSLContext | None, alpn: str | None
) -> anyio.abc.ByteStream:
    stream: anyio.abc.ByteStream
    if tls is None:
        stream = lean_stream(await anyio.connect_tcp(address.host, address.port))
    else:
        stream = await anyio.connect_tcp(
            address.host,
            address.port,
            ssl_context=tls,
            tls_hostname=cfg.tls.server_name or address.host,
            tls_standard_compatible=False,
        )
        if alpn is not None and stream.extra(TLSAttribute.alpn_protocol, None) != alpn:
            await stream.aclose()
            raise BackendUnavailable(f"backend {address} did not negotiate {alpn} (ALPN)")
    return stream


def lean_stream(stream: anyio.abc.ByteStream) -> anyio.abc.ByteStream:
    """anyio's plain TCP ``stream`` as the running loop's lean stream (a
    :class:`~muxproxy.io.fast_stream.FastStream`): asyncio's or trio's."""
    if asyncio_running():
        return fast_stream(stream)
    if not TRIO_STREAMS:
        return stream
    from .trio_stream import trio_stream  # (trio is imported only when it runs)

    return trio_stream(stream)


def client_tls_context(cfg: ClusterConfig, alpn: str | None) -> ssl.SSLContext:
    """The TLS client context of a cluster: its CA, verification unless turned off, ALPN."""
    ctx = ssl.create_default_context(cafile=cfg.tls.ca)
    if not cfg.tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if alpn is not None:
        ctx.set_alpn_protocols([alpn])
    return ctx


def describe(exc: BaseException) -> str:
    """A network exception in a few words, for a 502's reason and the log."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
