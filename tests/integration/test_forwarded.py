"""`forwarded = "rfc7239" | "both"` on a real listener: the backend gets an RFC 7239
Forwarded field, replaced for an untrusted client, extended for a trusted proxy, and naming
the client of a PROXY header (IPv6 bracketed and quoted)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from muxproxy.config import Address, loads
from muxproxy.demo.h2server import H2Origin
from muxproxy.io.server import Proxy

from .origin import Script

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def proxy(mode: str) -> AsyncIterator[dict[str, Address]]:
    origin = H2Origin(Script())
    async with anyio.create_task_group() as tg:
        port = await tg.start(origin.serve)
        cfg = loads(
            '[[listeners]]\nname = "plain"\nlisten = "127.0.0.1:0"\n'
            f'forwarded = "{mode}"\ntrusted_proxies = ["127.0.0.1/32"]\n'
            '[[listeners]]\nname = "pp"\nlisten = "127.0.0.1:0"\nproxy_protocol = true\n'
            f'forwarded = "{mode}"\ntrusted_proxies = ["127.0.0.1/32"]\n'
            f'[[clusters]]\nname = "app"\nbackends = ["127.0.0.1:{port}"]\nconnections = 1\n'
            '[[routes]]\ncluster = "app"\n'
        )
        bound = await tg.start(Proxy(cfg).serve)
        try:
            yield bound
        finally:
            tg.cancel_scope.cancel()


async def backend_saw(addr: Address, request: bytes, source: str = "127.0.0.1") -> dict[str, str]:
    """The fields the backend received (the origin's /headers echoes them)."""
    stream = await anyio.connect_tcp(addr.host, addr.port, local_host=source)
    out = bytearray()
    with anyio.fail_after(10):
        await stream.send(request)
        try:
            while True:
                out += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass
    await stream.aclose()
    assert out.startswith(b"HTTP/1.1 200"), bytes(out)
    fields: list[list[str]] = json.loads(bytes(out).split(b"\r\n\r\n", 1)[1])
    seen: dict[str, str] = {}
    for name, value in fields:
        seen[name] = f"{seen[name]}, {value}" if name in seen else value
    return seen


def get(forwarded: str = "") -> bytes:
    extra = f"forwarded: {forwarded}\r\nx-forwarded-for: 6.6.6.6\r\n" if forwarded else ""
    return (
        f"GET /headers HTTP/1.1\r\nhost: a.example:8080\r\n{extra}connection: close\r\n\r\n"
    ).encode()


async def test_rfc7239_replaced_for_an_untrusted_client_extended_for_a_trusted_one() -> None:
    async with proxy("rfc7239") as bound:
        seen = await backend_saw(bound["plain"], get("for=6.6.6.6"), source="127.0.0.2")
        assert seen["forwarded"] == 'for=127.0.0.2;proto=http;host="a.example:8080"'
        assert "x-forwarded-for" not in seen  # (an untrusted client's own is dropped too)
        seen = await backend_saw(bound["plain"], get('for="[2001:db8::1]";proto=https'))
        assert seen["forwarded"] == (
            'for="[2001:db8::1]";proto=https, for=127.0.0.1;proto=http;host="a.example:8080"'
        )
        assert seen["x-forwarded-for"] == "6.6.6.6"  # a trusted peer's, passed on as is


async def test_both_behind_a_proxy_protocol_header_names_the_ipv6_client() -> None:
    async with proxy("both") as bound:
        header = b"PROXY TCP6 2001:db8::7 ::1 40000 80\r\n"
        seen = await backend_saw(bound["pp"], header + get())
        assert seen["forwarded"] == 'for="[2001:db8::7]";proto=http;host="a.example:8080"'
        assert seen["x-forwarded-for"] == "2001:db8::7"
