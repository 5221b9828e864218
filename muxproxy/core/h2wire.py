"""The HTTP/2 wire vocabulary (RFC 9113 §4–§7) for muxproxy's client codec: frame types,
flags, error codes, settings, frame serialisation, and the checks a received header block
must pass.  No state: :mod:`~muxproxy.core.backend_h2` keeps that."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Protocol

from .headers import Header

MAX_STREAM_ID = 2**31 - 1
MAX_WINDOW = 2**31 - 1
# Drain a connection this many stream ids before they run out (RFC 9113 §5.1.1).
STREAM_ID_RESERVE = 1000
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_WINDOW = 65535
MAX_FRAME_SIZE = 16384  # what we accept (the protocol default; we never raise it)
# CONTINUATION frames one header block may use: nghttp2's 8, or as many full frames as a
# block of max_header_list_size needs, whichever is more.
MIN_CONTINUATIONS = 8

# Frame types (RFC 9113 §6) and flags.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

# Error codes (RFC 9113 §7).
ERROR_NAMES = (
    "NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR", "SETTINGS_TIMEOUT",
    "STREAM_CLOSED", "FRAME_SIZE_ERROR", "REFUSED_STREAM", "CANCEL", "COMPRESSION_ERROR",
    "CONNECT_ERROR", "ENHANCE_YOUR_CALM", "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED",
)  # fmt: skip
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED, CANCEL, COMPRESSION_ERROR = 5, 6, 7, 8, 9
ENHANCE_YOUR_CALM = 11

# SETTINGS identifiers.
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE = 1, 2, 3, 4
SETTINGS_MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE, ENABLE_CONNECT_PROTOCOL = 5, 6, 8

FRAME = struct.Struct(">HBBBL")  # length (24 bits as 16 + 8), type, flags, stream id
U32 = struct.Struct(">L")
U32x2 = struct.Struct(">LL")
SETTING = struct.Struct(">HL")

# RFC 9113 §8.2.2: connection-specific fields make a message malformed.
CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)


def max_continuations(max_header_list_size: int) -> int:
    """The CONTINUATION frames allowed in one header block (RFC 9113 §6.10 sets no limit;
    every implementation must, CVE-2024-28182): full frames for the largest block we accept,
    plus one."""
    return max(MIN_CONTINUATIONS, -(-max_header_list_size // MAX_FRAME_SIZE) + 1)


def frame(type_: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return FRAME.pack(n >> 8, n & 0xFF, type_, flags, stream_id) + payload


def header_frames(out: list[bytes], sid: int, block: bytes, flags: int, limit: int) -> None:
    """Append a header block as HEADERS (with ``flags``) and, past ``limit`` (the peer's
    SETTINGS_MAX_FRAME_SIZE), CONTINUATION frames (§6.2, §6.10)."""
    if len(block) <= limit:
        out.append(frame(HEADERS, flags | END_HEADERS, sid, block))
        return
    out.append(frame(HEADERS, flags, sid, block[:limit]))
    for pos in range(limit, len(block), limit):
        last = pos + limit >= len(block)
        out.append(frame(CONTINUATION, END_HEADERS if last else 0, sid, block[pos : pos + limit]))


class ConnectionError_(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class StreamError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def unpad(payload: bytes) -> bytes:
    if not payload:
        raise ConnectionError_(FRAME_SIZE_ERROR, "padded frame without a pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise ConnectionError_(PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1 : len(payload) - pad]


def check_fields(fields: Sequence[Header], *, trailers: bool) -> None:
    """RFC 9113 §8.2.2 and §8.3: a response head has exactly one pseudo-header, ``:status``,
    first; trailers have none; neither has a connection-specific field.  (Names and values
    were checked as they were decoded.)"""
    first = True
    for name, value in fields:
        if name[0] == 0x3A:  # ":"
            if trailers or not first or name != b":status":
                raise StreamError(PROTOCOL_ERROR, f"pseudo-header {name[:20]!r} misplaced")
        elif name in CONNECTION_SPECIFIC or (name == b"te" and value != b"trailers"):
            raise StreamError(PROTOCOL_ERROR, f"connection-specific field {name.decode()}")
        first = False
    if not trailers and (not fields or fields[0][0] != b":status"):
        raise StreamError(PROTOCOL_ERROR, "response without :status")


def update_due(unacked: int, window: int, full: int) -> bool:
    """When a receiver gives credit back (WINDOW_UPDATE, RFC 9113 §6.9): once half of a
    ``full`` window was consumed, or sooner when the peer's ``window`` is empty.  ``unacked``
    is what was consumed and not yet given back."""
    return unacked >= full >> 1 or (window <= 0 and unacked > min(1024, full >> 2))


def give_credit(
    stream_id: int, unacked: int, window: int, full: int
) -> tuple[int, int, bytes | None]:
    """Consumed bytes given back to the peer when :func:`update_due` says so: ``(receive
    window, bytes still not given back, the WINDOW_UPDATE frame to send or None)``."""
    if update_due(unacked, window, full):
        return window + unacked, 0, frame(WINDOW_UPDATE, 0, stream_id, U32.pack(unacked))
    return window, unacked, None


def window_increment(payload: bytes) -> int:
    """A WINDOW_UPDATE's increment (§6.9; 0 is the caller's error to scope)."""
    if len(payload) != 4:
        raise ConnectionError_(FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong size")
    return int(U32.unpack(payload)[0] & MAX_WINDOW)


def credit_error(window: int, increment: int, scope: str) -> tuple[int, str] | None:
    """§6.9 and §6.9.1: what is wrong with a WINDOW_UPDATE adding ``increment`` to a send
    ``window`` of ``scope`` ("connection" or "stream"): ``(error code, reason)``, or None.
    The caller scopes the error: a connection error on stream 0, a stream error otherwise."""
    if not increment:
        return PROTOCOL_ERROR, "WINDOW_UPDATE of 0"
    if window + increment > MAX_WINDOW:
        return FLOW_CONTROL_ERROR, f"{scope} window overflow"
    return None


class Windowed(Protocol):
    """A stream with flow-control windows, of either codec."""

    send_window: int
    recv_window: int


def shift_send_windows(streams: Iterable[Windowed], delta: int) -> None:
    """§6.9.2: a new SETTINGS_INITIAL_WINDOW_SIZE from the peer moves every open stream's send
    window by the difference; a window past 2^31-1 is a connection error."""
    for st in streams:
        st.send_window += delta
        if st.send_window > MAX_WINDOW:
            raise ConnectionError_(FLOW_CONTROL_ERROR, "stream window overflow")


def shift_recv_windows(streams: Iterable[Windowed], delta: int) -> None:
    """§6.9.2: once the peer acknowledged our SETTINGS, our initial window applies to the
    streams already open too."""
    for st in streams:
        st.recv_window += delta


def read_settings(payload: bytes) -> list[tuple[int, int]]:
    """A SETTINGS frame's parameters, held to the ranges both roles enforce (§6.5.2; RFC 8441
    §3 for ENABLE_CONNECT_PROTOCOL)."""
    if len(payload) % 6:
        raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS of the wrong size")
    out = []
    for pos in range(0, len(payload), 6):
        key, value = SETTING.unpack_from(payload, pos)
        if key == INITIAL_WINDOW_SIZE and value > MAX_WINDOW:
            raise ConnectionError_(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE too large")
        if key == SETTINGS_MAX_FRAME_SIZE and not MAX_FRAME_SIZE <= value <= 2**24 - 1:
            raise ConnectionError_(PROTOCOL_ERROR, f"MAX_FRAME_SIZE {value}")
        if key in (ENABLE_PUSH, ENABLE_CONNECT_PROTOCOL) and value > 1:
            name = "ENABLE_PUSH" if key == ENABLE_PUSH else "ENABLE_CONNECT_PROTOCOL"
            raise ConnectionError_(PROTOCOL_ERROR, f"{name} {value}")
        out.append((key, value))
    return out


def code_name(code: int) -> str:
    return ERROR_NAMES[code] if 0 <= code < len(ERROR_NAMES) else f"error {code}"
