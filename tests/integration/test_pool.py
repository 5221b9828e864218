"""The pool's API and state on loopback with real h2 backends: set_backends, drain, health,
the once-down/once-up log, the capacity warning, an idle close."""

from __future__ import annotations

import logging
import socket

import anyio
import pytest

from muxproxy.config import Address
from muxproxy.demo.h1client import H1Client
from muxproxy.demo.h2server import H2Origin

from .harness import running, wait_for
from .origin import Script
from .test_admin import admin_get
from .ws_origin import WSScript
from .wsclient import WSClient

pytestmark = pytest.mark.anyio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pool_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "muxproxy.pool" and text in r.getMessage()]


async def test_set_backends_adds_new_and_drains_vanished(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="muxproxy")
    other_script = Script()
    other = H2Origin(other_script)
    async with anyio.create_task_group() as tg:
        other_port: int = await tg.start(other.serve)
        async with running(Script(), cluster={"connections": 2}) as h:
            pool = h.pool()
            first = h.origin
            await wait_for(lambda: pool.statistics().connections == 2)
            blocked = await h.client()
            statuses: list[int] = []

            async def in_flight() -> None:
                statuses.append((await blocked.request("GET", "/block")).status)

            tg.start_soon(in_flight)
            await wait_for(lambda: len(h.origin.handler.started) == 1)  # type: ignore[attr-defined]

            old = pool.backends[0].address
            pool.set_backends([Address("127.0.0.1", other_port)])
            await wait_for(lambda: other.connections_accepted == 2)
            before = first.requests_received
            for _ in range(10):
                assert (await h.get("/hello")).status == 200
            assert first.requests_received == before  # the vanished backend: no new streams
            assert other_script.served == 10
            stats = {b.address: b for b in pool.statistics().backends}
            assert stats[str(old)].removed and stats[str(old)].open_connections >= 1

            h.origin.handler.release.set()  # type: ignore[attr-defined]
            await wait_for(lambda: statuses == [200])  # in flight on the old one: finished
            await wait_for(lambda: not first.connections)  # ... then its connections closed
            await wait_for(lambda: str(old) not in  # fully drained: forgotten
                           [b.address for b in pool.statistics().backends])
            assert first.connections_accepted == 2  # and never reconnected
            assert not pool_lines(caplog, "down")  # closed by us: not a failure
            await blocked.aclose()
        tg.cancel_scope.cancel()


async def test_drain_finishes_in_flight_refuses_new_then_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="muxproxy")
    script = Script()
    async with running(script, cluster={"connections": 2}) as h:
        pool = h.pool()
        await wait_for(lambda: pool.statistics().connections == 2)
        statuses: list[int] = []
        drained = anyio.Event()

        async def in_flight() -> None:
            statuses.append((await h.get("/block")).status)

        async def drain() -> None:
            await pool.drain(timeout=30)
            drained.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(in_flight)
            await wait_for(lambda: len(script.started) == 1)
            tg.start_soon(drain)
            r = await h.get("/hello")
            assert r.status == 503  # no new streams
            assert not drained.is_set()  # the in-flight request holds the drain
            script.release.set()
            await drained.wait()
        assert statuses == [200]
        assert not h.origin.connections  # every connection closed
        assert pool.statistics().connections == 0
        assert h.origin.connections_accepted == 2  # none reopened
        assert not pool_lines(caplog, "down")


async def test_drain_lets_a_websocket_finish() -> None:
    """A tunnel is a stream too: the drain waits for it, and it keeps working meanwhile."""
    script = WSScript()
    routes = '[[routes]]\ncluster = "app"\nwebsocket = true\n'
    async with running(script, origin={"connect_protocol": True},
                       cluster={"connections": 1}, routes=routes) as h:
        pool = h.pool()
        await wait_for(lambda: pool.statistics().connections == 1)
        ws = await WSClient.connect(h.addr.host, h.addr.port)
        drained = anyio.Event()

        async def drain() -> None:
            await pool.drain(timeout=30)
            drained.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(drain)
            for message in ("still", b"open"):
                await ws.send(message)
                assert await ws.receive() == message
            assert not drained.is_set()
            assert await ws.close(1000) == 1000
            await drained.wait()
        assert not h.origin.connections


async def test_drain_deadline_closes_what_is_left() -> None:
    script = Script()
    async with running(script, cluster={"connections": 1}) as h:
        pool = h.pool()
        statuses: list[int] = []

        async def stalled() -> None:
            statuses.append((await h.get("/stall")).status)

        async with anyio.create_task_group() as tg:
            tg.start_soon(stalled)
            await wait_for(lambda: len(script.started) == 1)
            await pool.drain(timeout=0.2)
        assert statuses == [502]  # cut at the deadline: a clear error, never a hang
        await wait_for(lambda: not h.origin.connections)


async def test_sole_backend_down_is_unhealthy_and_logged_once_each_way(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="muxproxy")
    port = free_port()  # nothing listens here yet
    async with running(Script(), backends=[f"127.0.0.1:{port}"],
                       cluster={"connections": 4}, admin=True) as h:
        pool = h.pool()
        await wait_for(lambda: pool.statistics().backends[0].consecutive_failures >= 12)
        assert pool.statistics().backends[0].healthy is False  # issue 13: not 1
        status, body = await admin_get(h.admin, "/metrics")
        assert status == 200
        assert f'muxproxy_backend_healthy{{cluster="app",backend="127.0.0.1:{port}"}} 0' in (
            body.decode())
        for _ in range(5):
            assert (await h.get("/hello")).status == 503
        assert len(pool_lines(caplog, "down")) == 1
        assert len(pool_lines(caplog, "no backend reachable")) <= 1
        assert len(pool_lines(caplog, str(port))) <= 2  # not a line per attempt

        origin = H2Origin(Script())
        async with anyio.create_task_group() as tg:
            await tg.start(origin.serve, "127.0.0.1", port)
            await wait_for(lambda: pool.statistics().backends[0].healthy, limit=20)
            assert (await h.get("/hello")).status == 200
            assert len(pool_lines(caplog, "reachable again")) == 1
            tg.cancel_scope.cancel()


async def test_idle_connection_closed_by_backend_is_routine(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="muxproxy")
    async with running(Script(), cluster={"connections": 1}) as h:
        pool = h.pool()
        await wait_for(lambda: pool.statistics().connections == 1)
        for conn in list(h.origin.connections):
            await conn.stream.aclose()
        await wait_for(lambda: h.origin.connections_accepted == 2)
        await wait_for(lambda: pool.statistics().connections == 1)
        assert (await h.get("/hello")).status == 200
        assert not [r for r in caplog.records
                    if r.name.startswith("muxproxy") and r.levelno >= logging.WARNING]
        assert pool_lines(caplog, "idle connection")
        assert pool.statistics().backends[0].consecutive_failures == 0


async def test_capacity_limit_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 15: connections = 2, a backend announcing 128 streams, 257 long requests: the
    257th queues, and the log says why and what to change."""
    caplog.set_level(logging.INFO, logger="muxproxy")
    script = Script()
    async with running(script, cluster={"connections": 2, "pending_timeout": "60s"},
                       origin={"max_concurrent_streams": 128}) as h:
        pool = h.pool()
        clients = [await H1Client.connect(h.addr.host, h.addr.port) for _ in range(257)]
        statuses: list[int] = []

        async def one(c: H1Client) -> None:
            statuses.append((await c.request("GET", "/block")).status)

        async with anyio.create_task_group() as tg:
            for c in clients:
                tg.start_soon(one, c)
            await wait_for(lambda: len(script.started) == 256 and pool.statistics().pending == 1,
                           limit=60)
            lines = pool_lines(caplog, "pool capacity is the limit")
            assert len(lines) == 1
            assert "2 connections, 256 streams" in lines[0]
            assert "max_connections" in lines[0] and "stream limit" in lines[0]
            assert pool.statistics().backends[0].open_connections == 2  # this worker's
            assert len(h.origin.connections) == 2
            script.release.set()
        assert statuses == [200] * 257
        for c in clients:
            await c.aclose()
