"""What a client's HTTP/2 connection may send: limits, frame counting, request-head checks.

Theory of operation.  :class:`FrameGuard` reads only the 9-byte frame headers of what a
client sends.  It keeps at most one incomplete frame (≤ 16 KiB + 9 bytes), counts frame types
in one-second buckets and CONTINUATION frames and bytes per header block, and names the limit
passed the moment it is passed, before anything decodes the frame.  :func:`check_request`
holds a decoded request head to RFC 9113 §8.2–§8.3 and RFC 8441 §4; a failure is a stream
error for that one request.  Both are used by :mod:`~muxproxy.core.frontend_h2`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .h2wire import (
    CONNECTION_SPECIFIC,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    MAX_FRAME_SIZE,
    PING,
    PREFACE,
    PRIORITY,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
)
from .headers import Header

__all__ = ["FrameGuard", "H2Limits", "Malformed", "Request", "check_request", "field_ok"]

PRIORITY_UPDATE = 0x10  # RFC 9218
MAX_CONNECTION_WINDOW = 1024 * 1024


@dataclass(frozen=True, slots=True)
class H2Limits:
    """Per-connection limits; each has a safe default (``[listeners.limits]``)."""

    max_concurrent_streams: int = 100
    max_header_list_size: int = 64 * 1024
    initial_window: int = 65535  # per-stream receive window
    max_resets_per_second: int = 100
    max_continuation_frames: int = 16  # per header block
    max_settings_per_second: int = 20
    max_pings_per_second: int = 100
    max_priority_per_second: int = 100
    max_window_updates_per_second: int = 10_000
    max_empty_frames_per_second: int = 100

    @property
    def connection_window(self) -> int:
        return max(
            self.initial_window,
            min(self.max_concurrent_streams * self.initial_window, MAX_CONNECTION_WINDOW),
        )


@dataclass(slots=True)
class Request:
    """A request head that passed every check.  ``protocol`` is ``:protocol`` (RFC 8441)."""

    stream_id: int
    method: bytes
    scheme: bytes
    authority: bytes
    path: bytes
    protocol: bytes | None
    headers: list[Header]  # regular fields, lower-case, in order; Host folded into authority
    end_stream: bool


# --- the frame guard ---------------------------------------------------------------------


class FrameGuard:
    """Splits the byte stream into whole frames and counts them against the limits."""

    __slots__ = (
        "block_bytes",
        "block_frames",
        "buf",
        "counts",
        "in_block",
        "limits",
        "preface_done",
        "recoverable",
        "second",
    )

    def __init__(self, limits: H2Limits) -> None:
        self.limits = limits
        self.buf = b""
        self.preface_done = False
        self.second = -1
        self.counts: dict[str, int] = {}
        self.in_block = False
        self.block_frames = 0
        self.block_bytes = 0
        # The last limit passed was a per-second rate of a frame the connection can do
        # without: the frame was dropped (or, RST_STREAM / WINDOW_UPDATE / DATA, passed on)
        # and the rest kept, so the connection can wind down after GOAWAY(ENHANCE_YOUR_CALM)
        # (``feed(b"")`` goes on).  Anything else (frame size, header blocks) ends it.
        self.recoverable = False

    def feed(self, data: bytes, now: float) -> tuple[list[bytes], str | None]:
        """Whole frames (the preface is the first "frame"), and a reason if a limit was passed
        (then the frames before the offending one are returned, and nothing after: see
        ``recoverable`` for what becomes of the rest)."""
        buf = self.buf + data if self.buf else data
        out: list[bytes] = []
        pos = 0
        if not self.preface_done:
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(buf):
                    return [], "not an HTTP/2 connection preface"
                self.buf = buf
                return [], None
            if not buf.startswith(PREFACE):
                return [], "not an HTTP/2 connection preface"
            self.preface_done = True
            out.append(PREFACE)
            pos = len(PREFACE)
        sec = int(now)
        if sec != self.second:
            self.second = sec
            self.counts = {}
        n = len(buf)
        while n - pos >= 9:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            if length > MAX_FRAME_SIZE:
                self.buf = b""
                return out, f"frame of {length} bytes over {MAX_FRAME_SIZE}"
            if n - pos < 9 + length:
                break
            ftype = buf[pos + 3]
            flags = buf[pos + 4]
            self.recoverable = False
            why = self._count(ftype, flags, length)
            if why is not None:
                if self.recoverable:
                    end = pos + 9 + length
                    if ftype in (RST_STREAM, WINDOW_UPDATE, DATA):  # (cheap, and needed)
                        out.append(buf[pos:end])
                    self.buf = buf[end:]
                else:
                    self.buf = b""
                return out, why
            out.append(buf[pos : pos + 9 + length])
            pos += 9 + length
        self.buf = buf[pos:]
        return out, None

    def _bump(self, key: str, limit: int) -> str | None:
        c = self.counts.get(key, 0) + 1
        self.counts[key] = c
        if c <= limit:
            return None
        self.recoverable = True
        return f"{key} flood: more than {limit} per second"

    def _count(self, ftype: int, flags: int, length: int) -> str | None:
        lim = self.limits
        if ftype in (HEADERS, CONTINUATION):
            if ftype == HEADERS:
                self.in_block, self.block_frames, self.block_bytes = True, 0, 0
            else:
                self.block_frames += 1
                if self.block_frames > lim.max_continuation_frames:
                    return f"more than {lim.max_continuation_frames} CONTINUATION frames"
            self.block_bytes += length
            if self.block_bytes > lim.max_header_list_size:
                return f"header block over {lim.max_header_list_size} bytes"
            if flags & END_HEADERS:
                self.in_block = False
            if length == 0 and not flags & END_STREAM:
                why = self._bump("empty frame", lim.max_empty_frames_per_second)
                self.recoverable = False  # (dropping part of a header block breaks HPACK)
                return why
            return None
        if ftype == DATA:
            if length == 0 and not flags & END_STREAM:
                return self._bump("empty frame", lim.max_empty_frames_per_second)
            return None
        if ftype == RST_STREAM:
            return self._bump("RST_STREAM", lim.max_resets_per_second)
        if ftype == SETTINGS:
            return None if flags & 0x1 else self._bump("SETTINGS", lim.max_settings_per_second)
        if ftype == PING:
            return None if flags & 0x1 else self._bump("PING", lim.max_pings_per_second)
        if ftype in (PRIORITY, PRIORITY_UPDATE):
            return self._bump("PRIORITY", lim.max_priority_per_second)
        if ftype == WINDOW_UPDATE:
            return self._bump("WINDOW_UPDATE", lim.max_window_updates_per_second)
        return None


# --- request head checks ------------------------------------------------------------------

_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})
_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")  # a lower-case token (RFC 9113 §8.2.1)
_VALUE = re.compile(rb"[^\x00\r\n]*")  # no NUL, CR or LF; no leading/trailing space below


def field_ok(name: bytes, value: bytes) -> bool:
    return (
        _NAME.fullmatch(name) is not None
        and _VALUE.fullmatch(value) is not None
        and value[:1] not in (b" ", b"\t")
        and value[-1:] not in (b" ", b"\t")
    )


class Malformed(Exception):
    pass


def check_request(
    stream_id: int, fields: list[Header], end_stream: bool, connect_protocol: bool
) -> Request:
    """RFC 9113 §8.2 and §8.3.1, RFC 8441 §4: the checks a request head must pass.

    Raises:
        Malformed: with a short reason; the stream is reset with PROTOCOL_ERROR.
    """
    pseudo: dict[bytes, bytes] = {}
    regular: list[Header] = []
    for name, value in fields:
        if name[:1] == b":":
            if regular:
                raise Malformed("pseudo-header after a regular field")
            if name not in _PSEUDO:
                raise Malformed(f"unknown pseudo-header {name[:20]!r}")
            if name in pseudo:
                raise Malformed(f"duplicate {name.decode()}")
            pseudo[name] = value
            continue
        if not field_ok(name, value):
            raise Malformed("invalid field name or value")
        if name in CONNECTION_SPECIFIC:
            raise Malformed(f"connection-specific field {name.decode()}")
        if name == b"te" and value != b"trailers":
            raise Malformed("te other than trailers")
        regular.append((name, value))
    method = pseudo.get(b":method")
    if not method:
        raise Malformed("missing :method")
    protocol = pseudo.get(b":protocol")
    authority = pseudo.get(b":authority", b"")
    if method == b"CONNECT" and protocol is None:
        # Plain CONNECT (a TCP tunnel, RFC 9113 §8.5): well-formed, it is a request this proxy
        # does not serve (501, as on HTTP/1.1); malformed, a stream error.
        if b":scheme" in pseudo or b":path" in pseudo or not authority:
            raise Malformed("CONNECT with :scheme or :path, or without :authority")
        return Request(stream_id, method, b"", authority, b"", None, regular, end_stream)
    if protocol is not None:
        if not connect_protocol:
            raise Malformed(":protocol without SETTINGS_ENABLE_CONNECT_PROTOCOL")
        if method != b"CONNECT":
            raise Malformed(":protocol on a request that is not CONNECT")
    scheme = pseudo.get(b":scheme")
    path = pseudo.get(b":path")
    if not scheme or not path:
        raise Malformed("missing :scheme or :path")
    if scheme not in (b"http", b"https"):
        raise Malformed("unsupported :scheme")
    if path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS"):
        raise Malformed(":path not in origin form")
    if not authority:
        # RFC 9113 §8.3.1: a Host field stands in for :authority; one of them must be there.
        hosts = [v for n, v in regular if n == b"host"]
        if len(hosts) != 1 or not hosts[0]:
            raise Malformed("no :authority and no single Host field")
        authority = hosts[0]
    elif any(n == b"host" and v != authority for n, v in regular):
        raise Malformed("Host differs from :authority")
    return Request(
        stream_id,
        method,
        scheme,
        authority,
        path,
        protocol,
        [(n, v) for n, v in regular if n != b"host"],
        end_stream,
    )
