"""Error types, and the one table that maps them to what the client sees.

Every failure the proxy can answer for is a :class:`ProxyError` carrying ``status_hint`` (the
HTTP status the client gets) and a short plain-text ``reason``; nothing else ever reaches a
client.  Protocol cores raise these or report peer misbehaviour as events; the I/O layer
turns anyio/OS exceptions into them once, at its boundary.
"""

from __future__ import annotations

__all__ = [
    "RETRYABLE_NEVER_PROCESSED",
    "BackendError",
    "BackendTimeout",
    "BackendUnavailable",
    "ClientError",
    "ClientGone",
    "ConfigError",
    "NoExtendedConnect",
    "ProxyError",
]


class ConfigError(Exception):
    """A configuration problem; ``str(exc)`` is one line naming the key path."""


class ClientGone(Exception):
    """The client vanished (reset, EOF mid-request, or stopped reading past send_timeout)."""


class ProxyError(Exception):
    """A failure answered to the client with ``status_hint`` and a short ``reason``."""

    status_hint: int = 502

    def __init__(
        self,
        reason: str,
        status_hint: int | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.headers = headers  # extra response fields, e.g. Sec-WebSocket-Version on a 426
        if status_hint is not None:
            self.status_hint = status_hint


class ClientError(ProxyError):
    """The client sent something we refuse (4xx); the connection is closed afterwards."""

    status_hint = 400


class BackendError(ProxyError):
    """The backend failed or misbehaved: 502."""

    status_hint = 502


class BackendUnavailable(ProxyError):
    """No stream could be had in time, the queue is full, or no backend is reachable: 503."""

    status_hint = 503


class BackendTimeout(ProxyError):
    """The backend did not answer within ``request_timeout``: 504."""

    status_hint = 504


class StreamRefused(BackendError):
    """The backend provably never processed the stream (REFUSED_STREAM, or above GOAWAY's
    last-stream-id): the request may be replayed whatever its method."""


class NoExtendedConnect(BackendError):
    """No pooled connection's backend announced SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441)."""


RETRYABLE_NEVER_PROCESSED = (StreamRefused,)

REASONS = {
    400: "Bad Request",
    404: "Not Found",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}
