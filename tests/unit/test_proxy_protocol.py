"""core/proxy_protocol: the examples of HAProxy's doc/proxy-protocol.txt, and what it refuses."""

from __future__ import annotations

import struct

import pytest

from muxproxy.core.proxy_protocol import (
    MAX_V1_LENGTH,
    MAX_V2_LENGTH,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_UNIQUE_ID,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    crc32c,
    parse,
)

# The spec's own v1 examples (section 2.1).
WORST_V6 = (
    b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
    b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
)


def test_v1_tcp4_example() -> None:
    data = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n"
    got = parse(data)
    assert got is not None
    header, used = got
    assert data[used:] == b"GET / HTTP/1.1\r\n"
    assert header == ProxyHeader(
        version=1,
        local=False,
        family="inet",
        src_addr="192.168.0.1",
        src_port=56324,
        dst_addr="192.168.0.11",
        dst_port=443,
    )


def test_v1_tcp6_and_the_107_byte_worst_case() -> None:
    got = parse(WORST_V6)
    assert got is not None
    assert got[0].family == "inet6" and got[0].src_port == 65535 and got[1] == len(WORST_V6)
    worst = WORST_V6.replace(b"TCP6", b"UNKNOWN")  # the spec's longest possible line
    assert len(worst) == MAX_V1_LENGTH
    got = parse(worst)
    assert got is not None and got[1] == MAX_V1_LENGTH


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
        b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
    ],
)
def test_v1_unknown_uses_the_connection_addresses(line: bytes) -> None:
    got = parse(line)
    assert got is not None
    assert got[0].local and got[1] == len(line)


def test_v1_waits_for_the_crlf_byte_by_byte() -> None:
    data = b"PROXY TCP4 10.0.0.1 10.0.0.2 1234 80\r\n"
    for i in range(len(data)):
        assert parse(data[:i]) is None, i
    assert parse(data) is not None


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",  # no header at all: never guessed
        b"PROXY  TCP4 10.0.0.1 10.0.0.2 1234 80\r\n",  # two spaces
        b"PROXY TCP4 10.0.0.1  10.0.0.2 1234 80\r\n",
        b"PROXY TCP4 10.0.0.1 10.0.0.2 1234 80 \r\n",  # trailing space
        b"PROXY TCP4 10.0.0.1 10.0.0.2 1234 80\n",  # bare LF
        b"PROXY TCP4 10.0.0.1 10.0.0.2 1234 80\rX\r\n",  # lone CR
        b"PROXY TCP4 10.0.0.1 10.0.0.2 +1234 80\r\n",  # not digits only
        b"PROXY TCP4 10.0.0.1 10.0.0.2 0x10 80\r\n",
        b"PROXY TCP4 10.0.0.1 10.0.0.2 65536 80\r\n",  # out of range
        b"PROXY TCP4 10.0.0.1 10.0.0.2 01234 80\r\n",  # leading zero
        b"PROXY TCP4 ::1 ::1 1234 80\r\n",  # family mismatch
        b"PROXY TCP6 10.0.0.1 10.0.0.2 1234 80\r\n",
        b"PROXY TCP4 010.0.0.1 10.0.0.2 1234 80\r\n",  # ambiguous octal-looking octet
        b"PROXY UDP4 10.0.0.1 10.0.0.2 1234 80\r\n",
        b"PROXY TCP4 10.0.0.1 10.0.0.2 1234\r\n",  # a field missing
        b"PROXY UNKNOWNX\r\n",
        b"proxy TCP4 10.0.0.1 10.0.0.2 1234 80\r\n",  # case matters
    ],
)
def test_v1_anything_inexact_is_refused(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(data)


def test_v1_no_crlf_within_107_bytes_is_refused() -> None:
    with pytest.raises(ProxyHeaderError):
        parse(b"PROXY UNKNOWN " + b"x" * 200)
    assert parse(b"PROXY UNKNOWN " + b"x" * 90) is None  # 104 bytes: may still end


def v2(
    command: int = 0x1,
    family: int = 0x11,
    addresses: bytes = b"",
    tlvs: bytes = b"",
    *,
    version: int = 2,
    length: int | None = None,
) -> bytes:
    body = addresses + tlvs
    n = len(body) if length is None else length
    return V2_SIGNATURE + bytes([(version << 4) | command, family]) + struct.pack("!H", n) + body


def inet(src: str, dst: str, sport: int, dport: int) -> bytes:
    import ipaddress

    return (
        ipaddress.ip_address(src).packed
        + ipaddress.ip_address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def test_v2_tcp4() -> None:
    data = v2(addresses=inet("192.168.0.1", "192.168.0.11", 56324, 443)) + b"GET"
    got = parse(data)
    assert got is not None
    header, used = got
    assert data[used:] == b"GET"
    assert (header.version, header.family, header.src_addr, header.src_port) == (
        2,
        "inet",
        "192.168.0.1",
        56324,
    )
    assert (header.dst_addr, header.dst_port) == ("192.168.0.11", 443)


def test_v2_tcp6_with_tlvs() -> None:
    tlvs = tlv(PP2_TYPE_AUTHORITY, b"example.com") + tlv(PP2_TYPE_UNIQUE_ID, b"id-1")
    data = v2(family=0x21, addresses=inet("2001:db8::1", "2001:db8::2", 1, 2), tlvs=tlvs)
    got = parse(data)
    assert got is not None
    header = got[0]
    assert (header.family, header.src_addr) == ("inet6", "2001:db8::1")
    assert header.dst_addr == "2001:db8::2"
    assert header.tlv(PP2_TYPE_AUTHORITY) == b"example.com"
    assert header.tlv(PP2_TYPE_UNIQUE_ID) == b"id-1"


def test_v2_unix() -> None:
    addresses = b"/run/src".ljust(108, b"\0") + b"/run/dst".ljust(108, b"\0")
    got = parse(v2(family=0x31, addresses=addresses))
    assert got is not None
    assert (got[0].family, got[0].src_addr, got[0].dst_addr) == ("unix", "/run/src", "/run/dst")


def test_v2_local_uses_the_connection_addresses() -> None:
    got = parse(v2(command=0x0, family=0x00))
    assert got is not None and got[0].local and got[1] == 16
    # LOCAL with addresses present: still the connection's own (the spec says ignore them)
    got = parse(v2(command=0x0, addresses=inet("1.2.3.4", "5.6.7.8", 1, 2)))
    assert got is not None and got[0].local and got[0].src_addr == ""


def test_v2_waits_for_the_whole_block() -> None:
    data = v2(addresses=inet("10.0.0.1", "10.0.0.2", 1, 2), tlvs=tlv(PP2_TYPE_UNIQUE_ID, b"x"))
    for i in range(len(data)):
        assert parse(data[:i]) is None, i
    assert parse(data) is not None


def test_crc32c_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value


def with_crc(data: bytes) -> bytes:
    """Fill the CRC32C TLV (the last 4 bytes) of a header built with a zero CRC."""
    return data[:-4] + struct.pack("!I", crc32c(data))


def test_v2_crc32c_verified() -> None:
    base = v2(addresses=inet("10.0.0.1", "10.0.0.2", 1, 2), tlvs=tlv(PP2_TYPE_CRC32C, b"\0" * 4))
    good = with_crc(base)
    assert parse(good) is not None
    bad = good[:-1] + bytes([good[-1] ^ 1])
    with pytest.raises(ProxyHeaderError, match="CRC32C"):
        parse(bad)
    tampered = good.replace(bytes([10, 0, 0, 1]), bytes([10, 0, 0, 9]))
    with pytest.raises(ProxyHeaderError, match="CRC32C"):
        parse(tampered)


@pytest.mark.parametrize(
    "data",
    [
        v2(version=1, addresses=inet("10.0.0.1", "10.0.0.2", 1, 2)),
        v2(command=0x2, addresses=inet("10.0.0.1", "10.0.0.2", 1, 2)),
        v2(family=0x12, addresses=inet("10.0.0.1", "10.0.0.2", 1, 2)),  # DGRAM
        v2(family=0x41, addresses=inet("10.0.0.1", "10.0.0.2", 1, 2)),  # no such family
        v2(family=0x21, addresses=inet("10.0.0.1", "10.0.0.2", 1, 2)),  # too short for inet6
        v2(addresses=inet("10.0.0.1", "10.0.0.2", 1, 2), tlvs=b"\x05\x00"),  # truncated TLV
        v2(addresses=inet("10.0.0.1", "10.0.0.2", 1, 2), tlvs=b"\x05\x00\x09abc"),  # overrun
        v2(addresses=inet("10.0.0.1", "10.0.0.2", 1, 2), tlvs=tlv(PP2_TYPE_CRC32C, b"\0\0")),
        v2(length=MAX_V2_LENGTH + 1),
        b"\r\n\r\n\x00\r\nQUIX\n",  # the 12-byte signature must match in full
    ],
)
def test_v2_refusals(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(data)
