"""Issue 16 over loopback: CONTINUATION floods, memos of backend data, a request without
Host, and path normalisation before routing (each test fails on 7630772)."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from muxproxy.config import loads
from muxproxy.core import headers as core_headers
from muxproxy.core.h2wire import CONTINUATION, END_HEADERS, END_STREAM, HEADERS, frame
from muxproxy.core.hpack_codec import encode_field
from muxproxy.demo.h2server import H2Origin, OriginRequest
from muxproxy.io.server import Proxy

from .harness import Harness, config_text, running

pytestmark = pytest.mark.anyio


def status_of(raw: bytes) -> int:
    assert raw.startswith(b"HTTP/1."), raw[:200]
    return int(raw.split(b" ", 2)[1])


async def send_raw(req: OriginRequest, data: bytes) -> None:
    """Bytes written straight to the proxy's backend connection, past h2's own checks."""
    async with req.conn._lock:
        await req.conn.stream.send(data)


def head_block(*fields: tuple[bytes, bytes]) -> bytes:
    """Literals only: the origin's HPACK tables stay as they were."""
    return b"".join(encode_field(n, v) for n, v in fields)


# --- item 4: CONTINUATION frames are counted ----------------------------------------------------


async def test_empty_continuation_flood_fails_the_connection_not_the_proxy() -> None:
    """A response head followed by 100,000 empty CONTINUATION frames (then END_HEADERS): the
    proxy counts frames, fails that backend connection at once with 502, and the next request
    is served on a fresh connection."""

    async def handler(req: OriginRequest) -> None:
        await req.read_body()
        if req.path == b"/flood":
            block = head_block((b":status", b"200"), (b"content-length", b"0"))
            data = frame(HEADERS, END_STREAM, req.stream_id, block)
            data += frame(CONTINUATION, 0, req.stream_id) * 100_000
            data += frame(CONTINUATION, END_HEADERS, req.stream_id)
            await send_raw(req, data)
        else:
            await req.respond(200, [], b"fine\n")

    async with running(handler) as h:
        out = await h.raw(b"GET /flood HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        assert status_of(out) == 502
        r = await h.get("/next")
        assert r.status == 200 and r.body == b"fine\n"
        assert h.origin.connections_accepted >= 2


# --- item 2: memos of what a backend sends are bounded in bytes ---------------------------------


def memo_bytes(h: Harness) -> int:
    total = core_headers.memo_bytes()
    for b in h.pool().backends:
        for conn in [*b.conns, *b.draining]:
            core: Any = conn.core
            total += core._decoder.memo_bytes() + core._encoder.memo_bytes()
    return total


async def read_response(stream: Any) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        data = await stream.receive(1 << 20)
        assert data, head[:200]
        head += data
    return head


async def test_a_new_large_field_per_response_does_not_grow_the_proxy() -> None:
    """issue 16 item 2: each response carries a different 200 KB field.  What the proxy's memos
    hold stays within their budgets, and the memory Python traces does not grow by more than a
    few MiB over 600 responses (on 7630772 it grew by ~0.2 MB per response)."""
    served = 0

    async def handler(req: OriginRequest) -> None:
        nonlocal served
        await req.read_body()
        served += 1
        # Unique per response; sent as a literal (h2 would Huffman-code it: see README).
        value = b"%08d" % served + b"x" * 200_000
        block = head_block((b":status", b"200"), (b"x-big", value), (b"content-length", b"0"))
        data = frame(HEADERS, END_STREAM, req.stream_id, block[:16384])
        rest = block[16384:]
        while rest:
            piece, rest = rest[:16384], rest[16384:]
            data += frame(CONTINUATION, 0 if rest else END_HEADERS, req.stream_id, piece)
        await send_raw(req, data)

    budget = core_headers.SAFE_BUDGET + 4 * 1024 * 1024  # every per-connection memo, generously
    async with running(handler, cluster={"connections": 1}) as h:
        stream = await anyio.connect_tcp(h.addr.host, h.addr.port)
        request = b"GET /big HTTP/1.1\r\nHost: a.test\r\n\r\n"
        for _ in range(20):  # warm-up: connections, buffers, code paths
            await stream.send(request)
            assert b"x-big: " in await read_response(stream)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(600):
                await stream.send(request)
                assert status_of(await read_response(stream)) == 200
                assert memo_bytes(h) <= budget
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        await stream.aclose()
        assert grown < 4 * 1024 * 1024, f"grew by {grown / 2**20:.1f} MiB"
        assert memo_bytes(h) < core_headers.SAFE_BUDGET


# --- item 5: a request without Host ---------------------------------------------------------


async def test_http10_without_host_gets_the_listeners_address_as_authority() -> None:
    """RFC 9113 §8.3.1 forbids an empty :authority, and h2's server role refuses a request with
    neither :authority nor Host (so would nginx): the proxy names the address the client
    connected to, as RFC 9112 §3.3 reconstructs the target URI."""
    seen: list[OriginRequest] = []

    async def handler(req: OriginRequest) -> None:
        seen.append(req)
        await req.read_body()
        await req.respond(200, [], b"ok\n")

    async with running(handler) as h:
        out = await h.raw(b"GET /x HTTP/1.0\r\n\r\n")
        assert status_of(out) == 200 and out.endswith(b"ok\n")
        out = await h.raw(b"GET /y HTTP/1.0\r\nUser-Agent: old\r\n\r\n")
        assert status_of(out) == 200
        expected = f"{h.addr.host}:{h.addr.port}".encode()
        assert [r.authority for r in seen] == [expected, expected]
        assert all(r.header(b"host") is None for r in seen)


# --- item 7: paths are normalised before routing, and forwarded normalised ---------------------

ROUTES = """
[[routes]]
host = "*"
path_prefix = "/public"
cluster = "app"
"""


async def test_dot_segments_cannot_leave_a_routes_prefix() -> None:
    paths: list[bytes] = []

    async def handler(req: OriginRequest) -> None:
        paths.append(req.path)
        await req.read_body()
        await req.respond(200, [], b"ok\n")

    async with running(handler, routes=ROUTES) as h:

        async def status(target: bytes) -> int:
            raw = b"GET " + target + b" HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
            return status_of(await h.raw(raw))

        assert await status(b"/public/../admin") == 404
        assert await status(b"/public/%2e%2e/admin") == 404
        assert await status(b"/public/x/..//y/./%7Ez?a=/../b") == 200
        assert await status(b"/%70ublic/a%2fb") == 400  # escaped slash: refused by default
        assert await status(b"/public/%zz") == 400
        assert paths == [b"/public/y/~z?a=/../b"]


@asynccontextmanager
async def running_with(listener_keys: str, handler: Any) -> AsyncIterator[Harness]:
    """harness.running with top-level [[listeners]] keys (it only writes [listeners.limits])."""
    o = H2Origin(handler)
    async with anyio.create_task_group() as tg:
        port = await tg.start(o.serve)
        text = config_text([f"127.0.0.1:{port}"], routes=ROUTES)
        text = text.replace('name = "edge"\n', 'name = "edge"\n' + listener_keys + "\n", 1)
        proxy = Proxy(loads(text))
        bound = await tg.start(proxy.serve)
        try:
            yield Harness(o, proxy, bound["edge"])
        finally:
            tg.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("keys", "target", "status", "forwarded"),
    [
        (
            'escaped_slashes = "keep"\nmerge_slashes = false',
            b"/public//a%2fb",
            200,
            b"/public//a%2Fb",
        ),
        ('escaped_slashes = "decode"', b"/public/a%2f%2Fb", 200, b"/public/a/b"),
        ('escaped_slashes = "decode"', b"/public%2F..%2Fadmin", 404, None),
        ('escaped_slashes = "reject"', b"/public/a%5Cb", 400, None),
    ],
)
async def test_escaped_slashes_and_merge_slashes_options(
    keys: str, target: bytes, status: int, forwarded: bytes | None
) -> None:
    paths: list[bytes] = []

    async def handler(req: OriginRequest) -> None:
        paths.append(req.path)
        await req.read_body()
        await req.respond(200, [], b"ok\n")

    async with running_with(keys, handler) as h:
        raw = b"GET " + target + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        assert status_of(await h.raw(raw)) == status
        assert paths == ([forwarded] if forwarded else [])
