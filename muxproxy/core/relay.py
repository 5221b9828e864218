"""What a backend connection's protocol core hands the proxy, whatever the protocol.

:class:`StreamState` is one stream's relay state (response head, body chunks not yet written
to the client, its end or reset); :class:`Update` says what one input changed;
:class:`BackendCore` is what the pool and the exchanges need of a core.  Both
:class:`~muxproxy.core.backend_h2.H2Backend` and :class:`~muxproxy.core.backend_h3.H3Backend`
provide it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from .headers import Header


@dataclass(slots=True)
class StreamState:
    """What the backend sent on one stream, waiting to be relayed to the client."""

    stream_id: int
    headers: Sequence[Header] | None = None  # the final response head, once received
    # (data, flow length); a list, not a deque: an empty deque costs ~600 bytes per stream
    chunks: list[tuple[bytes, int]] = field(default_factory=list)
    trailers: Sequence[Header] | None = None
    ended: bool = False  # END_STREAM received
    reset_code: int | None = None  # RST_STREAM received or connection lost
    refused: bool = False  # provably never processed: safe to replay
    error: str | None = None  # why it failed, for the client's 502


@dataclass(slots=True)
class Update:
    """What one call of :meth:`H2Backend.receive_data` changed."""

    streams: list[StreamState] = field(default_factory=list)  # streams with news
    window_opened: bool = False  # send windows may have grown
    capacity_changed: bool = False  # streams closed, or SETTINGS changed the limit
    goaway: bool = False
    ping_acked: bool = False
    closed: bool = False  # connection is unusable (protocol error or GOAWAY with error)

    def answers(self) -> bool:
        """Whether this input answers something we sent — news on our streams, send credit,
        a PING ACK — and so proves the peer reads.  Frames a peer sends of its own accord
        (PINGs, SETTINGS) prove nothing: a peer that floods PINGs and never reads would look
        alive, and loopback's autotuned receive buffers (``tcp_rmem``, 32 MiB here) can swallow
        megabytes without our send ever blocking, so a stuck write is not seen on every loop."""
        return bool(self.streams) or self.window_opened or self.ping_acked


class BackendCore(Protocol):
    """What the pool and the exchanges need of a backend connection's protocol core; both
    :class:`H2Backend` and :class:`~muxproxy.core.backend_h3.H3Backend` provide it."""

    closed: bool
    close_reason: str
    goaway_last_stream_id: int | None
    resets_received: int
    refused_received: int

    @property
    def streams(self) -> Mapping[int, StreamState]: ...  # open, as the protocol counts them
    @property
    def settings_received(self) -> bool: ...
    @property
    def draining(self) -> bool: ...
    @property
    def enable_connect_protocol(self) -> bool: ...
    def free_streams(self) -> int: ...
    def stream_limit(self) -> int: ...
    def open_stream(self, headers: list[Header], end_stream: bool) -> StreamState: ...
    def send_window(self, stream_id: int) -> int: ...
    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None: ...
    def end_stream(self, stream_id: int, trailers: list[Header] | None = None) -> None: ...
    def reset_stream(self, stream_id: int, code: int = ...) -> None: ...
    def discard(self, st: StreamState) -> None: ...
    def consumed(self, stream_id: int, flow_length: int) -> None: ...
    def ping(self) -> None: ...
    def close(self, code: int = ...) -> None: ...
    def abort(self, reason: str) -> Update: ...


S = TypeVar("S", bound=StreamState)


def fail_streams(
    streams: MutableMapping[int, S],
    code: int,
    reason: str,
    up: Update | None,
    refused: Callable[[S], bool] | None = None,
) -> None:
    """A connection ended: every stream not already ended or reset fails with ``code`` and
    ``reason`` (``refused`` says which of them the backend provably never saw, so they may
    be replayed), all are reported in ``up``, and the core forgets them.  Every protocol
    core's termination calls this, so the rule is written once."""
    for st in streams.values():
        if st.reset_code is None and not st.ended:
            st.reset_code = code
            st.error = reason
            if refused is not None:
                st.refused = refused(st)
        if up is not None:
            up.streams.append(st)
    streams.clear()
    if up is not None:
        up.closed = True
        up.capacity_changed = True
