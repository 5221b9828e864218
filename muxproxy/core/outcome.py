"""What happened to one request or tunnel: the record that access logs and metrics read.

Theory of operation: the I/O layer creates one :class:`Outcome` when a request head (or a
refused attempt at one) has been read, fills it as the request moves through the proxy, and
hands it to the proxy's recorders exactly once, when the request or tunnel is over (including
requests refused before routing: ``reason`` then says why).  Nothing here does I/O or reads a
clock: times are passed in by the caller (``time.monotonic()`` values for durations, and one
``time.time()`` value for the wall-clock start).

Sentinels, as Envoy and HAProxy document theirs: ``status == 0`` means no response was sent
to the client; a duration of ``-1.0`` means the phase never happened (no queue wait, no
upstream response head); empty strings mean "not applicable".
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["REASONS", "Outcome"]

# Short reason codes for outcomes that are not a plain backend answer.  One vocabulary for
# the access log, the metrics' ``reason`` label and the tests; extend it, never rename a code.
REASONS = frozenset(
    {
        "",  # a normal answer from the backend
        "no_route",  # 404 from the proxy
        "refused_malformed",  # 400 and friends: the request was refused at the edge
        "refused_limit",  # 413/414/431: a configured limit
        "header_timeout",  # 408: the head did not arrive in time
        "body_timeout",  # 408: the request body stalled
        "pending_timeout",  # 503: no backend stream within pending_timeout
        "queue_full",  # 503: max_pending reached
        "no_backend",  # 503: no reachable backend
        "connect_failed",  # 502: could not connect to the backend
        "backend_reset",  # 502: the backend reset the stream
        "backend_lost",  # 502: the backend connection died under the stream
        "backend_malformed",  # 502: the backend's response could not be relayed
        "replays_exhausted",  # 502: refused more than max_replays times
        "upstream_timeout",  # 504: no response head within request_timeout
        "client_gone",  # the client reset or closed before the answer was complete
        "send_timeout",  # the client stopped reading
        "rate_limited",  # 429
        "tunnel_closed",  # a WebSocket tunnel ended normally
        "tunnel_idle",  # a WebSocket tunnel timed out
        "draining",  # refused or cut because the proxy is draining
    }
)


@dataclass(slots=True)
class Outcome:
    """One request's or tunnel's record; see the module docstring for the sentinels."""

    wall_start: float  # time.time() when the request head started
    start: float  # monotonic time when the request head started
    listener: str = ""
    client_addr: str = ""  # the true client (after trusted forwarding / PROXY protocol)
    client_port: int = 0
    peer_addr: str = ""  # the direct TCP peer, when it differs from client_addr
    protocol: str = ""  # "HTTP/1.1", "HTTP/1.0", "HTTP/2", "websocket"
    method: str = ""
    authority: str = ""
    path: str = ""
    request_id: str = ""
    route: str = ""
    cluster: str = ""
    backend: str = ""  # host:port of the backend that got the (last) attempt
    backend_conn: int = 0  # the pooled connection's id (0: none)
    stream_id: int = 0  # the backend stream id (0: none)
    replays: int = 0
    status: int = 0  # what the client got; 0 = nothing was sent
    reason: str = ""  # one of REASONS
    detail: str = ""  # a short human-readable explanation, for errors
    bytes_in: int = 0  # request body bytes read from the client
    bytes_out: int = 0  # response bytes written to the client (head included)
    queue_s: float = -1.0  # waiting for a backend stream
    upstream_s: float = -1.0  # request sent → response head received
    end: float = -1.0  # monotonic time when the request or tunnel ended

    @property
    def total_s(self) -> float:
        return self.end - self.start if self.end >= 0 else -1.0
