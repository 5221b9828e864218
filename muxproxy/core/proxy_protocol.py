"""PROXY protocol v1 and v2 headers (HAProxy's ``doc/proxy-protocol.txt``), parsed strictly.

Theory of operation: an L4 balancer in front of a listener with ``proxy_protocol = true``
starts every connection with one header saying who the client really is.  The I/O layer
reads bytes into a buffer and calls :func:`parse` after each read: it answers ``None`` (the
header is not complete yet: read more), or a :class:`ProxyHeader` and the number of bytes it
used (what follows is the client's first request bytes), or raises
:class:`ProxyHeaderError` (the connection must be closed: the spec says anything that does
not match exactly aborts it).  The parser never guesses whether a header is present: on a
``proxy_protocol`` listener it is required.

v1 (text): ``PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n`` or ``PROXY UNKNOWN…\\r\\n``,
at most 107 bytes with the CRLF, single spaces, ports in decimal digits only, addresses of
the announced family.  v2 (binary): the 12-byte signature, version 2, command LOCAL or
PROXY, family AF_INET/AF_INET6/AF_UNIX (or UNSPEC) over STREAM (or UNSPEC), a length of at
most :data:`MAX_V2_LENGTH`, then TLVs, each exactly inside the block; a CRC32C TLV is
verified.  LOCAL, UNSPEC and UNKNOWN mean "use the connection's own addresses":
:attr:`ProxyHeader.local` is then true and the addresses are empty.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

__all__ = [
    "MAX_V1_LENGTH",
    "MAX_V2_LENGTH",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyHeaderError",
    "crc32c",
    "parse",
]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_V1_LENGTH = 107  # the spec's worst case, "PROXY TCP6 <39> <39> 65535 65535\r\n"
MAX_V2_LENGTH = 4096  # addresses and TLVs; HAProxy itself stays within one buffer
_V1_PREFIX = b"PROXY "

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_TYPE_NETNS = 0x30

_ADDRESS_LENGTHS = {0x1: 12, 0x2: 36, 0x3: 216}  # AF_INET, AF_INET6, AF_UNIX


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY header; the connection must be closed."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    version: int  # 1 or 2
    local: bool  # LOCAL / UNKNOWN / UNSPEC: use the connection's own addresses
    family: str = ""  # "inet", "inet6", "unix" ("" when local)
    src_addr: str = ""
    src_port: int = 0
    dst_addr: str = ""
    dst_port: int = 0
    tlvs: tuple[tuple[int, bytes], ...] = field(default=())  # v2 TLVs in order, raw

    def tlv(self, kind: int) -> bytes | None:
        for k, v in self.tlvs:
            if k == kind:
                return v
        return None


# v2 address families with IP addresses: family name, address class, address size.
_INET: dict[int, tuple[str, type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address], int]] = {
    0x1: ("inet", ipaddress.IPv4Address, 4),
    0x2: ("inet6", ipaddress.IPv6Address, 16),
}

def parse(data: bytes | bytearray) -> tuple[ProxyHeader, int] | None:
    """The header at the start of ``data`` and its length, or None if more bytes are needed.

    Raises:
        ProxyHeaderError: what has arrived cannot start a valid header.
    """
    n = min(len(data), 12)
    if data[:n] == V2_SIGNATURE[:n]:
        return None if n < 12 else _parse_v2(data)
    n = min(len(data), 6)
    if data[:n] == _V1_PREFIX[:n]:
        return None if n < 6 else _parse_v1(data)
    raise ProxyHeaderError("not a PROXY protocol header")


def _parse_v1(data: bytes | bytearray) -> tuple[ProxyHeader, int] | None:
    end = data.find(b"\r\n", 0, MAX_V1_LENGTH)
    if end < 0:
        bad = data.find(b"\n", 0, MAX_V1_LENGTH)
        if bad >= 0 or len(data) >= MAX_V1_LENGTH:
            raise ProxyHeaderError("v1: no CRLF within 107 bytes")
        if b"\r" in data[: len(data) - 1]:
            raise ProxyHeaderError("v1: a CR not followed by LF")
        return None
    line = bytes(data[6:end])
    if b"\r" in line or b"\n" in line:
        raise ProxyHeaderError("v1: a lone CR or LF")
    if line.startswith(b"UNKNOWN"):  # the rest of the line is to be ignored
        if len(line) > 7 and line[7:8] != b" ":
            raise ProxyHeaderError("v1: bad protocol")
        return ProxyHeader(version=1, local=True), end + 2
    parts = line.split(b" ")
    if len(parts) != 5:
        raise ProxyHeaderError("v1: expected 'PROXY TCP4|TCP6 src dst sport dport'")
    proto, src, dst, sport, dport = parts
    if proto == b"TCP4":
        family, make = "inet", ipaddress.IPv4Address
    elif proto == b"TCP6":
        family, make = "inet6", ipaddress.IPv6Address  # type: ignore[assignment]
    else:
        raise ProxyHeaderError("v1: protocol must be TCP4, TCP6 or UNKNOWN")
    try:
        src_ip = make(src.decode("ascii"))
        dst_ip = make(dst.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise ProxyHeaderError(f"v1: bad {proto.decode()} address") from None
    return (
        ProxyHeader(
            version=1,
            local=False,
            family=family,
            src_addr=str(src_ip),
            src_port=_port(sport),
            dst_addr=str(dst_ip),
            dst_port=_port(dport),
        ),
        end + 2,
    )


def _port(raw: bytes) -> int:
    if not (1 <= len(raw) <= 5 and raw.isdigit() and raw.isascii()):
        raise ProxyHeaderError("v1: a port is 1 to 5 decimal digits")
    if len(raw) > 1 and raw[0:1] == b"0":
        raise ProxyHeaderError("v1: a port has no leading zero")
    port = int(raw)
    if port > 65535:
        raise ProxyHeaderError("v1: port out of range")
    return port


def _parse_v2(data: bytes | bytearray) -> tuple[ProxyHeader, int] | None:
    if len(data) < 16:
        if len(data) > 12 and data[12] >> 4 != 2:
            raise ProxyHeaderError("v2: version must be 2")
        return None
    ver_cmd, fam, length = data[12], data[13], int.from_bytes(data[14:16], "big")
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError("v2: version must be 2")
    command = ver_cmd & 0xF
    if command not in (0x0, 0x1):
        raise ProxyHeaderError("v2: command must be LOCAL or PROXY")
    if length > MAX_V2_LENGTH:
        raise ProxyHeaderError(f"v2: header longer than {MAX_V2_LENGTH} bytes")
    if len(data) < 16 + length:
        return None
    block = bytes(data[16 : 16 + length])
    af, transport = fam >> 4, fam & 0xF
    if af not in (0, *_ADDRESS_LENGTHS):
        raise ProxyHeaderError("v2: unknown address family")
    if transport not in (0, 1):  # UNSPEC or STREAM: a TCP listener cannot take DGRAM
        raise ProxyHeaderError("v2: transport must be STREAM")
    alen = _ADDRESS_LENGTHS.get(af, 0)
    if length < alen:
        raise ProxyHeaderError("v2: address block shorter than its family needs")
    tlvs, crc_at = _tlvs(block[alen:])
    if crc_at >= 0:  # checksum of the whole header with the CRC value zeroed
        header = bytes(data[: 16 + length])
        at = 16 + alen + crc_at
        zeroed = header[:at] + b"\0\0\0\0" + header[at + 4 :]
        if crc32c(zeroed) != int.from_bytes(header[at : at + 4], "big"):
            raise ProxyHeaderError("v2: CRC32C mismatch")
    used = 16 + length
    if command == 0x0 or af == 0:  # LOCAL, or PROXY with UNSPEC: the socket's addresses
        return ProxyHeader(version=2, local=True, tlvs=tlvs), used
    inet = _INET.get(af)
    if inet is not None:
        family, address, n = inet  # (the two address families differ only in these)
        return (
            ProxyHeader(
                version=2,
                local=False,
                family=family,
                src_addr=str(address(block[0:n])),
                dst_addr=str(address(block[n : 2 * n])),
                src_port=int.from_bytes(block[2 * n : 2 * n + 2], "big"),
                dst_port=int.from_bytes(block[2 * n + 2 : 2 * n + 4], "big"),
                tlvs=tlvs,
            ),
            used,
        )
    src = block[0:108].split(b"\0", 1)[0].decode("utf-8", "replace")
    dst = block[108:216].split(b"\0", 1)[0].decode("utf-8", "replace")
    return (
        ProxyHeader(version=2, local=False, family="unix", src_addr=src, dst_addr=dst, tlvs=tlvs),
        used,
    )


def _tlvs(raw: bytes) -> tuple[tuple[tuple[int, bytes], ...], int]:
    """The TLVs, and the offset of the CRC32C TLV's value in ``raw`` (-1: none)."""
    out: list[tuple[int, bytes]] = []
    crc_at = -1
    i = 0
    while i < len(raw):
        if len(raw) - i < 3:
            raise ProxyHeaderError("v2: truncated TLV")
        kind, size = raw[i], int.from_bytes(raw[i + 1 : i + 3], "big")
        if i + 3 + size > len(raw):
            raise ProxyHeaderError("v2: a TLV runs past the header")
        if kind == PP2_TYPE_CRC32C:
            if size != 4 or crc_at >= 0:
                raise ProxyHeaderError("v2: one CRC32C TLV of 4 bytes")
            crc_at = i + 3
        out.append((kind, raw[i + 3 : i + 3 + size]))
        i += 3 + size
    return tuple(out), crc_at


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli), as the v2 CRC32C TLV carries it."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
