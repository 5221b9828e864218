"""RFC 6455 framing for the bench's own WebSocket peers (stdlib only).

One place for what bench/ws_load.py (the load clients: masked frames) and
bench/scale_origin.py (the lean origin: unmasked frames) both need: the handshake's accept
value, one final frame, and the parser of the first complete frame in a buffer. Only what
the bench sends and receives: single-frame messages, no extensions.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def accept_for(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept value for a Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def _xor(payload: bytes, mask: bytes) -> bytes:
    length = len(payload)
    keystream = (mask * (length // 4 + 1))[:length]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(keystream, "big")).to_bytes(
        length, "big"
    )


def frame(opcode: int, payload: bytes, *, masked: bool) -> bytes:
    """One final frame; clients mask (``masked=True``), servers do not."""
    length = len(payload)
    mask_bit = 0x80 if masked else 0
    if length < 126:
        head = struct.pack("!BB", 0x80 | opcode, mask_bit | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, mask_bit | 126, length)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, mask_bit | 127, length)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + _xor(payload, mask)


def parse_frame(buf: bytes | bytearray) -> tuple[int, bool, bytes, int] | None:
    """(opcode, fin, unmasked payload, bytes used) of the first complete frame, or None."""
    if len(buf) < 2:
        return None
    b0, b1 = buf[0], buf[1]
    length = b1 & 0x7F
    pos = 2
    if length == 126:
        if len(buf) < 4:
            return None
        length = struct.unpack_from("!H", buf, 2)[0]
        pos = 4
    elif length == 127:
        if len(buf) < 10:
            return None
        length = struct.unpack_from("!Q", buf, 2)[0]
        pos = 10
    mask = b""
    if b1 & 0x80:
        if len(buf) < pos + 4:
            return None
        mask = bytes(buf[pos : pos + 4])
        pos += 4
    if len(buf) < pos + length:
        return None
    payload = bytes(buf[pos : pos + length])
    if mask:
        payload = _xor(payload, mask)
    return b0 & 0x0F, bool(b0 & 0x80), payload, pos + length
