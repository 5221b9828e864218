"""Pool resilience over loopback: liveness, SETTINGS changes, stream-id exhaustion, client
gone, stalls, restarts, passive ejection and active health checks."""

from __future__ import annotations

import anyio
import pytest

from muxproxy.core.h2wire import MAX_STREAM_ID, STREAM_ID_RESERVE
from muxproxy.demo.h2server import H2Origin

from .harness import running, unacknowledged, wait_for
from .origin import Script

pytestmark = pytest.mark.anyio


async def test_dead_connection_is_detected_by_ping_and_replaced() -> None:
    script = Script()
    async with running(script, cluster={"connections": 1, "ping_interval": "200ms",
                                        "ping_timeout": "300ms"}) as h:
        assert (await h.get("/hello")).status == 200
        old = next(iter(h.origin.connections))
        results: list[int] = []

        async def stalled() -> None:
            results.append((await h.get("/stall")).status)

        with anyio.fail_after(15):  # bounded detection: ping_interval + ping_timeout + a tick
            async with anyio.create_task_group() as tg:
                tg.start_soon(stalled)
                await wait_for(lambda: len(script.started) == 1)
                old.frozen = True  # the backend goes silent: no frames, no PING ACK
        assert results == [502]
        await wait_for(lambda: h.pool().statistics().connections == 1)
        assert (await h.get("/hello")).status == 200
        assert h.origin.connections_accepted == 2
        stats = h.pool().statistics().backends[0]
        assert stats.ping_timeouts == 1


async def test_settings_lowered_to_zero_mid_flight_queues_new_streams() -> None:
    script = Script()
    async with running(script, cluster={"connections": 1, "pending_timeout": "30s"}) as h:
        statuses: list[int] = []

        async def fetch(path: str) -> None:
            statuses.append((await h.get(path)).status)

        async with anyio.create_task_group() as tg:
            tg.start_soon(fetch, "/block")
            tg.start_soon(fetch, "/block")
            await wait_for(lambda: len(script.started) == 2)
            conn = next(iter(h.origin.connections))
            conn.update_settings(max_concurrent_streams=0)
            proxy_conn = h.pool().backends[0].conns[0]
            await wait_for(lambda: proxy_conn.core.stream_limit() == 0)
            tg.start_soon(fetch, "/hello")
            await wait_for(lambda: h.pool().statistics().pending == 1)
            script.release.set()  # the two open streams finish normally
            await wait_for(lambda: statuses == [200, 200])
            assert h.pool().statistics().pending == 1  # still no capacity: it waits
            conn.update_settings(max_concurrent_streams=10)
        assert statuses == [200, 200, 200]
        assert h.origin.connections_accepted == 1


async def test_stream_id_exhaustion_drains_and_replaces() -> None:
    script = Script()
    async with running(script, cluster={"connections": 1}) as h:
        assert (await h.get("/hello")).status == 200
        conn = h.pool().backends[0].conns[0]
        conn.core.highest_stream_id = MAX_STREAM_ID - 2 * STREAM_ID_RESERVE - 6
        c = await h.client()
        for _ in range(10):
            assert (await c.request("GET", "/hello")).status == 200
        await c.aclose()
        assert h.origin.connections_accepted == 2
        await wait_for(lambda: conn.closed.is_set())  # drained, then closed
        assert h.pool().statistics().connections == 1


async def test_client_gone_mid_response_resets_stream_and_returns_credit() -> None:
    script = Script()
    async with running(script, cluster={"connections": 1}) as h:
        assert (await h.get("/hello")).status == 200
        conn = h.pool().backends[0].conns[0]
        stream = await anyio.connect_tcp(h.addr.host, h.addr.port)
        await stream.send(b"GET /big?33554432 HTTP/1.1\r\nHost: a\r\n\r\n")
        await stream.receive()  # the response has started
        await wait_for(lambda: any(r.flow_blocked.is_set() for r in script.started))
        await stream.aclose()  # the client vanishes mid-response
        await wait_for(lambda: h.origin.resets_received == 1)  # RST_STREAM(CANCEL) reached it
        await wait_for(lambda: h.pool().statistics().streams_open == 0)
        await wait_for(lambda: unacknowledged(conn) == 0)  # every received byte given back
        assert (await h.get("/hello")).status == 200


async def test_client_gone_mid_request_body_resets_stream() -> None:
    async with running(Script(), cluster={"connections": 1}) as h:
        stream = await anyio.connect_tcp(h.addr.host, h.addr.port)
        await stream.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n"
                          + b"x" * 1000)
        await wait_for(lambda: h.origin.requests_received == 1)
        await stream.aclose()
        await wait_for(lambda: h.origin.resets_received == 1)
        await wait_for(lambda: h.pool().statistics().streams_open == 0)


async def test_one_stalled_stream_does_not_slow_100_neighbours() -> None:
    script = Script()
    async with running(script, origin={"max_concurrent_streams": 200},
                       cluster={"connections": 1}) as h:
        stalled = await anyio.connect_tcp(h.addr.host, h.addr.port)
        await stalled.send(b"GET /stall HTTP/1.1\r\nHost: a\r\n\r\n")
        await wait_for(lambda: len(script.started) == 1)
        ok = 0

        async def neighbour() -> None:
            nonlocal ok
            r = await h.get("/hello")
            ok += r.status == 200

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(100):
                    tg.start_soon(neighbour)
        assert ok == 100
        assert h.origin.connections_accepted == 1  # all on the connection with the stall
        await stalled.aclose()


async def test_recovery_after_backend_restart() -> None:
    script = Script()
    origin = H2Origin(script)
    async with anyio.create_task_group() as outer:
        scope = anyio.CancelScope()

        async def serve_origin(*, task_status: anyio.abc.TaskStatus[int]) -> None:
            with scope:
                await origin.serve(task_status=task_status)

        port = await outer.start(serve_origin)
        async with running(Script(), backends=[f"127.0.0.1:{port}"],
                           cluster={"connections": 1, "connect_timeout": "1s"}) as h:
            assert (await h.get("/hello")).status == 200
            scope.cancel()  # the backend goes away (its connections close)
            await wait_for(lambda: h.pool().statistics().connections == 0)
            assert (await h.get("/hello")).status == 503
            restarted = H2Origin(script)
            await outer.start(restarted.serve, "127.0.0.1", port)

            async def back() -> bool:
                return (await h.get("/hello")).status == 200

            with anyio.fail_after(20):
                while not await back():
                    await anyio.sleep(0.05)
            assert restarted.connections_accepted == 1
        outer.cancel_scope.cancel()


async def test_passive_ejection_sends_everything_to_the_live_backend() -> None:
    dead = await anyio.create_tcp_listener(local_host="127.0.0.1")
    dead_port = dead.extra(anyio.abc.SocketAttribute.local_port)
    await dead.aclose()
    script = Script()
    live = H2Origin(script)
    async with anyio.create_task_group() as tg:
        live_port = await tg.start(live.serve)
        async with running(Script(), backends=[f"127.0.0.1:{dead_port}",
                                               f"127.0.0.1:{live_port}"],
                           cluster={"connections": 1, "eject_after": 2}) as h:
            await wait_for(lambda: h.pool().statistics().backends[0].ejected)
            for _ in range(20):
                assert (await h.get("/hello")).status == 200
            assert script.served == 20
            assert h.pool().statistics().counters["ejections"] >= 1
        tg.cancel_scope.cancel()


async def test_active_health_check_takes_a_backend_out_and_back() -> None:
    sick, well = Script(), Script()
    a, b = H2Origin(sick), H2Origin(well)
    async with anyio.create_task_group() as tg:
        pa = await tg.start(a.serve)
        pb = await tg.start(b.serve)
        health = '{ path = "/health", interval = "100ms", timeout = "1s" }'
        async with running(Script(), backends=[f"127.0.0.1:{pa}", f"127.0.0.1:{pb}"],
                           cluster={"connections": 1, "health": health,
                                    "balance": "round_robin"}) as h:
            await wait_for(lambda: h.pool().statistics().connections == 2)
            sick.health_status = 503
            await wait_for(lambda: not h.pool().statistics().backends[0].healthy)
            for _ in range(10):
                assert (await h.get("/hello")).status == 200
            assert (sick.served, well.served) == (0, 10)
            sick.health_status = 200
            await wait_for(lambda: h.pool().statistics().backends[0].healthy)
            for _ in range(10):
                assert (await h.get("/hello")).status == 200
            assert sick.served > 0
        tg.cancel_scope.cancel()


async def test_stall_mid_body_closes_the_client_and_resets_the_stream() -> None:
    script = Script()
    async with running(script, cluster={"request_timeout": "300ms"}) as h:
        out = await h.raw(b"GET /stall-mid-body HTTP/1.1\r\nHost: a\r\n\r\n")
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"content-length: 100000" in head
        assert body == b"x" * 1000  # closed short: the client can tell it is truncated
        await wait_for(lambda: h.origin.resets_received == 1)
        assert (await h.get("/hello")).status == 200
