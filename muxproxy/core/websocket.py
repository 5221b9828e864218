"""WebSocket upgrades carried as HTTP/2 extended CONNECT streams (RFC 6455, RFC 8441).

Theory of operation
-------------------
A client's HTTP/1.1 ``Upgrade: websocket`` request is checked here (:func:`check_handshake`),
then translated into an extended CONNECT head (:func:`connect_head`): ``:method CONNECT``,
``:protocol websocket``, no ``Sec-WebSocket-Key`` (RFC 8441 §5).  A 2xx answer becomes the
client's ``101 Switching Protocols`` with the ``Sec-WebSocket-Accept`` computed from the
client's own key (:func:`switching_protocols`).

From then on bytes are relayed, not parsed — except the frame *headers* (2–14 bytes each),
which :class:`FrameWatcher` skims to see close frames go by.  That is how the proxy knows a
tunnel's close handshake has passed both ways, and can end the stream with RST_STREAM(CANCEL):
some backends (hypercorn 0.18, measured) forget a WebSocket stream after its close without
ending it, and ignore END_STREAM on it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence

from ..errors import ClientError
from .headers import Forwarding, Header, request_to_h2

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CLOSE = 0x8

# Fields of the HTTP/1.1 handshake that have no place in an extended CONNECT (RFC 8441 §5).
_H1_ONLY = frozenset({b"sec-websocket-key"})


def is_upgrade(headers: list[Header]) -> bool:
    """The request asks for WebSocket: ``Connection: upgrade`` and ``Upgrade: websocket``."""
    upgrade = connection = False
    for name, value in headers:
        if name == b"upgrade":
            upgrade = upgrade or any(t.strip().lower() == b"websocket" for t in value.split(b","))
        elif name == b"connection":
            connection = connection or any(
                t.strip().lower() == b"upgrade" for t in value.split(b",")
            )
    return upgrade and connection


def check_handshake(method: bytes, http_version: bytes, headers: list[Header]) -> bytes:
    """Validate an upgrade request (RFC 6455 §4.2.1); return its Sec-WebSocket-Key.

    Raises ClientError: 400, or 426 (with ``Sec-WebSocket-Version: 13`` to send) for a wrong
    version.
    """
    if method != b"GET":
        raise ClientError("WebSocket upgrade must be a GET")
    if http_version != b"1.1":
        raise ClientError("WebSocket upgrade needs HTTP/1.1")
    keys = [v for n, v in headers if n == b"sec-websocket-key"]
    versions = [v.strip() for n, v in headers if n == b"sec-websocket-version"]
    if versions != [b"13"]:
        raise ClientError(
            "unsupported Sec-WebSocket-Version (13 is)", 426, ((b"sec-websocket-version", b"13"),)
        )
    if len(keys) != 1:
        raise ClientError("missing or repeated Sec-WebSocket-Key")
    key = keys[0].strip()
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError("malformed Sec-WebSocket-Key") from None
    if len(raw) != 16:
        raise ClientError("malformed Sec-WebSocket-Key")
    return key


def accept_value(key: bytes) -> bytes:
    """``Sec-WebSocket-Accept`` for a client's key (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def connect_head(
    path: bytes,
    authority: bytes,
    headers: list[Header],
    fwd: Forwarding,
) -> list[Header]:
    """The extended CONNECT head for an HTTP/1.1 upgrade request (RFC 8441 §4, §5)."""
    out = request_to_h2(b"CONNECT", path, authority, headers, fwd, extra_drop=_H1_ONLY)
    out.insert(1, (b":protocol", b"websocket"))
    return out


def switching_protocols(key: bytes, response: Sequence[Header]) -> bytes:
    """The client's 101 answer, carrying what the backend negotiated."""
    lines = [
        b"HTTP/1.1 101 Switching Protocols\r\n",
        b"upgrade: websocket\r\n",
        b"connection: Upgrade\r\n",
        b"sec-websocket-accept: " + accept_value(key) + b"\r\n",
    ]
    for name, value in response:
        if name in (b"sec-websocket-protocol", b"sec-websocket-extensions"):
            lines.append(name + b": " + value + b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


class FrameWatcher:
    """Skims one direction of a WebSocket byte stream for frame boundaries.

    ``feed(data)`` returns True once a close frame (opcode 8) has started in this direction.
    Only headers are read; payload bytes are skipped by count, so the cost is per frame, not
    per byte.  Malformed framing is the endpoints' business: the watcher just stops looking.
    """

    __slots__ = ("_head", "_skip", "broken", "closed")

    def __init__(self) -> None:
        self._head = b""  # a partial frame header
        self._skip = 0  # payload bytes of the current frame still to pass
        self.closed = False
        self.broken = False

    def feed(self, data: bytes) -> bool:
        if self.closed or self.broken:
            return self.closed
        pos, n = 0, len(data)
        while pos < n:
            if self._skip:
                step = min(self._skip, n - pos)
                self._skip -= step
                pos += step
                continue
            head = self._head + data[pos : pos + 14]
            need = _header_length(head)
            if need is None or len(head) < need:
                self._head = head
                return False
            pos += need - len(self._head)
            self._head = b""
            if head[0] & 0x0F == CLOSE:
                self.closed = True
                return True
            length = head[1] & 0x7F
            if length == 126:
                length = int.from_bytes(head[2:4], "big")
            elif length == 127:
                length = int.from_bytes(head[2:10], "big")
            self._skip = length
        return False


def _header_length(head: bytes) -> int | None:
    """Bytes in the frame header that starts ``head``; None until 2 bytes are known."""
    if len(head) < 2:
        return None
    length = head[1] & 0x7F
    size = 2 + (2 if length == 126 else 8 if length == 127 else 0)
    return size + (4 if head[1] & 0x80 else 0)
