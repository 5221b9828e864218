"""HTTP/2 abuse from clients over real sockets (issue 14): each attack ends in GOAWAY or
refusals on the attacker's connection, and another client on the same listener is still
served, on a connection opened before the attack and on a new one."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import hpack
import pytest

from muxproxy.core.h2wire import (
    CONTINUATION,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    REFUSED,
    RST_STREAM,
    SETTINGS,
    frame,
)

from .h2client import H2Client
from .h2harness import H2Harness, running_h2
from .harness import wait_for
from .origin import Script

pytestmark = pytest.mark.anyio


def get(path: str) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"a.test"),
        (b":path", path.encode()),
    ]


async def attack(h: H2Harness, data: bytes, *, piece: int = 1 << 20) -> list[tuple[int, int]]:
    """Write ``data`` after the preface, read until the proxy closes; (type, code) of every
    GOAWAY and RST_STREAM received."""
    s = await anyio.connect_tcp(h.addr.host, h.addr.port)
    got = bytearray()

    async def read() -> None:
        while True:
            try:
                got.extend(await s.receive(65536))
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            try:
                await s.send(PREFACE + frame(SETTINGS, 0, 0))
                for i in range(0, len(data), piece):
                    await s.send(data[i : i + piece])
            except (anyio.BrokenResourceError, OSError):
                pass  # the proxy closed the connection mid-attack
    await s.aclose()
    out = []
    while len(got) >= 9:
        n = int.from_bytes(got[:3], "big")
        if got[3] in (GOAWAY, RST_STREAM):
            payload = bytes(got[9 : 9 + n])
            out.append(
                (
                    got[3],
                    int.from_bytes(payload[-4:] if got[3] == RST_STREAM else payload[4:8], "big"),
                )
            )
        del got[: 9 + n]
    return out


@asynccontextmanager
async def bystander(h: H2Harness) -> AsyncIterator[None]:
    """A well-behaved client, connected before the attack, served after it (and a new one)."""
    c = await H2Client.connect(h.addr.host, h.addr.port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(c.run)
        await c.flush()
        yield
        for client in (c, None):
            if client is None:
                client = await H2Client.connect(h.addr.host, h.addr.port)
                tg.start_soon(client.run)
            sid = client.request("/hello")
            await client.flush()
            with anyio.fail_after(10):
                await client.responses[sid].done.wait()
            assert client.responses[sid].status == 200
            assert bytes(client.responses[sid].body) == b"hello\n"
            await client.aclose()


def goaway_calm(frames: list[tuple[int, int]]) -> bool:
    return (GOAWAY, ENHANCE_YOUR_CALM) in frames


async def test_rapid_reset_10000_pairs() -> None:
    script = Script()
    async with running_h2(script) as h, bystander(h):
        enc = hpack.Encoder()
        data = b"".join(
            frame(HEADERS, END_HEADERS | END_STREAM, sid, enc.encode(get("/hello")))
            + frame(RST_STREAM, 0, sid, struct.pack(">L", 8))
            for sid in range(1, 20_001, 2)
        )
        frames = await attack(h, data, piece=4096)
        assert goaway_calm(frames)
        assert script.served <= 200  # of 10,000: the backend never saw the flood


async def test_continuation_flood() -> None:
    async with running_h2(Script()) as h, bystander(h):
        enc = hpack.Encoder()
        data = frame(HEADERS, END_STREAM, 1, enc.encode(get("/hello")))
        data += frame(CONTINUATION, 0, 1, b"") * 100_000
        assert goaway_calm(await attack(h, data))


async def test_hpack_bomb() -> None:
    script = Script()
    async with running_h2(script, limits={"max_header_list_size": "16KiB"}) as h, bystander(h):
        enc = hpack.Encoder()
        # A 4,000-byte value into the dynamic table, then referenced 1,000 times: 5 KB on the
        # wire, 4 MB decoded.
        lit = b"\x40\x01x" + b"\x7f" + bytes([(3873 & 0x7F) | 0x80, 3873 >> 7]) + b"v" * 4000
        block = enc.encode(get("/hello")) + lit + b"\xbe" * 1000
        frames = await attack(h, frame(HEADERS, END_HEADERS | END_STREAM, 1, block))
        assert any(t == GOAWAY and code != 0 for t, code in frames), frames
        assert script.served == 0


@pytest.mark.parametrize("kind", ["SETTINGS", "PING"])
async def test_settings_and_ping_floods(kind: str) -> None:
    async with running_h2(Script()) as h, bystander(h):
        one = frame(SETTINGS, 0, 0) if kind == "SETTINGS" else frame(PING, 0, 0, b"\0" * 8)
        assert goaway_calm(await attack(h, one * 100_000))


async def test_10000_streams_past_max_concurrent_streams_are_refused() -> None:
    script = Script()
    async with running_h2(script, limits={"max_concurrent_streams": 100}) as h:
        async with bystander(h):
            enc = hpack.Encoder()
            data = b"".join(
                frame(HEADERS, END_HEADERS | END_STREAM, sid, enc.encode(get("/block")))
                for sid in range(1, 20_001, 2)
            )
            frames = await attack(h, data, piece=16384)
            refused = sum(1 for f in frames if f == (RST_STREAM, REFUSED))
            assert refused >= 100
            assert goaway_calm(frames)  # more than max(100, limit) refusals: the end
            assert len(script.started) <= 100  # never queued towards the backend
        script.release.set()


async def test_zero_window_client_holding_1000_streams_is_bounded() -> None:
    window = 65535
    async with (
        running_h2(
            Script(),
            limits={"max_concurrent_streams": 1000},
            cluster={"stream_window": f"{window}B", "connections": 8},  # origin: 128 streams each
        ) as h,
        bystander(h),
    ):
        c = await H2Client.connect(h.addr.host, h.addr.port, window=0, auto_ack=False)
        async with anyio.create_task_group() as tg:
            tg.start_soon(c.run)
            await c.flush()
            with anyio.fail_after(10):
                await c.remote_settings.wait()
            sids = [c.request("/big?100000") for _ in range(1000)]
            await c.flush()
            await wait_for(lambda: all(c.responses[s].status == 200 for s in sids), 30)
            pool = h.proxy.pools["app"]
            conns = [conn for b in pool.backends for conn in b.conns]
            held = sum(int(conn.core.unacknowledged()) for conn in conns)
            # What the proxy holds is bounded by the backend stream windows, never by
            # the 100 MB the backend would send.
            assert 0 < held <= 1000 * window
            assert all(not c.responses[s].body for s in sids)
            tg.cancel_scope.cancel()
        await c.aclose()
