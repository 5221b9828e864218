"""Outcome records: one per request or tunnel, handed to the proxy's recorders when it ends.

Also the phase deadlines of issue 16 (request_timeout starts once the request was sent whole)
and the lingering close after a refusal.
"""

from __future__ import annotations

import re

import anyio
import pytest

from muxproxy.core.outcome import REASONS, Outcome

from .harness import Harness, running, wait_for
from .origin import Script
from .ws_origin import WSScript
from .wsclient import WSClient

pytestmark = pytest.mark.anyio

HEX16 = re.compile(r"^[0-9a-f]{16}$")


def recorder(h: Harness) -> list[Outcome]:
    seen: list[Outcome] = []
    h.proxy.recorders.append(seen.append)
    return seen


async def settled(seen: list[Outcome], n: int) -> list[Outcome]:
    """Wait for n outcomes (recorded just after the last response byte is written)."""
    await wait_for(lambda: len(seen) >= n)
    return seen


async def test_success_outcome_names_backend_stream_and_request_id() -> None:
    script = Script()
    async with running(script) as h:
        seen = recorder(h)
        c = await h.client()
        for _ in range(2):
            r = await c.request("POST", "/echo?x=1", body=b"abcde", host="app.example")
            assert r.status == 200
        await c.aclose()
        first, second = await settled(seen, 2)
        assert len(seen) == 2
        assert (first.status, first.reason, first.method, first.path) == (
            200, "", "POST", "/echo?x=1"
        )
        assert first.authority == "app.example" and first.protocol == "HTTP/1.1"
        assert first.listener == "edge" and first.client_addr == "127.0.0.1"
        assert first.cluster == "app" and first.route == "routes[0]"
        assert first.backend.startswith("127.0.0.1:")
        assert first.backend_conn > 0 and first.stream_id > 0
        assert second.stream_id > first.stream_id
        assert first.bytes_in == 5 and first.bytes_out > 5
        assert first.queue_s >= 0 and first.upstream_s >= 0 and first.total_s >= 0
        # A request without x-request-id gets one, and the backend sees the same value.
        assert HEX16.match(first.request_id) and first.request_id != second.request_id
        assert script.request_ids == [first.request_id, second.request_id]


async def test_client_request_id_is_kept() -> None:
    script = Script()
    async with running(script) as h:
        seen = recorder(h)
        r = await h.get("/hello", headers=[("x-request-id", "abc-123")])
        assert r.status == 200
        (o,) = await settled(seen, 1)
        assert o.request_id == "abc-123" and script.request_ids == ["abc-123"]


async def test_no_route_is_recorded_as_404() -> None:
    routes = '[[routes]]\nhost = "app.example"\npath_prefix = "/"\ncluster = "app"\n'
    async with running(Script(), routes=routes) as h:
        seen = recorder(h)
        r = await h.get("/hello", host="other.example")
        assert r.status == 404
        (o,) = await settled(seen, 1)
        assert (o.status, o.reason, o.cluster, o.stream_id) == (404, "no_route", "", 0)
        assert o.reason in REASONS


async def test_refused_at_the_edge_is_recorded() -> None:
    async with running(Script()) as h:
        seen = recorder(h)
        raw = await h.raw(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 400 ")
        raw = await h.raw(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 414 ")
        bad, long = await settled(seen, 2)
        assert (bad.status, bad.reason, bad.backend) == (400, "refused_malformed", "")
        assert (long.status, long.reason) == (414, "refused_limit")
        assert bad.detail and bad.end >= bad.start


async def test_backend_failures_are_recorded_with_reasons() -> None:
    async with running(Script(), cluster={"request_timeout": "300ms"}) as h:
        seen = recorder(h)
        assert (await h.get("/reset")).status == 502
        assert (await h.get("/stall")).status == 504
        reset, stall = await settled(seen, 2)
        assert (reset.status, reset.reason) == (502, "backend_reset")
        assert reset.stream_id > 0 and reset.backend
        assert (stall.status, stall.reason) == (504, "upstream_timeout")
        assert stall.upstream_s == -1.0  # no response head ever came


async def test_unreachable_backend_is_recorded_as_503() -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()  # nothing listens there now
    async with running(Script(), backends=[f"127.0.0.1:{port}"],
                       cluster={"connect_timeout": "1s"}) as h:
        seen = recorder(h)
        assert (await h.get("/hello")).status == 503
        (o,) = await settled(seen, 1)
        assert (o.status, o.reason, o.stream_id) == (503, "no_backend", 0)


async def test_slow_steady_upload_outlives_request_timeout() -> None:
    """Issue 16 item 3: request_timeout bounds the wait for the response head once the body
    was sent whole; while the body still flows, body_timeout (no progress) governs."""
    async with running(Script(), cluster={"request_timeout": "1s"},
                       listener={"body_timeout": "2s"}) as h:
        stream = await anyio.connect_tcp(h.addr.host, h.addr.port)
        pieces = 12  # 12 × 250 ms = 3 s of upload, three times request_timeout
        await stream.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n"
                          % (pieces * 10))
        for _ in range(pieces):
            await anyio.sleep(0.25)  # the pace of the upload, not a wait for an event
            await stream.send(b"0123456789")
        out = b""
        with anyio.fail_after(10):
            while b"\r\n\r\n" not in out or len(out.split(b"\r\n\r\n", 1)[1]) < pieces * 10:
                out += await stream.receive()
        await stream.aclose()
        assert out.startswith(b"HTTP/1.1 200 ")


async def test_refusal_lingers_so_a_large_body_still_sees_the_response() -> None:
    """Issue 16 item 8: a client still sending a large body to a refused request reads the
    whole error response, not a reset."""
    async with running(Script(), listener={"max_body": "1000B"}) as h:
        for _ in range(3):
            stream = await anyio.connect_tcp(h.addr.host, h.addr.port)
            body = b"x" * (192 * 1024)
            head = b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body)
            out = b""

            async def send_all(s: anyio.abc.SocketStream = stream, data: bytes = body,
                               first: bytes = head) -> None:
                try:
                    await s.send(first)
                    for i in range(0, len(data), 16384):
                        await s.send(data[i : i + 16384])
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(send_all)
                    while True:
                        try:
                            out += await stream.receive()
                        except anyio.EndOfStream:
                            break
            await stream.aclose()
            assert out.startswith(b"HTTP/1.1 413 "), out[:200]
            assert out.endswith(b"request body too large\n")


async def test_websocket_tunnel_is_recorded_once_when_it_ends() -> None:
    routes = '[[routes]]\ncluster = "app"\nwebsocket = true\n'
    async with running(WSScript(), origin={"connect_protocol": True}, routes=routes) as h:
        seen = recorder(h)
        ws = await WSClient.connect(h.addr.host, h.addr.port)
        await ws.send("hi")
        assert await ws.receive() == "hi"
        assert seen == []  # still open: nothing recorded yet
        await ws.close()
        (o,) = await settled(seen, 1)
        assert (o.status, o.reason, o.protocol) == (101, "tunnel_closed", "websocket")
        assert o.stream_id > 0 and HEX16.match(o.request_id)


async def test_backend_that_takes_no_body_is_504_after_body_timeout() -> None:
    """While the body flows, a backend giving no credit for body_timeout ends the request (and
    request_timeout, much longer here, is not what decides)."""
    async with running(Script(), origin={"initial_window": 1000},
                       cluster={"request_timeout": "30s"},
                       listener={"body_timeout": "500ms"}) as h:
        seen = recorder(h)
        with anyio.fail_after(10):
            r = await h.get("/stall", body=b"x" * 100_000)
        assert r.status == 504 and b"body_timeout" in r.body
        (o,) = await settled(seen, 1)
        assert (o.status, o.reason) == (504, "body_timeout")


async def test_an_idle_detached_websocket_keeps_no_request_state(anyio_backend: str) -> None:
    """A tunnel is callbacks on the client connection (asyncio and trio alike), which then must
    not keep the request head, the output list or (with no recorder) an outcome: idle
    WebSockets stay small."""
    from muxproxy.io import client as client_module

    routes = '[[routes]]\ncluster = "app"\nwebsocket = true\n'
    async with running(WSScript(), origin={"connect_protocol": True}, routes=routes) as h:
        h.proxy.recorders.clear()  # (the built-in metrics recorder too: nobody listens)
        ws = await WSClient.connect(h.addr.host, h.addr.port)
        await ws.send("hi")
        assert await ws.receive() == "hi"
        (c,) = h.proxy.clients
        assert c.detached is not None
        assert c._head is None
        assert c.outcome is client_module._NO_OUTCOME
        assert c._out is client_module._SPENT_OUT and c.session is client_module._SPENT
        await ws.close()
