"""PROXY protocol v1/v2 on a listener: the client address comes from the header; a peer
outside trusted_proxies, a malformed header, no header or a slow one closes the connection."""

from __future__ import annotations

import json
import ssl
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
import trustme
from anyio.streams.tls import TLSStream

from muxproxy.config import Address, loads
from muxproxy.core.outcome import Outcome
from muxproxy.core.proxy_protocol import V2_SIGNATURE
from muxproxy.demo.h2server import H2Origin
from muxproxy.io.server import Proxy

from .origin import Script

pytestmark = pytest.mark.anyio

GET_HEADERS = b"GET /headers HTTP/1.1\r\nhost: a.example\r\nx-forwarded-for: 6.6.6.6\r\n\r\n"


@asynccontextmanager
async def pp_proxy(timeout: str = "5s", tls: str = "") -> AsyncIterator[tuple[Proxy, Address]]:
    origin = H2Origin(Script())
    async with anyio.create_task_group() as tg:
        port = await tg.start(origin.serve)
        cfg = loads(
            '[[listeners]]\nname = "edge"\nlisten = "127.0.0.1:0"\nproxy_protocol = true\n'
            f'trusted_proxies = ["127.0.0.1/32"]\n{tls}\n'
            f'[listeners.limits]\nproxy_protocol_timeout = "{timeout}"\n'
            f'[[clusters]]\nname = "app"\nbackends = ["127.0.0.1:{port}"]\nconnections = 1\n'
            '[[routes]]\ncluster = "app"\n'
        )
        proxy = Proxy(cfg)
        bound = await tg.start(proxy.serve)
        try:
            yield proxy, bound["edge"]
        finally:
            tg.cancel_scope.cancel()


async def exchange(addr: Address, *pieces: bytes, source: str = "127.0.0.1") -> bytes:
    """Send the pieces (one write each), read until the proxy closes or answers."""
    stream = await anyio.connect_tcp(addr.host, addr.port, local_host=source)
    out = bytearray()
    with anyio.fail_after(10):
        try:
            for piece in pieces:
                await stream.send(piece)
            while b"\r\n\r\n" not in out or (b"]" not in out and out.startswith(b"HTTP/1.1 200")):
                out += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
            pass
    await stream.aclose()
    return bytes(out)


def forwarded_for(response: bytes) -> str:
    assert response.startswith(b"HTTP/1.1 200"), response
    fields = dict(json.loads(response.split(b"\r\n\r\n", 1)[1]))
    return str(fields["x-forwarded-for"])


def v2_inet(src: str, sport: int, command: int = 0x1) -> bytes:
    import ipaddress

    block = ipaddress.ip_address(src).packed + bytes([127, 0, 0, 1]) + struct.pack("!HH", sport, 80)
    return V2_SIGNATURE + bytes([0x20 | command, 0x11]) + struct.pack("!H", len(block)) + block


async def test_v1_header_gives_the_client_address() -> None:
    async with pp_proxy() as (_, addr):
        header = b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 80\r\n"
        # the header and the request in one segment, then split in two writes
        assert forwarded_for(await exchange(addr, header + GET_HEADERS)) == "203.0.113.7"
        r = await exchange(addr, header[:10], header[10:] + GET_HEADERS[:5], GET_HEADERS[5:])
        assert forwarded_for(r) == "203.0.113.7"  # the client's own X-Forwarded-For dropped


async def test_v2_header_gives_the_client_address() -> None:
    async with pp_proxy() as (proxy, addr):
        outcomes: list[Outcome] = []
        proxy.recorders.append(outcomes.append)
        r = await exchange(addr, v2_inet("198.51.100.9", 5555) + GET_HEADERS)
        assert forwarded_for(r) == "198.51.100.9"
        local = V2_SIGNATURE + bytes([0x20, 0x00, 0, 0])
        await exchange(addr, local + GET_HEADERS)
    # The access log's and the metrics' record: the header's client, the balancer as peer;
    # a LOCAL header (the balancer's own health check) has no other peer.
    assert [(o.client_addr, o.client_port, o.peer_addr) for o in outcomes] == [
        ("198.51.100.9", 5555, "127.0.0.1"),
        ("127.0.0.1", outcomes[1].client_port, ""),
    ]


async def test_v2_local_keeps_the_connection_address() -> None:
    async with pp_proxy() as (_, addr):
        local = V2_SIGNATURE + bytes([0x20, 0x00, 0, 0])
        # the direct peer (a trusted proxy here, so its X-Forwarded-For is extended)
        assert forwarded_for(await exchange(addr, local + GET_HEADERS)) == "6.6.6.6, 127.0.0.1"


@pytest.mark.parametrize(
    "first",
    [
        GET_HEADERS,  # no header: never guessed
        b"PROXY TCP4 203.0.113.7 127.0.0.1 40000  80\r\n" + GET_HEADERS,
        b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 80\n" + GET_HEADERS,
        b"PROXY " + b"x" * 200,
        v2_inet("198.51.100.9", 5555)[:12] + b"\x30" + GET_HEADERS,  # version 3
    ],
)
async def test_bad_or_missing_header_closes_without_an_answer(first: bytes) -> None:
    async with pp_proxy() as (proxy, addr):
        assert await exchange(addr, first) == b""
        assert proxy.proxy_header_errors == 1


async def test_untrusted_peer_is_closed_even_with_a_valid_header() -> None:
    async with pp_proxy() as (proxy, addr):
        header = b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 80\r\n"
        assert await exchange(addr, header + GET_HEADERS, source="127.0.0.2") == b""
        assert proxy.proxy_header_errors == 1
        assert forwarded_for(await exchange(addr, header + GET_HEADERS)) == "203.0.113.7"


async def test_a_header_that_never_completes_is_dropped_after_the_timeout() -> None:
    async with pp_proxy(timeout="200ms") as (proxy, addr):
        assert await exchange(addr, b"PROXY TCP4 203.0.113.7") == b""
        assert proxy.proxy_header_errors == 1


async def test_tls_listener_reads_the_header_before_the_handshake(tmp_path: Path) -> None:
    """An L4 balancer passing TLS through: PROXY header in clear, then the ClientHello (in
    the same segment here), and the certificate is still chosen by SNI."""
    ca = trustme.CA()
    cert = ca.issue_cert("a.example")
    pem, key = tmp_path / "a.pem", tmp_path / "a.key"
    cert.cert_chain_pems[0].write_to_path(str(pem))
    cert.private_key_pem.write_to_path(str(key))
    tls = f'tls = [{{ cert = "{pem}", key = "{key}", names = ["a.example"] }}]'
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    async with pp_proxy(tls=tls) as (proxy, addr):
        for header in (b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 443\r\n", v2_inet("2.2.2.2", 9)):
            raw = await anyio.connect_tcp(addr.host, addr.port)
            await raw.send(header)
            stream = await TLSStream.wrap(raw, hostname="a.example", ssl_context=client_ctx)
            await stream.send(GET_HEADERS)
            out = bytearray()
            with anyio.fail_after(10):
                while b"]" not in out:
                    out += await stream.receive()
            await anyio.aclose_forcefully(stream)
            expected = "203.0.113.7" if header.startswith(b"PROXY") else "2.2.2.2"
            assert forwarded_for(bytes(out)) == expected
        # a TLS ClientHello without the header first: closed, as on a plain listener
        raw = await anyio.connect_tcp(addr.host, addr.port)
        with pytest.raises((ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream)):
            with anyio.fail_after(10):
                await TLSStream.wrap(raw, hostname="a.example", ssl_context=client_ctx)
        await anyio.aclose_forcefully(raw)
        assert proxy.proxy_header_errors == 1


async def test_connections_reset_before_their_task_runs_cost_nothing() -> None:
    """A peer that connects and resets at once (a balancer's TCP health check): looking up
    its address fails on trio; that must cost this connection only, not the proxy."""
    import socket

    async with pp_proxy() as (_, addr):
        for _ in range(20):
            s = socket.create_connection((addr.host, addr.port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()  # RST
        header = b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 80\r\n"
        assert forwarded_for(await exchange(addr, header + GET_HEADERS)) == "203.0.113.7"
