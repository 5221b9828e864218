"""The core proxy over real loopback sockets: HTTP/1.1 clients → muxproxy → an h2c origin."""

from __future__ import annotations

import hashlib
import json

import anyio
import h11
import pytest

from muxproxy.demo.h1client import H1Client

from .harness import running, wait_for
from .origin import Script, pattern

pytestmark = pytest.mark.anyio


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


async def test_get_and_forwarding_headers() -> None:
    async with running(Script()) as h:
        r = await h.get("/headers", host="app.example:8080",
                        headers=[("x-forwarded-for", "6.6.6.6"), ("connection", "x-drop"),
                                 ("x-drop", "secret"), ("accept", "a"), ("accept", "b")])
        assert r.status == 200
        seen = json.loads(r.body)
        names = [k for k, _ in seen]
        assert names[:4] == [":method", ":scheme", ":authority", ":path"]
        d = dict(map(tuple, seen))
        assert d[":authority"] == "app.example:8080"
        assert d[":scheme"] == "http"
        assert d["x-forwarded-for"] == "127.0.0.1"  # the untrusted client's value is replaced
        assert d["x-forwarded-proto"] == "http"
        assert d["x-forwarded-host"] == "app.example:8080"
        assert "muxproxy" in d["via"]
        assert "x-drop" not in d and "connection" not in d and "host" not in d
        assert [v for k, v in seen if k == "accept"] == ["a", "b"]  # order kept


async def test_keepalive_many_requests_share_the_pool() -> None:
    script = Script()
    async with running(script, cluster={"connections": 2}) as h:
        c = await h.client()
        for _ in range(50):
            r = await c.request("GET", "/hello")
            assert (r.status, r.body) == (200, b"hello\n")
        await c.aclose()
        assert h.origin.connections_accepted == 2


async def test_pipelined_requests_answered_in_order() -> None:
    async with running(Script()) as h:
        reqs = b"".join(
            b"GET /echo HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s" % (len(p), p)
            for p in (b"first", b"second", b"third")
        ) + b"GET /hello HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        raw = await h.raw(reqs)
        client = h11.Connection(h11.CLIENT)
        bodies = []
        client.receive_data(raw)
        for _ in range(4):
            client.send(h11.Request(method="GET", target="/", headers=[("host", "a")]))
            client.send(h11.EndOfMessage())
            body = b""
            while True:
                ev = client.next_event()
                if isinstance(ev, h11.Data):
                    body += ev.data
                if isinstance(ev, h11.EndOfMessage):
                    break
            bodies.append(body)
            if client.our_state is h11.DONE and client.their_state is h11.DONE:
                client.start_next_cycle()
        assert bodies == [b"first", b"second", b"third", b"hello\n"]


@pytest.mark.parametrize("size", [0, 1, 65535, 1024 * 1024 + 7])
async def test_post_content_length_echo(size: int) -> None:
    body = pattern(size)
    async with running(Script()) as h:
        c = await h.client()
        r = await c.request("POST", "/echo", body=body)
        assert r.status == 200
        assert r.header(b"x-echo-length") == str(size).encode()
        assert hashlib.sha256(r.body).digest() == hashlib.sha256(body).digest()
        await c.aclose()


async def test_post_chunked_echo_and_100_continue() -> None:
    async with running(Script()) as h:
        stream = await anyio.connect_tcp(h.addr.host, h.addr.port)
        with anyio.fail_after(10):
            await stream.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n")
            got = await stream.receive()
            assert got.startswith(b"HTTP/1.1 100 ")
            await stream.send(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
            conn = h11.Connection(h11.CLIENT)
            conn.send(h11.Request(method="POST", target="/", headers=[("host", "a"),
                      ("transfer-encoding", "chunked")]))
            body = b""
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await stream.receive())
                elif isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    break
        assert body == b"hello world"
        await stream.aclose()


async def test_head_204_304_and_no_length_responses() -> None:
    async with running(Script()) as h:
        c = await h.client()
        r = await c.request("HEAD", "/head-length")
        assert (r.status, r.body, r.header(b"content-length")) == (200, b"", b"1234")
        for code in (204, 304):
            r = await c.request("GET", f"/status/{code}")
            assert (r.status, r.body) == (code, b"")
        r = await c.request("GET", "/nolength")
        assert (r.status, r.body) == (200, b"part one, part two")
        assert r.header(b"transfer-encoding") == b"chunked"
        r = await c.request("GET", "/trailers")
        assert r.body == b"body"
        await c.aclose()


async def test_http10_client_gets_close_delimited_body_and_close() -> None:
    async with running(Script()) as h:
        raw = await h.raw(b"GET /nolength HTTP/1.0\r\n\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert body == b"part one, part two"


async def test_connection_close_is_honoured() -> None:
    async with running(Script()) as h:
        raw = await h.raw(b"GET /hello HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert raw.endswith(b"hello\n") and b"connection: close" in raw.lower()


async def test_no_route_is_404_from_the_proxy() -> None:
    script = Script()
    only = '[[routes]]\nhost = "only.example"\ncluster = "app"\n'
    async with running(script, routes=only) as h:
        r = await h.get("/hello", host="other.example")
        assert r.status == 404 and b"no route" in r.body
        assert h.origin.requests_received == 0


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
         400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\nHost: a\n\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
        (b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2000000000\r\n\r\n", 413),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    ],
)
async def test_malformed_requests_refused_and_nothing_forwarded(raw: bytes, status: int) -> None:
    async with running(Script(), listener={"max_body": "1MiB"}) as h:
        out = await h.raw(raw)
        assert status_of(out) == status
        assert b"connection: close" in out.lower()
        assert h.origin.requests_received == 0


async def test_chunked_body_over_limit_is_413() -> None:
    async with running(Script(), listener={"max_body": "64KiB"}) as h:
        chunk = b"%x\r\n%s\r\n" % (40000, b"a" * 40000)
        out = await h.raw(b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                          + chunk * 3 + b"0\r\n\r\n")
        assert status_of(out) == 413


async def test_header_timeout_is_408() -> None:
    async with running(Script(), listener={"header_timeout": "300ms"}) as h:
        out = await h.raw(b"GET / HTTP/1.1\r\nHost: a\r\n")  # never finishes the head
        assert status_of(out) == 408
        assert h.origin.requests_received == 0


async def test_idle_keepalive_connection_is_closed() -> None:
    async with running(Script(), listener={"idle_timeout": "200ms"}) as h:
        out = await h.raw(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")  # reads until close
        assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"hello\n")


async def test_queue_full_and_pending_timeout_are_503() -> None:
    script = Script()
    async with running(
        script,
        origin={"max_concurrent_streams": 2},
        # pending_timeout long enough that the poll below sees the queued request even on a
        # busy machine (with 500 ms it could come and go between two polls).
        cluster={"connections": 1, "max_pending": 1, "pending_timeout": "3s"},
    ) as h:
        results: dict[str, int] = {}

        async def fetch(name: str, path: str) -> None:
            results[name] = (await h.get(path)).status

        async with anyio.create_task_group() as tg:
            # One at a time: while the pool's only connection is still being made, both would
            # wait in the queue and the second would find it full (max_pending = 1).
            tg.start_soon(fetch, "a", "/block")
            await wait_for(lambda: len(script.started) == 1)
            tg.start_soon(fetch, "b", "/block")
            await wait_for(lambda: len(script.started) == 2)
            tg.start_soon(fetch, "queued", "/hello")
            await wait_for(lambda: h.pool().statistics().pending == 1)
            r = await h.get("/hello")  # the queue (max_pending = 1) is full
            assert r.status == 503 and b"waiting" in r.body
            await wait_for(lambda: "queued" in results)
            assert results["queued"] == 503  # pending_timeout passed, streams still busy
            script.release.set()
        assert results["a"] == results["b"] == 200
        assert h.origin.connections_accepted == 1  # the pool never grew


async def test_queued_request_gets_the_stream_when_one_frees() -> None:
    script = Script()
    async with running(script, origin={"max_concurrent_streams": 1},
                       cluster={"connections": 1, "pending_timeout": "30s"}) as h:
        results: list[int] = []

        async def fetch(path: str) -> None:
            results.append((await h.get(path)).status)

        async with anyio.create_task_group() as tg:
            tg.start_soon(fetch, "/block")
            await wait_for(lambda: len(script.started) == 1)
            tg.start_soon(fetch, "/hello")
            await wait_for(lambda: h.pool().statistics().pending == 1)
            script.release.set()
        assert sorted(results) == [200, 200]


async def test_pool_grows_only_to_max_connections_when_full() -> None:
    script = Script()
    async with running(script, origin={"max_concurrent_streams": 1},
                       cluster={"connections": 1, "max_connections": 2,
                                "pending_timeout": "30s"}) as h:
        statuses: list[int] = []

        async def fetch() -> None:
            statuses.append((await h.get("/block")).status)

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(fetch)
            await wait_for(lambda: len(script.started) == 2)
            assert h.pool().statistics().pending == 1
            script.release.set()
        assert statuses == [200, 200, 200]
        assert h.origin.connections_accepted == 2
        assert h.pool().statistics().counters["grown"] == 1


async def test_request_timeout_is_504_and_stream_reset() -> None:
    script = Script()
    async with running(script, cluster={"request_timeout": "300ms"}) as h:
        r = await h.get("/stall")
        assert r.status == 504
        await wait_for(lambda: h.origin.resets_received == 1)
        r = await h.get("/hello")  # the connection is still fine
        assert r.status == 200


async def test_reset_before_head_is_502_and_bad_status_is_502() -> None:
    async with running(Script()) as h:
        r = await h.get("/reset")
        assert r.status == 502 and b"reset" in r.body
        r = await h.get("/bad-status")
        assert r.status == 502


async def test_failure_after_head_closes_without_clean_end() -> None:
    async with running(Script()) as h:
        c = await h.client()
        with pytest.raises((anyio.EndOfStream, h11.RemoteProtocolError)):
            await c.request("GET", "/die-mid-body")
        await c.aclose()
        r = await h.get("/hello")
        assert r.status == 200


async def test_backend_unreachable_is_503() -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()  # nothing listens there now
    async with running(Script(), backends=[f"127.0.0.1:{port}"],
                       cluster={"connect_timeout": "1s"}) as h:
        r = await h.get("/hello")
        assert r.status == 503 and b"reachable" in r.body


async def test_slow_reader_holds_at_most_one_window_and_neighbours_flow() -> None:
    script = Script()
    window = 65535
    size = 32 * 1024 * 1024
    async with running(script, cluster={"connections": 1, "stream_window": f"{window}B"}) as h:
        slow = await anyio.connect_tcp(h.addr.host, h.addr.port)
        await slow.send(f"GET /big?{size} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        await wait_for(lambda: len(script.started) == 1)
        with anyio.fail_after(20):
            await script.started[0].flow_blocked.wait()  # backpressure reached the origin
        conn = h.pool().backends[0].conns[0]
        held = sum(len(d) for st in conn.core.streams.values() for d, _ in st.chunks)
        assert held <= window
        for _ in range(20):  # the same backend connection still serves other streams
            assert (await h.get("/hello")).status == 200
        received = 0
        with anyio.fail_after(60):
            while True:
                try:
                    received += len(await slow.receive(1 << 20))
                except anyio.EndOfStream:
                    break
                if received >= size:
                    break
        assert received >= size
        await slow.aclose()


async def test_fan_in_2000_clients_over_2_backend_connections() -> None:
    script = Script()
    async with running(script, origin={"max_concurrent_streams": 1000},
                       cluster={"connections": 2, "pending_timeout": "60s"}) as h:
        ok = 0

        async def client() -> None:
            nonlocal ok
            c = await H1Client.connect(h.addr.host, h.addr.port)
            try:
                r = await c.request("GET", "/hello")
                ok += r.status == 200 and r.body == b"hello\n"
            finally:
                await c.aclose()

        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                for _ in range(2000):
                    tg.start_soon(client)
        assert ok == 2000
        assert h.origin.connections_accepted == 2


@pytest.mark.parametrize("two_step", [False, True])
async def test_goaway_drains_replaces_and_replays_unprocessed(two_step: bool) -> None:
    script = Script()
    # max_replays 4: under this much concurrency a request can land on a connection right
    # before its GOAWAY more than twice in a row; the point here is zero failures, none twice.
    async with running(script, origin={"goaway_after": 40, "two_step_goaway": two_step},
                       cluster={"connections": 2, "pending_timeout": "30s",
                                "max_replays": 4}) as h:
        statuses: list[int] = []

        async def client(n: int) -> None:
            c = await h.client()
            try:
                for i in range(10):
                    r = await c.request("POST", "/echo", body=f"{n}-{i}".encode(),
                                        headers=[("x-request-id", f"{n}-{i}")])
                    statuses.append(r.status)
                    assert r.body == f"{n}-{i}".encode()
            finally:
                await c.aclose()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for n in range(30):
                    tg.start_soon(client, n)
        assert statuses == [200] * 300  # zero client-visible failures
        assert len(script.request_ids) == len(set(script.request_ids)) == 300  # none twice
        assert h.origin.connections_accepted > 2  # connections were replaced...
        stats = h.pool().statistics()
        assert stats.counters["goaway_received"] >= 1
        assert stats.connections <= 2  # ...and the pool kept its size


async def test_refused_stream_is_replayed_even_for_post() -> None:
    script = Script()
    async with running(script, origin={"refuse_every": 2}) as h:
        c = await h.client()
        for i in range(6):
            r = await c.request("POST", "/echo", body=b"x" * 1000,
                                headers=[("x-request-id", str(i))])
            assert (r.status, len(r.body)) == (200, 1000)
        await c.aclose()
        assert sorted(script.request_ids) == [str(i) for i in range(6)]
        assert h.pool().statistics().counters["replays"] >= 3


async def test_replays_stop_after_max_replays() -> None:
    async with running(Script(), origin={"refuse_every": 1, "refuse_once_per_id": False},
                       cluster={"max_replays": 2}) as h:
        c = await h.client()
        r = await c.request("POST", "/echo", body=b"abc")
        assert r.status == 502 and b"REFUSED_STREAM" in r.body
        assert h.origin.requests_received == 3  # the first try and exactly 2 replays
        await c.aclose()


@pytest.mark.parametrize(("size", "status"), [(1024, 200), (200 * 1024, 502)])
async def test_body_replayed_only_within_replay_buffer(size: int, status: int) -> None:
    script = Script()
    async with running(script, cluster={"replay_buffer": "64KiB", "connections": 1}) as h:
        c = await h.client()
        r = await c.request("POST", "/goaway-after-body", body=pattern(size))
        assert r.status == status
        if status == 200:
            assert r.body == pattern(size)  # replayed, body included, on a new connection
            assert h.origin.connections_accepted == 2
        else:
            assert b"too large to replay" in r.body  # streamed past the buffer: never resent
            assert h.origin.requests_received == 1
        await c.aclose()


async def test_concurrent_refused_streams_all_succeed_and_none_twice() -> None:
    script = Script()
    async with running(script, origin={"refuse_every": 7}) as h:
        statuses: list[int] = []

        async def client(n: int) -> None:
            c = await h.client()
            try:
                for i in range(10):
                    r = await c.request("POST", "/echo", body=b"x" * 100,
                                        headers=[("x-request-id", f"{n}-{i}")])
                    statuses.append(r.status)
            finally:
                await c.aclose()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for n in range(20):
                    tg.start_soon(client, n)
        assert statuses == [200] * 200
        assert len(script.request_ids) == len(set(script.request_ids)) == 200
        assert h.pool().statistics().backends[0].refused_received > 0
