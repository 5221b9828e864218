"""``protocol = "http1"`` against a small h11 origin on loopback, both anyio backends: the
connection budget, keep-alive reuse, and WebSockets on dedicated Upgrade connections counted
against ``max_connections``.  (nginx as the backend: interop/test_nginx_http1.py.)"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.abc
import h11
import pytest

from muxproxy.config import loads
from muxproxy.demo.h1client import H1Client
from muxproxy.io.server import Proxy

from .harness import config_text, wait_for
from .ws_origin import WSScript
from .wsclient import Rejected, WSClient

pytestmark = pytest.mark.anyio


class H1Origin:
    """Keep-alive HTTP/1.1 answering ``ok``; a WebSocket upgrade becomes a wsproto echo."""

    def __init__(self) -> None:
        self.script = WSScript()
        self.accepted = 0
        self.open = 0
        self.most_open = 0
        self.requests = 0

    async def serve(self, *, task_status: anyio.abc.TaskStatus[int]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
        await listener.serve(self.handle)

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        self.accepted += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await self._handle(stream)
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            pass
        finally:
            self.open -= 1
            await stream.aclose()

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        first = b""
        while b"\r\n\r\n" not in first:
            first += await stream.receive()
        if b"upgrade: websocket" in first.lower():
            await self.script.http1(stream, first)
            return
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(first)
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                try:
                    conn.receive_data(await stream.receive())
                except anyio.EndOfStream:
                    conn.receive_data(b"")
            elif isinstance(ev, h11.EndOfMessage):
                self.requests += 1
                await stream.send(
                    conn.send(h11.Response(status_code=200, headers=[("content-length", "3")]))
                    + conn.send(h11.Data(data=b"ok\n"))
                    + conn.send(h11.EndOfMessage())
                )
                conn.start_next_cycle()
            elif isinstance(ev, h11.ConnectionClosed):
                return


async def _proxy(tg: anyio.abc.TaskGroup, port: int, **cluster: Any) -> tuple[Proxy, Any]:
    routes = '[[routes]]\ncluster = "app"\nwebsocket = true\n'
    text = config_text([f"127.0.0.1:{port}"], cluster={"protocol": "http1", **cluster},
                       routes=routes)
    proxy = Proxy(loads(text))
    bound = await tg.start(proxy.serve)
    return proxy, bound["edge"]


async def test_100_concurrent_clients_over_3_connections() -> None:
    origin = H1Origin()
    async with anyio.create_task_group() as tg:
        port = await tg.start(origin.serve)
        proxy, edge = await _proxy(tg, port, connections=3)
        statuses: list[int] = []

        async def client() -> None:
            c = await H1Client.connect(edge.host, edge.port)
            try:
                for _ in range(3):
                    r = await c.request("GET", "/x")
                    statuses.append(r.status)
                    assert r.body == b"ok\n"
            finally:
                await c.aclose()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as clients:
                for _ in range(100):
                    clients.start_soon(client)
        assert statuses == [200] * 300 and origin.requests == 300
        assert origin.accepted == 3 and origin.most_open == 3
        assert proxy.pools["app"].statistics().counters.get("queued", 0) > 0
        tg.cancel_scope.cancel()


async def test_websockets_take_dedicated_connections_within_max_connections() -> None:
    origin = H1Origin()
    async with anyio.create_task_group() as tg:
        port = await tg.start(origin.serve)
        proxy, edge = await _proxy(tg, port, connections=1, max_connections=3)
        pool = proxy.pools["app"]
        await wait_for(lambda: pool.statistics().connections == 1)
        first = await WSClient.connect(edge.host, edge.port)
        second = await WSClient.connect(edge.host, edge.port)
        for ws, text in ((first, "one"), (second, "two")):
            await ws.send(text)
            assert await ws.receive() == text
        assert origin.script.http1_upgrades == 2 and origin.accepted == 3
        # 1 pooled + 2 dedicated = max_connections: the next WebSocket is refused
        with pytest.raises(Rejected) as info:
            await WSClient.connect(edge.host, edge.port)
        assert info.value.status == 503
        # plain requests still ride the pooled connection meanwhile
        c = await H1Client.connect(edge.host, edge.port)
        assert (await c.request("GET", "/x")).status == 200
        await c.aclose()
        await first.close()
        await wait_for(lambda: pool.counters["websocket_fallback_http1_open"] == 1)
        third = await WSClient.connect(edge.host, edge.port)
        await third.send("three")
        assert await third.receive() == "three"
        await second.close()
        await third.close()
        tg.cancel_scope.cancel()


async def test_idle_keepalive_connection_is_not_pinged_to_death() -> None:
    """HTTP/1.1 has no PING: an idle pooled connection outlives ping_interval + ping_timeout
    many times over and is reused, never declared dead."""
    origin = H1Origin()
    async with anyio.create_task_group() as tg:
        port = await tg.start(origin.serve)
        proxy, edge = await _proxy(
            tg, port, connections=1, ping_interval="100ms", ping_timeout="100ms"
        )
        c = await H1Client.connect(edge.host, edge.port)
        assert (await c.request("GET", "/x")).status == 200
        wheel = proxy.pools["app"].wheel
        later = wheel.now + 1.0
        await wait_for(lambda: wheel.now > later)
        assert (await c.request("GET", "/x")).status == 200
        await c.aclose()
        assert origin.accepted == 1
        stats = proxy.pools["app"].statistics()
        assert stats.counters.get("connect_failures", 0) == 0
        assert all(cs.ping_timeouts == 0 for b in stats.backends for cs in b.connections)
        tg.cancel_scope.cancel()
