"""WebSockets through muxproxy as RFC 8441 streams on the pool: hypercorn and an in-process
origin as backends, wsproto clients, both anyio backends."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from wsproto.events import CloseConnection

from muxproxy.config import Duration
from muxproxy.demo.h1client import H1Client

from .harness import running, unacknowledged, wait_for
from .origin import pattern
from .ws_origin import WSScript
from .wsclient import Rejected, WSClient

pytestmark = pytest.mark.anyio




def ws_routes(fallback: bool = False, websocket: bool = True) -> str:
    return (f'[[routes]]\ncluster = "app"\nwebsocket = {str(websocket).lower()}\n'
            f"websocket_fallback_http1 = {str(fallback).lower()}\n")


# --- hypercorn: a real, independent RFC 8441 server -------------------------------------------


class Hypercorn:
    def __init__(self, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.proc = proc

    async def stats(self) -> dict[str, Any]:
        c = await H1Client.connect("127.0.0.1", self.port)
        try:
            r = await c.request("GET", "/stats")
            return dict(json.loads(r.body))
        finally:
            await c.aclose()


def start_hypercorn(tmp: Path, max_streams: int) -> Iterator[Hypercorn]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp / "hypercorn.toml"
    cfg.write_text(
        f'bind = ["127.0.0.1:{port}"]\nh2_max_concurrent_streams = {max_streams}\n'
        "keep_alive_timeout = 300\nbacklog = 4096\n"
        "keep_alive_max_requests = 1000000\n"  # its default (1,000) sends GOAWAY, then dies
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hypercorn", "--config", str(cfg), "ws_app:app"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while True:  # poll until it accepts (bounded), never a fixed sleep
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read() if proc.stderr else b""
                    raise RuntimeError(f"hypercorn did not start: {err!r}") from None
                time.sleep(0.05)
        yield Hypercorn(port, proc)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def hypercorn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hypercorn]:
    yield from start_hypercorn(tmp_path_factory.mktemp("hc"), 3000)


@pytest.fixture(scope="module")
def hypercorn_default(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hypercorn]:
    yield from start_hypercorn(tmp_path_factory.mktemp("hcd"), 100)


async def test_hypercorn_echo_ping_subprotocol_and_close(hypercorn: Hypercorn) -> None:
    async with running(WSScript(), backends=[f"127.0.0.1:{hypercorn.port}"],
                       cluster={"connections": 1}, routes=ws_routes()) as h:
        ws = await WSClient.connect(h.addr.host, h.addr.port, subprotocols=["x", "chat"])
        assert ws.subprotocol == "chat"
        for message in ("hello", "é" * 1000, b"\x00\x01binary", pattern(1024 * 1024)):
            await ws.send(message)
            assert await ws.receive() == message
        await ws.ping(b"are you there")
        assert await ws.wait_pong() == b"are you there"
        assert await ws.close(4001, "bye") == 4001  # client-initiated close code echoed back
        ws = await WSClient.connect(h.addr.host, h.addr.port)
        await ws.send("close:4002")  # backend-initiated close
        with pytest.raises(anyio.EndOfStream):
            await ws.receive()
        assert ws.close_code == 4002
        await wait_for(lambda: h.pool().statistics().streams_open == 0)


async def test_hypercorn_abrupt_client_disconnect_ends_backend_handler(
    hypercorn: Hypercorn,
) -> None:
    async with running(WSScript(), backends=[f"127.0.0.1:{hypercorn.port}"],
                       cluster={"connections": 1}, routes=ws_routes()) as h:
        before = await hypercorn.stats()
        clients = [await WSClient.connect(h.addr.host, h.addr.port) for _ in range(5)]
        for ws in clients:
            await ws.send("x")
            assert await ws.receive() == "x"
        assert (await hypercorn.stats())["live"] == before["live"] + 5
        for ws in clients:
            await ws.abort()  # no close handshake: only RST_STREAM(CANCEL) can end them
        with anyio.fail_after(10):
            while (await hypercorn.stats())["live"] != before["live"]:
                await anyio.sleep(0.02)
        await wait_for(lambda: h.pool().statistics().streams_open == 0)
        # the shared connection survived: a new WebSocket still works on it
        ws = await WSClient.connect(h.addr.host, h.addr.port)
        await ws.send("still here")
        assert await ws.receive() == "still here"
        await ws.close()


async def test_fan_in_5000_websockets_over_2_connections(hypercorn: Hypercorn) -> None:
    n = 5000
    async with running(WSScript(), backends=[f"127.0.0.1:{hypercorn.port}"],
                       listener={"max_connections": 20000},
                       cluster={"connections": 2, "pending_timeout": "60s",
                                "max_streams_per_connection": 3000},
                       routes=ws_routes()) as h:
        before = set((await hypercorn.stats())["peers"])
        clients: list[WSClient] = []
        with anyio.fail_after(120):
            async def open_one(i: int) -> None:
                ws = await WSClient.connect(h.addr.host, h.addr.port)
                clients.append(ws)

            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(open_one, i)
            ok = 0

            async def echo(i: int, ws: WSClient) -> None:
                nonlocal ok
                await ws.send(f"message {i}")
                got = await ws.receive()
                ok += got == f"message {i}"

            async with anyio.create_task_group() as tg:
                for i, ws in enumerate(clients):
                    tg.start_soon(echo, i, ws)
            assert ok == n
            stats = await hypercorn.stats()
            assert stats["live"] >= n
            assert len(set(stats["peers"]) - before) == 2  # exactly 2 TCP connections
            async with anyio.create_task_group() as tg:
                for ws in clients:
                    tg.start_soon(ws.close)
        await wait_for(lambda: h.pool().statistics().streams_open == 0, limit=60)


async def test_default_stream_limit_queues_then_503(hypercorn_default: Hypercorn) -> None:
    """hypercorn's default limit is 100 streams per connection: with 2 connections the 201st
    WebSocket waits in the queue and gets a 503 at pending_timeout — never silently."""
    async with running(WSScript(), backends=[f"127.0.0.1:{hypercorn_default.port}"],
                       cluster={"connections": 2, "pending_timeout": "300ms"},
                       routes=ws_routes()) as h:
        clients = [await WSClient.connect(h.addr.host, h.addr.port) for _ in range(200)]
        with pytest.raises(Rejected) as info:
            await WSClient.connect(h.addr.host, h.addr.port)
        assert info.value.status == 503
        assert h.pool().statistics().counters["pending_timeout"] == 1
        for ws in clients:
            await ws.abort()


async def test_default_stream_limit_grows_pool_to_max_connections(
    hypercorn_default: Hypercorn,
) -> None:
    async with running(WSScript(), backends=[f"127.0.0.1:{hypercorn_default.port}"],
                       cluster={"connections": 2, "max_connections": 3,
                                "pending_timeout": "10s"},
                       routes=ws_routes()) as h:
        clients = [await WSClient.connect(h.addr.host, h.addr.port) for _ in range(250)]
        stats = h.pool().statistics()
        assert stats.connections == 3 and stats.counters["grown"] == 1
        for ws in clients:
            await ws.abort()


# --- the in-process origin: a backend whose every move the test controls ----------------------


async def test_origin_echo_and_nothing_leaks() -> None:
    script = WSScript()
    async with running(script, origin={"connect_protocol": True},
                       cluster={"connections": 1}, routes=ws_routes()) as h:
        await wait_for(lambda: h.pool().statistics().connections == 1)
        conn = h.pool().backends[0].conns[0]
        for _ in range(3):
            ws = await WSClient.connect(h.addr.host, h.addr.port, subprotocols=["superchat"])
            assert ws.subprotocol == "superchat"
            for message in ("text", b"bytes", pattern(300_000)):
                await ws.send(message)
                assert await ws.receive() == message
            await ws.close()
        await wait_for(lambda: script.live == 0)
        await wait_for(lambda: h.pool().statistics().streams_open == 0)
        assert unacknowledged(conn) == 0  # every byte the backend sent was given back as credit
        assert not conn.news and not conn.blocked  # no exchange left registered
        assert (await h.get("/hello")).status == 200


async def test_origin_abrupt_disconnects_both_directions() -> None:
    script = WSScript()
    async with running(script, origin={"connect_protocol": True},
                       cluster={"connections": 1}, routes=ws_routes()) as h:
        ws = await WSClient.connect(h.addr.host, h.addr.port)
        await ws.abort()  # client vanishes
        await wait_for(lambda: script.opened == 1 and script.live == 0)
        assert h.origin.resets_received == 1
        ws = await WSClient.connect(h.addr.host, h.addr.port)
        await wait_for(lambda: script.live == 1)
        origin_conn = next(iter(h.origin.connections))
        await origin_conn.abort()  # the backend connection dies: the tunnel closes promptly
        with anyio.fail_after(10), pytest.raises(anyio.EndOfStream):
            await ws.receive()


async def test_refused_upgrade_is_an_ordinary_response() -> None:
    async with running(WSScript(), origin={"connect_protocol": True},
                       routes=ws_routes()) as h:
        with pytest.raises(Rejected) as info:
            await WSClient.connect(h.addr.host, h.addr.port, path="/refuse-ws")
        assert info.value.status == 403 and info.value.body == b"no websocket here\n"


async def test_no_rfc8441_is_502_without_fallback() -> None:
    script = WSScript()
    async with running(script, origin={"connect_protocol": False},
                       routes=ws_routes(fallback=False)) as h:
        await wait_for(lambda: h.pool().statistics().connections > 0)
        with pytest.raises(Rejected) as info:
            await WSClient.connect(h.addr.host, h.addr.port)
        assert info.value.status == 502 and b"RFC 8441" in info.value.body
        assert script.opened == 0


async def test_no_rfc8441_falls_back_to_dedicated_http1() -> None:
    script = WSScript()
    async with running(script, origin={"connect_protocol": False, "http1_handler": script.http1},
                       cluster={"connections": 1}, routes=ws_routes(fallback=True)) as h:
        await wait_for(lambda: h.pool().statistics().connections == 1)
        ws = await WSClient.connect(h.addr.host, h.addr.port)
        await ws.send("over http/1.1")
        assert await ws.receive() == "over http/1.1"
        assert h.pool().statistics().counters["websocket_fallback_http1"] == 1
        assert h.pool().statistics().counters["websocket_fallback_http1_open"] == 1
        await ws.close()
        await wait_for(lambda: h.pool().statistics().counters["websocket_fallback_http1_open"]
                       == 0)
        assert script.http1_upgrades == 1 and h.origin.connections_accepted == 2


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Sec-WebSocket-Version": "8"}, 426),
        ({"Sec-WebSocket-Key": None}, 400),
        ({"Sec-WebSocket-Key": "not base64!"}, 400),
        ({"Sec-WebSocket-Key": "dG9vIHNob3J0"}, 400),  # decodes to 9 bytes, not 16
        ({"method": "POST"}, 400),
    ],
)
async def test_bad_handshakes_refused_and_backend_sees_nothing(
    headers: dict[str, str | None], status: int
) -> None:
    base = {"method": "GET", "Host": "a", "Connection": "Upgrade", "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    base.update(headers)
    method = base.pop("method")
    head = f"{method} /ws HTTP/1.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in base.items() if v is not None
    ) + "\r\n"
    script = WSScript()
    async with running(script, origin={"connect_protocol": True}, routes=ws_routes()) as h:
        out = await h.raw(head.encode())
        assert int(out.split(b" ", 2)[1]) == status
        if status == 426:
            assert b"sec-websocket-version: 13" in out.lower()
        assert h.origin.requests_received == 0


async def test_upgrade_on_route_without_websocket_is_an_ordinary_request() -> None:
    script = WSScript()
    async with running(script, origin={"connect_protocol": True},
                       routes=ws_routes(websocket=False)) as h:
        out = await h.raw(b"GET /headers HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                          b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200")
        assert b'"upgrade"' not in out.lower() and b":method\", \"GET" in out


async def test_upgrade_h2c_is_never_honoured() -> None:
    async with running(WSScript(), routes=ws_routes()) as h:
        out = await h.raw(b"GET /headers HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, "
                          b"HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
                          b"\r\n")
        assert out.startswith(b"HTTP/1.1 200")
        assert b"h2c" not in out and b"http2-settings" not in out.lower()


async def test_tunnel_idle_timeout_closes_silent_tunnels() -> None:
    script = WSScript()
    async with running(script, origin={"connect_protocol": True},
                       cluster={"tunnel_idle_timeout": "300ms"}, routes=ws_routes()) as h:
        ws = await WSClient.connect(h.addr.host, h.addr.port)
        with anyio.fail_after(10), pytest.raises(anyio.EndOfStream):
            await ws.receive()  # nothing moves: the proxy closes the tunnel
        await wait_for(lambda: script.live == 0)


async def test_shutdown_waits_for_tunnels_up_to_grace_then_closes_them() -> None:
    script = WSScript()
    async with running(script, origin={"connect_protocol": True}, routes=ws_routes()) as h:
        ws = await WSClient.connect(h.addr.host, h.addr.port)
        cfg = h.proxy.config
        grace = msgspec.structs.replace(cfg.proxy, grace_period=Duration(0.5))
        h.proxy.config = msgspec.structs.replace(cfg, proxy=grace)
        h.proxy.shutdown()  # SIGTERM's handler: stop accepting, drain
        await ws.send("still open during the grace period")
        assert await ws.receive() == "still open during the grace period"
        with anyio.fail_after(10), pytest.raises(anyio.EndOfStream):
            await ws.receive()  # the grace period ends: the tunnel is closed
        await wait_for(lambda: script.live == 0)


async def test_websocket_client_that_stops_reading_holds_one_window_then_is_dropped() -> None:
    """A backend floods a WebSocket whose client reads nothing: the proxy holds at most the
    stream window of it (credit goes back only as the client takes bytes), the backend is
    throttled by flow control, and after send_timeout the client is dropped and the stream
    reset; the connection's credit is all back."""
    script = WSScript()
    window = 65535
    async with running(
        script,
        origin={"connect_protocol": True},
        listener={"send_timeout": "500ms"},
        cluster={"connections": 1, "stream_window": f"{window}B"},
        routes=ws_routes(),
    ) as h:
        ws = await WSClient.connect(h.addr.host, h.addr.port, path="/flood")
        conn = h.pool().backends[0].conns[0]
        await wait_for(lambda: script.flooded > 0)
        with anyio.fail_after(20):
            while h.origin.resets_received == 0:
                # Held by the proxy: unconsumed chunks, plus what waits in the transport of a
                # callback-driven tunnel (asyncio); never more than one window.
                held = sum(len(d) for st in conn.core.streams.values() for d, _ in st.chunks)
                for c in h.proxy.clients:
                    if c.detached is not None:
                        held += c.detached.stream.write_buffer_size()
                assert held <= window + 16384
                await anyio.sleep(0.005)  # polling a condition, bounded by fail_after
        await wait_for(lambda: script.live == 0 and not h.proxy.clients)
        await wait_for(lambda: h.pool().statistics().streams_open == 0)
        assert unacknowledged(conn) == 0
        assert script.flooded < 64 * 1024 * 1024  # throttled: kernel buffers + one window
        await ws.abort()


# --- the same rules on every path (one tunnel core) -------------------------------------------


def _path(fallback: bool, script: WSScript) -> dict[str, Any]:
    if fallback:
        return {"origin": {"connect_protocol": False, "http1_handler": script.http1},
                "routes": ws_routes(fallback=True)}
    return {"origin": {"connect_protocol": True}, "routes": ws_routes()}


@pytest.mark.parametrize("fallback", [False, True], ids=["rfc8441", "http1"])
async def test_idle_timeout_on_every_path(fallback: bool) -> None:
    script = WSScript()
    async with running(script, cluster={"connections": 1, "tunnel_idle_timeout": "300ms"},
                       **_path(fallback, script)) as h:
        await wait_for(lambda: h.pool().statistics().connections == 1)  # (RFC 8441 known)
        ws = await WSClient.connect(h.addr.host, h.addr.port)
        await ws.send("x")
        assert await ws.receive() == "x"
        with anyio.fail_after(10), pytest.raises(anyio.EndOfStream):
            await ws.receive()  # nothing moves: the proxy closes the tunnel
        await wait_for(lambda: script.live == 0)  # and the backend side with it


@pytest.mark.parametrize("fallback", [False, True], ids=["rfc8441", "http1"])
async def test_half_close_after_close_frame_still_gets_the_answer(fallback: bool) -> None:
    """The client sends its close frame and half-closes at once: the backend still gets the
    close (then the end of the stream) and its answer reaches the client."""
    script = WSScript()
    async with running(script, cluster={"connections": 1}, **_path(fallback, script)) as h:
        await wait_for(lambda: h.pool().statistics().connections == 1)  # (RFC 8441 known)
        ws = await WSClient.connect(h.addr.host, h.addr.port)
        await ws.send("x")
        assert await ws.receive() == "x"
        await ws.stream.send(ws.ws.send(CloseConnection(code=4003)))
        await ws.stream.send_eof()
        with anyio.fail_after(10):
            codes: list[int] = []
            while not codes:
                codes += [ev.code for ev in ws._events() if isinstance(ev, CloseConnection)]
                if not codes:
                    await ws._fill()
        assert codes == [4003]
        await ws.stream.aclose()
        await wait_for(lambda: script.live == 0)
        await wait_for(lambda: h.pool().statistics().streams_open == 0)
