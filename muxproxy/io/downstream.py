"""The seam between a request's relay and the client connection it came from.

An :class:`~muxproxy.io.exchange.Exchange` (and a WebSocket tunnel through it) never touches
the client connection's fields: it reads the request body, queues the response and learns
whether the connection may be kept, through :class:`Downstream` only.  HTTP/1.1 client
connections (``io/client.py``) implement it today; HTTP/2 client streams will implement the
same methods (a "reset" is then RST_STREAM and keeps the connection), so nothing here may
assume HTTP/1.1.

Queuing and writing are separate, as in h2 (``send_headers`` then ``data_to_send``): the
``send_*`` methods and :meth:`Downstream.end` only queue, :meth:`Downstream.flush` writes
what is queued in one go.  A response of one head and one body chunk costs one write.

Return values say whether the *connection* can still serve another request once this one is
over; ``False`` also means the response was cut and the relay must stop feeding it.

Network failures are mapped once, at the boundary: a client that vanished or stopped reading
surfaces as :class:`ClientGone`, never as an anyio or OS exception.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from ..core.frontend_h11 import Body, EndOfRequest
from ..core.headers import Forwarding, Header
from ..core.outcome import Outcome
from ..errors import ClientGone, ProxyError
from .timers import TimerWheel

if TYPE_CHECKING:
    from ..config import ListenerConfig
    from ..router import Router
    from .detached import DetachedTunnel
    from .fast_stream import FastStream
    from .pool import ClusterPool

__all__ = ["ClientGone", "Downstream", "ProxyHost", "TunnelDownstream"]


class ProxyHost(Protocol):
    """What a client connection, of any protocol, needs of the proxy it belongs to
    (``server.Proxy``): routes and pools as of now, timers, trust, and the recorders."""

    @property
    def wheel(self) -> TimerWheel: ...
    @property
    def router(self) -> Router: ...
    @property
    def pools(self) -> dict[str, ClusterPool]: ...
    @property
    def draining(self) -> bool: ...
    @property
    def recorders(self) -> list[Callable[[Outcome], None]]: ...
    @property
    def describe(self) -> bool: ...
    def is_trusted(self, listener: ListenerConfig, ip: str) -> bool: ...
    def record(self, outcome: Outcome) -> None: ...
    def internal_error(self, what: str, exc: BaseException) -> None: ...


class Downstream(Protocol):
    """What a request's relay may ask of the client side (one request at a time)."""

    @property
    def outcome(self) -> Outcome:
        """This request's record: the relay fills the backend's part."""
        ...

    @property
    def fwd(self) -> Forwarding:
        """Who the client is, for the forwarding fields."""
        ...

    @property
    def wheel(self) -> TimerWheel:
        """The deadlines the relay shares with the connection."""
        ...

    @property
    def body_timeout(self) -> float:
        """Request-body progress: bounds each step of the upload."""
        ...

    async def read_body(self) -> Body | EndOfRequest:
        """The next piece of the request body.  Raises ClientError (4xx) or ClientGone."""
        ...

    async def send_continue(self) -> None:
        """Tell a client waiting for it (``Expect: 100-continue``) to send its body."""
        ...

    def send_head(self, status: int, headers: Sequence[Header]) -> None:
        """Queue the final response head.  Raises BackendError when the head cannot be
        relayed to this client (nothing was sent: the relay answers 502 instead)."""
        ...

    def send_data(self, data: bytes) -> bool:
        """Queue response body bytes; False: they broke the response's framing (the part
        that still fits is queued), the response is cut and the connection cannot be kept."""
        ...

    def end(self, trailers: list[Header] | None) -> bool:
        """Queue the end of the response; whether the connection can be kept."""
        ...

    def reset(self) -> bool:
        """The response cannot be completed: make sure the client cannot take it for a
        whole one (HTTP/1.1: close the connection).  Whether the connection can be kept."""
        ...

    async def flush(self) -> None:
        """Write everything queued.  Raises ClientGone."""
        ...

    async def send_error(self, exc: ProxyError) -> bool:
        """Answer a proxy-generated error (if no response has started; otherwise this is a
        reset) and record it in the outcome.  Whether the connection can be kept."""
        ...


class TunnelDownstream(Downstream, Protocol):
    """What a WebSocket tunnel needs beyond a request: the raw bytes both ways, and for a
    plain-TCP client the connection itself (a detached tunnel is driven by socket callbacks,
    with no task).

    After the upgrade the connection serves no further request, whatever happens."""

    @property
    def send_timeout(self) -> float:
        """A client that reads nothing for this long is dropped."""
        ...

    @property
    def fast_stream(self) -> FastStream | None:
        """The client stream a detached tunnel can take over (None: TLS, or an HTTP/2 stream)."""
        ...

    async def receive(self) -> bytes:
        """Bytes from the client; b"" at EOF.  Raises ClientGone."""
        ...

    async def send(self, data: bytes) -> None:
        """Write tunnel bytes to the client.  Raises ClientGone."""
        ...

    def leftover(self) -> bytes:
        """End the request cycle: the bytes the client sent past its request."""
        ...

    def detach(self, tunnel: DetachedTunnel) -> bytes:
        """Hand the connection to ``tunnel``, which closes it and calls :meth:`forget` when
        done; returns the bytes the client sent past its request."""
        ...

    def forget(self) -> None:
        """Called by a detached tunnel once it has closed the connection."""
        ...
