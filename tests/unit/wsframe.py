"""WebSocket frames as bytes (RFC 6455 §5.2), for tests: what a client (masked) or a server
(unmasked) puts on the wire."""

from __future__ import annotations

TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA
MASK = b"\x37\xfa\x21\x3d"


def frame(opcode: int, payload: bytes = b"", *, masked: bool = False, fin: bool = True) -> bytes:
    """One frame; ``masked`` as a client sends it.  The length takes 7, 7+16 or 7+64 bits."""
    n = len(payload)
    first = bytes([(0x80 if fin else 0) | opcode])
    bit = 0x80 if masked else 0
    if n < 126:
        length = bytes([bit | n])
    elif n < 1 << 16:
        length = bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        length = bytes([bit | 127]) + n.to_bytes(8, "big")
    if not masked:
        return first + length + payload
    body = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
    return first + length + MASK + body


def close(code: int = 1000, *, masked: bool = False) -> bytes:
    return frame(CLOSE, code.to_bytes(2, "big"), masked=masked)


def header_size(payload: int, masked: bool) -> int:
    return 2 + (0 if payload < 126 else 2 if payload < 1 << 16 else 8) + (4 if masked else 0)
